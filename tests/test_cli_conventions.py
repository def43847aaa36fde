"""CLI conventions shared by every command: ``--output``/``-o`` (``--out`` kept one release as a deprecated alias)
and one error format, ``freeprm COMMAND: error: MESSAGE`` with exit code 2."""

import pytest

from freeprm.cli import build_parser, main


def test_output_everywhere_and_out_is_a_deprecated_alias(tmp_path, capsys):
    p = build_parser()
    for argv in (["bon", "report"], ["train", "--data", "d"]):
        assert p.parse_args([*argv, "-o", "x"]).out == "x"
        assert p.parse_args([*argv, "--output", "x"]).out == "x"
        with pytest.warns(DeprecationWarning, match="--out is deprecated; use --output"):
            assert p.parse_args([*argv, "--out", "x"]).out == "x"
        assert "freeprm: warning: --out is deprecated; use --output" in capsys.readouterr().err


@pytest.mark.parametrize("argv, command", [
    (["score", "-i", "nonexistent.jsonl", "-o", "x.jsonl"], "score"),
    (["rerank", "-i", "nonexistent.jsonl", "-o", "x"], "rerank"),
    (["bon", "report", "-o", "{tmp}", "--candidates", "nonexistent.jsonl", "--no-scores"], "bon report"),
    (["serve", "--host", "0.0.0.0"], "serve"),
    (["train", "--data", "nonexistent.jsonl", "-o", "{tmp}", "--device", "nosuch"], "train"),
])
def test_one_error_format(argv, command, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"freeprm {command}: error: ")

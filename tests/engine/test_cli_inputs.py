"""``freeprm score`` input hardening on the tiny model: each bad input is reported with its line, good rows are kept."""

import io
import json
import os
import sys

import pytest
import torch

from freeprm.cli import main


def good(i, **extra):
    return json.dumps({"id": i, "prompt": f"What is {i}+{i}?", "response": f"{i}+{i} = {2 * i}.\n\nSo {2 * i}.",
                       **extra})


def run(tmp_path, lines, *extra, data=None):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    if data is None:
        data = "".join(x + "\n" for x in lines).encode("utf-8", "surrogatepass")
    inp.write_bytes(data)
    rc = main(["score", "--policy", TINY[0], "-i", str(inp), "-o", str(out), "--no-progress", *extra])
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()] if rc == 0 else None
    return rc, rows


TINY = []


@pytest.fixture(autouse=True)
def _tiny(tiny_model_dir):
    TINY[:] = [tiny_model_dir]


def test_every_bad_kind_reported_with_its_line_and_good_rows_kept(tmp_path, capsys):
    data = (b"\xef\xbb\xbf" + good(1).encode() + b"\n"  # 1 BOM
            + b'{"prompt": "p", "response": "a\xff"}\n'  # 2 invalid UTF-8
            + b'{"prompt": "p", "response": "a\rb"}\n'  # 3 raw CR in a string
            + good(4, tag="x\ud800y").encode("utf-8", "surrogatepass").replace(b"x\xed\xa0\x80y", b"x\\ud800y")
            + b"\n"  # 4 lone surrogate in a passed-through key
            + b"[" * 50_000 + b"\n"  # 5 deep nesting
            + good(6).encode() + b"\r\n"  # 6 CRLF: fine
            + b'{"prompt": "p", "response": "a", "x": NaN}\n'  # 7 NaN literal
            + b'["prompt", "response"]\n'  # 8 not an object
            + b'{"prompt": "p", "response": "\\n\\n  \\n\\n"}\n'  # 9 no step
            + b'{"prompt": "p", "response": "' + b"word " * 300_000 + b'"}\n'  # 10: 1.5 MB, over the byte limit
            + good(11).encode() + b"\n")
    rc, rows = run(tmp_path, None, data=data)
    err = capsys.readouterr().err
    assert rc == 0 and "Traceback" not in err
    assert [r["line"] for r in rows] == [1, 6, 11] and [r["id"] for r in rows] == [1, 6, 11]
    for line, needle in [(2, "invalid UTF-8"), (3, "control character"), (4, "invalid \\ud800 surrogate in key 'tag'"),
                         (5, "nested too deeply"), (7, "NaN"), (8, "must be a JSON object"), (9, ""),
                         (10, "longer than the limit")]:
        said = [x for x in err.splitlines() if f"in.jsonl:{line}: " in x]
        assert len(said) == 1 and needle in said[0], (line, err)
    assert "scored 3 responses, skipped 8 malformed lines" in err


def test_strict_names_the_line_and_keeps_the_old_output(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    rc, _ = run(tmp_path, [good(1), '{"prompt": "p", "response": "\\ud800"}'], "--strict")
    assert rc == 2 and "in.jsonl:2: invalid \\ud800 surrogate in key 'response'" in capsys.readouterr().err
    assert out.read_text() == "previous\n"


def test_output_keys_in_the_input_go_under_meta(tmp_path, capsys):
    rc, rows = run(tmp_path, [good(1, line=99, score="mine", aggregation="x", meta={"m": 1}, label=1)])
    assert rc == 0
    r, = rows
    assert r["line"] == 1 and isinstance(r["score"], float) and r["aggregation"] == "min" and r["label"] == 1
    assert r["meta"] == {"line": 99, "score": "mine", "aggregation": "x", "meta": {"m": 1}}
    assert "clash with output keys" in capsys.readouterr().err


@pytest.mark.parametrize("delim", ["。", "\u2028", "\\u3002"])
def test_non_ascii_step_delimiter_is_not_mangled(tmp_path, delim):
    line = json.dumps({"prompt": "q", "response": "one。two。three"}, ensure_ascii=False).replace("。", "\u2028" if
                                                                                                delim == "\u2028" else "。")
    rc, rows = run(tmp_path, [line], "--step-delimiter", delim)
    assert rc == 0 and [s.strip("。\u2028") for s in rows[0]["steps"]] == ["one", "two", "three"]


@pytest.mark.parametrize("args, needle", [
    (["--step-delimiter", "\\"], "lone backslash"),
    (["--step-delimiter", "\\q"], "unknown escape"),
    (["--max-length", "0"], "must be >= 1"),
    (["--max-length", "-5"], "must be >= 1"),
    (["--max-batch-tokens", "0"], "must be >= 1"),
])
def test_bad_option_values_are_argparse_errors(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, [good(1)], *args)
    assert e.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.parametrize("device, needle", [("tpu9", "unknown device"), ("cuda", "CUDA is not available")])
def test_bad_device_fails_before_loading(tmp_path, capsys, device, needle):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    inp = tmp_path / "in.jsonl"
    inp.write_text(good(1) + "\n")
    rc = main(["score", "--policy", str(tmp_path / "no-such-model"), "-i", str(inp), "-o", str(tmp_path / "o.jsonl"),
               "--device", device])
    assert rc == 2 and needle in capsys.readouterr().err  # a model load would have failed on the missing policy


def test_catastrophic_pattern_times_out_per_line(tmp_path, capsys):
    slow = json.dumps({"prompt": "p", "response": "a" * 40 + "!"})
    ok = json.dumps({"prompt": "p", "response": "aaXbb"})
    rc, rows = run(tmp_path, [ok, slow, ok], "--step-pattern", "(a+)+$|X", "--pattern-timeout", "0.2")
    err = capsys.readouterr().err
    assert rc == 0 and [r["line"] for r in rows] == [1, 3] and "in.jsonl:2: --step-pattern took over 0.2 s" in err


def test_zero_width_pattern_warns(tmp_path, capsys):
    rc, rows = run(tmp_path, [json.dumps({"prompt": "p", "response": "Step 1 a. Step 2 b."})], "--step-pattern",
                   "(?=Step)")
    assert rc == 0 and len(rows[0]["steps"]) == 1
    assert "matched only empty text on 1 line(s) (first:" in capsys.readouterr().err
    rc, _ = run(tmp_path, [good(1)], "--step-pattern", "\\n*")
    assert rc == 0 and "matches the empty string" in capsys.readouterr().err


def test_output_checked_before_model_work(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(good(1) + "\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(inp)
    nomodel = str(tmp_path / "no-such-model")
    for out, needle in [(inp, "is the input file"), (link, "is the input file"), (tmp_path, "is a directory")]:
        assert main(["score", "--policy", nomodel, "-i", str(inp), "-o", str(out)]) == 2
        assert needle in capsys.readouterr().err
    assert inp.read_text() == good(1) + "\n"
    assert main(["score", "--policy", nomodel, "-i", str(tmp_path / "none.jsonl"), "-o", "x"]) == 2
    assert "not found" in capsys.readouterr().err


def test_stdin_to_stdout_and_file_mode(tmp_path, monkeypatch, capsysbinary):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((good(1) + "\n{bad\n" + good(3) + "\n").encode())))
    assert main(["score", "--policy", TINY[0], "-i", "-", "-o", "-", "--no-progress"]) == 0
    cap = capsysbinary.readouterr()
    assert [json.loads(x)["line"] for x in cap.out.decode().splitlines()] == [1, 3]
    assert b"<stdin>:2: invalid JSON" in cap.err
    old = os.umask(0o022)
    try:
        rc, _ = run(tmp_path, [good(1)])
    finally:
        os.umask(old)
    assert rc == 0 and (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o644

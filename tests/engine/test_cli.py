"""freeprm score / demo command lines on the tiny model."""

import json

import pytest

from freeprm.cli import main


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


GOOD = [json.dumps({"id": 1, "prompt": "What is 2+2?", "response": "2+2 = 4.\n\nThe answer is 4."}),
        json.dumps({"id": 2, "prompt": "Q", "steps": ["a b", "c d"]})]
BAD = ['{"prompt": "p", "response": ', json.dumps({"prompt": "p"}), json.dumps({"prompt": "p", "response": ""})]


def test_score_writes_schema_in_input_order(tiny_model_dir, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, GOOD)
    assert main(["score", "--policy", tiny_model_dir, "-i", str(inp), "-o", str(out), "--no-progress", "--tokens"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2] and [r["line"] for r in rows] == [1, 2]
    for r in rows:
        assert r["score"] == pytest.approx(min(r["step_rewards"]))
        assert len(r["q_values"]) == len(r["steps"]) == len(r["step_rewards"])
        assert len(r["token_rewards"]) == r["num_tokens"] == len(r["token_steps"])
    assert rows[1]["steps"] == ["a b", "c d"]


def test_malformed_lines_skipped_and_counted(tiny_model_dir, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [GOOD[0], BAD[0], "", BAD[1], GOOD[1], BAD[2]])
    assert main(["score", "--policy", tiny_model_dir, "-i", str(inp), "-o", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    for lineno in (2, 4, 6):
        assert f"in.jsonl:{lineno}:" in err
    assert "invalid JSON" in err and "scored 2 responses, skipped 3 malformed lines" in err
    assert [json.loads(x)["line"] for x in out.read_text().splitlines()] == [1, 5]


def test_strict_is_fatal_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    write_lines(inp, [GOOD[0], BAD[1]])
    assert main(["score", "--policy", tiny_model_dir, "-i", str(inp), "-o", str(out), "--strict", "--no-progress"]) == 2
    assert "in.jsonl:2:" in capsys.readouterr().err
    assert out.read_text() == "previous results\n"  # untouched
    assert not list(tmp_path.glob(".out.jsonl.*"))


def test_missing_input(tiny_model_dir, tmp_path, capsys):
    assert main(["score", "--policy", tiny_model_dir, "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err


def test_demo_runs_on_bundled_set(tiny_model_dir, capsys):
    assert main(["demo", "--policy", tiny_model_dir, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pick: candidate" in out and "summary: picked a correct candidate for" in out

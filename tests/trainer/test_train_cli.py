"""``freeprm train``: a short run from the command line, resume, and an actionable error for bad data."""

import json

import pytest

from freeprm.cli import main


def _argv(tiny_model_dir, data, out, tmp_path, *extra):
    return ["train", "--loss", "dpo", "--policy", tiny_model_dir, "--data", str(data), "--output", str(out), "--lr", "1e-3",
            "--beta", "0.1", "--batch-size", "2", "--max-steps", "3", "--no-progress",
            "--ref-cache-dir", str(tmp_path / "rc"), *extra]


def test_train_cli_runs_and_resumes(tiny_model_dir, data_path, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(tiny_model_dir, data_path, out, tmp_path, "--save-every", "2")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["ref_computed"] == 16  # labeled rows were paired automatically
    assert (out / "final" / "model.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("pair_accuracy" in r for r in rows)
    # resume from the step-2 checkpoint: only step 3 is redone, from the cache
    assert main(_argv(tiny_model_dir, data_path, out, tmp_path, "--resume", str(out / "checkpoint-2"))) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["ref_computed"] == 0
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_train_cli_bad_row(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response": "a", "label": 1}\n{"prompt": "q", "response": "b", "label": "no"}\n')
    assert main(_argv(tiny_model_dir, bad, tmp_path / "o", tmp_path)) == 2
    assert "bad.jsonl:2: 'label' must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a bad number is refused by the option parser (cliargs.positive_int)
        main(_argv(tiny_model_dir, bad, tmp_path / "o", tmp_path, "--batch-size", "0"))
    assert e.value.code == 2 and "--batch-size: must be >= 1" in capsys.readouterr().err

"""Resume reads metrics.jsonl through freeprm.io: a cut last line is dropped with a warning, a corrupt one named."""

import json

import pytest

from freeprm.trainer.checkpoint import truncate_metrics as _truncate_metrics


def test_cut_last_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    _truncate_metrics(p, 3)
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2, 3]
    assert f"{p}:4: dropping a cut last line" in capsys.readouterr().err
    _truncate_metrics(p, 2)
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2]


def test_corrupt_middle_metrics_line_names_file_and_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{p}:2: invalid JSON"):
        _truncate_metrics(p, 3)
    assert p.read_text().count("\n") == 3  # left as it was

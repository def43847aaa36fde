"""Resume reads metrics.jsonl through freeprm.io: a cut last line is dropped with a warning, a corrupt one named."""

import json
import math

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


def test_nonfinite_metrics_are_standard_json_with_a_flag(tiny_model_dir, data_path, tmp_path, monkeypatch):
    """A diverged step (NaN loss, Inf grad norm) is written as null plus "nonfinite", never as NaN/Infinity."""
    from freeprm.io import LineError, iter_jsonl
    from freeprm.trainer import TrainConfig, train
    from freeprm.trainer.loop import Trainer

    real = Trainer.train_step

    def diverging(self):
        row = real(self)
        return row | ({"loss": float("nan"), "grad_norm": float("inf")} if row["step"] == 2 else {})

    monkeypatch.setattr(Trainer, "train_step", diverging)
    cfg = TrainConfig(reference_free=True, max_steps=3, batch_size=4, progress=False, seed=0)
    res = train(tiny_model_dir, data_path, tmp_path / "out", config=cfg)
    assert math.isnan(res.metrics[1]["loss"])  # the returned rows keep the floats
    text = (tmp_path / "out" / "metrics.jsonl").read_text()
    assert ": NaN" not in text and ": Infinity" not in text
    rows = [obj for _, obj in iter_jsonl(tmp_path / "out" / "metrics.jsonl")]  # the strict reader: standard JSON
    assert not [o for o in rows if isinstance(o, LineError)]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None
    assert rows[1]["nonfinite"] == {"loss": "NaN", "grad_norm": "Infinity"}
    assert "nonfinite" not in rows[0] and math.isfinite(rows[0]["loss"])
    # truncating on resume rewrites the kept rows the same way (also rows of older files with NaN literals)
    p = tmp_path / "old.jsonl"
    p.write_text('{"step": 1, "loss": NaN, "lr": -Infinity}\n{"step": 2, "loss": 0.5}\n')
    _truncate_metrics(p, 1)
    assert json.loads(p.read_text()) == {"step": 1, "loss": None, "lr": None,
                                         "nonfinite": {"loss": "NaN", "lr": "-Infinity"}}


@pytest.mark.parametrize("text, why", [('{"format": "freeprm-trainer-1", "step": 4, "epo', "Unterminated string"),
                                       (b'\xff\xfe', ""), ("[1, 2]", "not a JSON object"),
                                       ('{"format": "freeprm-trainer-1", "step": 4}', "missing or mistyped epoch")])
def test_damaged_trainer_state_names_the_file_and_what_to_do(tmp_path, text, why):
    from freeprm.trainer.checkpoint import read_state

    ck = tmp_path / "checkpoint-4"
    ck.mkdir()
    (ck / "trainer_state.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=rf"{ck}/trainer_state.json is damaged \({why}.*delete {ck} to resume from the "
                                         r"checkpoint before it.*or start over"):
        read_state(ck)

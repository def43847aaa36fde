"""Step-error evaluation (ProcessBench format): metrics against hand-computed values, tuning, batch invariance."""

import json

import pytest

from freeprm.eval.steps import (
    arith_step_rows,
    chance_metrics,
    evaluate_steps,
    first_below,
    load_step_rows,
    step_metrics,
    tune_threshold,
)
from freeprm.eval.tasks import arith_steps, make_arith


def test_f1_by_hand():
    # 5 erroneous rows (labels 0,1,2,1,0) and 3 correct rows (-1)
    labels = [0, 1, 2, 1, 0, -1, -1, -1]
    preds = [0, 2, 2, -1, 0, -1, 0, -1]
    m = step_metrics(labels, preds)
    # erroneous: rows 0, 2, 4 right -> 3/5 = 0.6; correct: rows 5, 7 right -> 2/3; F1 = 2*0.6*(2/3)/(0.6+2/3) = 0.8/1.2667
    assert m.acc_error == pytest.approx(0.6) and m.acc_correct == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(0.631578947368421) and (m.n_error, m.n_correct) == (5, 3)
    assert step_metrics([0, -1], [1, 0]).f1 == 0.0
    c = chance_metrics([0, -1, 2], [3, 1, 4])  # 1/4 and 1/5 for the erroneous, 1/2 for the correct
    assert c.acc_error == pytest.approx(0.225) and c.acc_correct == pytest.approx(0.5)
    assert c.f1 == pytest.approx(2 * 0.225 * 0.5 / 0.725)


def test_first_below_and_tuning():
    assert first_below([0.5, -0.2, -1.0], 0.0) == 1 and first_below([0.5, 0.1], 0.0) == -1
    labels = [1, -1, 0, -1]
    rewards = [[0.3, -0.5, 0.2], [0.3, 0.1, 0.4], [-0.4, 0.2], [0.2, -0.1]]
    tau, m = tune_threshold(labels, rewards)
    # tau in (-0.4, -0.1]... the first that gets every row: -0.1 < tau <= 0.1 flags row 3's -0.1 too -> not that;
    # tau = -0.1 flags steps < -0.1: row0 -> 1, row1 -> -1, row2 -> 0, row3 -> -1: all four right
    assert m.f1 == 1.0 and -0.4 < tau <= -0.1
    assert tau == -0.1  # the smallest of the best (candidates are the distinct rewards)


def test_arith_step_rows_label_the_first_wrong_step():
    probs = make_arith(30, seed=3, levels=(1, 2, 3))
    rows = arith_step_rows(probs, seed=0)
    assert len(rows) == 60
    for gold, bad in zip(rows[::2], rows[1::2]):
        assert gold["label"] == -1 and gold["problem"] == bad["problem"] and len(gold["steps"]) == len(bad["steps"])
        k = bad["label"]
        assert gold["steps"][:k] == bad["steps"][:k] and gold["steps"][k] != bad["steps"][k]
        assert gold["steps"][-1] != bad["steps"][-1]  # the final answer changed
    assert arith_steps(probs[0], (99, 1)) is None


def test_load_step_rows_errors(tmp_path):
    f = tmp_path / "s.jsonl"
    f.write_text(json.dumps({"problem": "p", "steps": ["a", "b"], "label": 1}) + "\n"
                 + json.dumps({"problem": "p", "steps": ["a"], "label": 1}) + "\n")
    with pytest.raises(ValueError, match=r"s.jsonl:2: 'label' must be -1 or a step index in 0..0"):
        load_step_rows(f)
    f.write_text(json.dumps({"problem": "p", "steps": ["a"], "label": -1, "solution": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"s.jsonl:1: unknown field\(s\) \['solution'\]"):
        load_step_rows(f)


def test_same_numbers_whatever_the_batch(tiny_model_dir):
    """A row's rewards (and so the threshold and metrics) do not depend on the other rows, their order or number."""
    import random

    from freeprm.engine import Scorer
    from freeprm.eval.steps import score_step_rows

    rows = arith_step_rows(make_arith(4, seed=5, levels=(2, 3)), seed=1)
    tune, test = rows[:4], rows[4:]
    scorer = Scorer(tiny_model_dir, None, beta=1.0)
    base = evaluate_steps(tune, test, scorer)
    shuffled = list(test)
    random.Random(0).shuffle(shuffled)
    res = evaluate_steps(tune + test, shuffled + tune, scorer)  # other rows around them, other order
    by_id = dict(zip([r["id"] for r in shuffled + tune], res["test_rewards"]))
    assert [by_id[r["id"]] for r in test] == base["test_rewards"]
    assert score_step_rows(test[2:], scorer) == base["test_rewards"][2:]  # fewer rows
    assert evaluate_steps(tune, test, scorer)["test"] == base["test"]
    assert base["test"]["n_error"] == 2 and base["test"]["n_correct"] == 2


def test_cli_eval_steps(tiny_model_dir, tmp_path, capsys):
    from freeprm.cli import main

    rows = arith_step_rows(make_arith(4, seed=5, levels=(2,)), seed=1)
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    assert main(["data", "steps", "--task", "arith", "--levels", "2", "--limit", "3", "--task-seed", "9",
                 "-o", str(tmp_path / "test.jsonl")]) == 0
    capsys.readouterr()
    assert main(["eval", "steps", "--tune", str(tmp_path / "dev.jsonl"), "--test", str(tmp_path / "test.jsonl"),
                 "--policy", tiny_model_dir, "--json", str(tmp_path / "r.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test"]["n_error"] == 3 and out["test"]["n_correct"] == 3 and 0 <= out["test"]["f1"] <= 1
    assert len(json.loads((tmp_path / "r.json").read_text())["predictions"]) == 6

"""``freeprm data rollouts``: on-policy rows from graded rollouts, resume after a kill, bad input."""

import json

import pytest

from freeprm.eval.rollouts import dpo_pairs, load_rollouts, make_rollouts, summarize, training_rows
from freeprm.eval.tasks import Problem, load_task_file, make_arith


def _roll(pid, cid, response, correct, prompt="P"):
    return {"problem_id": pid, "candidate_id": cid, "prompt": prompt, "response": response, "correct": correct}


def test_rows_dedup_pairs_and_summary():
    rolls = [_roll("a", 0, "x = 1", True), _roll("a", 1, "x = 2", False), _roll("a", 2, "x = 1", True),
             _roll("a", 3, "x = 3", False), _roll("b", 0, "y", False, prompt="Q"), _roll("b", 1, "y", False, prompt="Q")]
    rows, dups = training_rows(rolls)
    assert dups == 2  # a's second "x = 1" and b's second "y"
    assert [(r["problem_id"], r["response"], r["label"]) for r in rows] == \
        [("a", "x = 1", 1), ("a", "x = 2", 0), ("a", "x = 3", 0), ("b", "y", 0)]
    pairs = dpo_pairs(rows, seed=0)
    assert len(pairs) == 1 and pairs[0]["chosen"] == "x = 1" and pairs[0]["rejected"] in ("x = 2", "x = 3")
    s = summarize(rolls, rows, pairs, dups)
    assert s["accuracy_per_problem"] == {"a": 0.5, "b": 0.0}
    assert s["problems_with_both_labels"] == 0.5 and s["problems_all_wrong"] == 0.5
    assert s["rollout_accuracy"] == pytest.approx(2 / 6)


def test_rollouts_resume_after_a_kill(tiny_model_dir, tmp_path, capsys):
    probs = make_arith(3, seed=0, levels=(1,))
    kw = dict(k=3, model=tiny_model_dir, temperature=1.0, max_new_tokens=6, seed=0, batch_size=4, progress=False)
    full = make_rollouts(probs, tmp_path / "a", **kw)
    assert full["rollouts"] == 9 and full["generation"]["generated"] == 9
    # the same run, killed: its last batch was cut mid-line and a problem is missing entirely
    (tmp_path / "b").mkdir()
    lines = (tmp_path / "a" / "rollouts.jsonl").read_text().splitlines(keepends=True)
    cut = "".join(lines[:5]) + lines[5][:20]
    (tmp_path / "b" / "rollouts.jsonl").write_text(cut)
    capsys.readouterr()
    res = make_rollouts(probs, tmp_path / "b", **kw)
    assert "dropping a cut last line" in capsys.readouterr().err
    assert res["generation"]["reused"] == 5 and res["generation"]["generated"] == 4 and res["rollouts"] == 9
    got = load_rollouts(tmp_path / "b" / "rollouts.jsonl")
    assert sorted((r["problem_id"], r["candidate_id"]) for r in got) == \
        sorted((p.problem_id, c) for p in probs for c in range(3))
    assert got[:5] == load_rollouts(tmp_path / "a" / "rollouts.jsonl")[:5]  # nothing already written was redone
    rows = [json.loads(x) for x in (tmp_path / "b" / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == res["rows"] == 9 - res["duplicates_dropped"] - sum(not r["response"].strip() for r in got)
    assert set(rows[0]) == {"prompt", "response", "label", "problem_id"}
    again = make_rollouts(probs, tmp_path / "b", **kw)  # a finished run: nothing to do, same files
    assert again["generation"]["generated"] == 0 and again["rows"] == res["rows"]


def test_corrupt_rollout_line_is_an_error_naming_it(tmp_path):
    p = tmp_path / "rollouts.jsonl"
    p.write_text(json.dumps(_roll("a", 0, "x", True)) + "\n{not json\n" + json.dumps(_roll("a", 1, "y", False)) + "\n")
    with pytest.raises(ValueError, match=r"rollouts.jsonl:2:"):
        load_rollouts(p)
    p.write_text(json.dumps({"problem_id": "a", "candidate_id": 0, "prompt": "P"}) + "\n")
    with pytest.raises(ValueError, match=r"rollouts.jsonl:1: rollout record lacks \['response', 'correct'\]"):
        load_rollouts(p)
    assert p.read_text().count("\n") == 1  # nothing was removed


def test_task_file(tmp_path):
    f = tmp_path / "tasks.jsonl"
    f.write_text('{"question": "1 + 1?", "gold": "2"}\n{"question": "2 + 2?", "gold": 4, "problem_id": "q2"}\n')
    probs = load_task_file(f, task="arith")
    assert [(p.problem_id, p.task, p.gold) for p in probs] == [("tasks-1", "arith", "2"), ("q2", "arith", "4")]
    f.write_text('{"question": "1 + 1?", "gold": "2"}\n{"question": "x", "gold": "1", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"tasks.jsonl:2: unknown field\(s\) \['answer'\]"):
        load_task_file(f)


def test_cli_task_file_with_unknown_fields(tmp_path, capsys):
    from freeprm.cli import main

    f = tmp_path / "t.jsonl"
    f.write_text('{"question": "1 + 1?", "gold": "2", "solution": "2"}\n')
    assert main(["data", "rollouts", "--task-file", str(f), "--output", str(tmp_path / "o"), "--policy", "none"]) == 2
    assert f"{f}:1: unknown field(s) ['solution']" in capsys.readouterr().err
    assert not (tmp_path / "o" / "rollouts.jsonl").exists()


def test_cli_rollouts(tiny_model_dir, tmp_path, capsys):
    from freeprm.cli import main

    rc = main(["data", "rollouts", "--task", "arith", "--levels", "1", "--limit", "2", "--k", "2", "--policy",
               tiny_model_dir, "--max-new-tokens", "4", "--output", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["problems"] == 2 and out["rollouts"] == 4
    assert (tmp_path / "o" / "pairs.jsonl").exists() and (tmp_path / "o" / "summary.json").exists()


def test_arith_problem_has_gold_steps():
    from freeprm.eval.grading import grade
    from freeprm.eval.tasks import arith_steps

    for p in make_arith(40, seed=1, levels=(1, 2, 3, 4)):
        steps = arith_steps(p)
        assert grade(steps[-1], p.gold, "arith")[1], (p.question, steps)
    assert isinstance(Problem("x", "arith", "q", "1").meta, dict)

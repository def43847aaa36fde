"""End to end on a tiny random model: `freeprm bon all` writes candidates, scores, table and plot; reruns resume."""

import json

import pytest

from freeprm.cli import main
from freeprm.eval.candidates import append_jsonl, read_jsonl


def _bon(stage, out, *extra):
    return main(["bon", stage, "--output", str(out), "--no-progress", *extra])


def test_bon_all_tiny_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--task", "arith", "--limit", "3", "--levels", "1,2", "--n", "4", "--max-new-tokens", "12",
            "--batch-size", "5", "--generator", tiny_model_dir, "--policy", tiny_model_dir, "--n-subsets", "10", "--bootstrap", "50"]
    assert _bon("all", out, *args) == 0
    cands = read_jsonl(out / "candidates.jsonl")
    assert len(cands) == 12 and {c["candidate_id"] for c in cands} == {0, 1, 2, 3}
    for c in cands:
        assert set(c) >= {"problem_id", "candidate_id", "prompt", "response", "steps", "answer", "correct", "gold",
                          "task"}
        assert c["task"] == "arith" and isinstance(c["correct"], bool)
    scores = read_jsonl(out / "scores.jsonl")
    assert len(scores) == 12
    from freeprm.engine import AGGREGATIONS

    assert all(set(s["aggregates"]) == set(AGGREGATIONS) for s in scores)
    table = json.loads((out / "bon_table.json").read_text())
    assert table["ns"] == [1, 2, 4]
    methods = [r["method"] for r in table["methods"]]
    assert methods == ["random", "majority", "bon:min", "wmv:min:raw", "wmv:min:sigmoid", "wmv:min:softmax", "pass@N"]
    for row in table["methods"]:
        for n in ("1", "2", "4"):
            c = row["cells"][n]
            assert 0 <= c["ci_low"] <= c["accuracy"] <= c["ci_high"] <= 100
    assert table["meta"]["problems"] == 3 and table["meta"]["candidates_per_problem"] == 4
    assert table["meta"]["generation"]["max_new_tokens"] == 12 and table["meta"]["scorer"].startswith("policy=")
    md = (out / "bon_table.md").read_text()
    assert "| best-of-N, min step reward |" in md and "N=4" in md
    png = (out / "bon_plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # a rerun reuses everything: no new candidate or score lines
    before_c, before_s = (out / "candidates.jsonl").read_text(), (out / "scores.jsonl").read_text()
    capsys.readouterr()
    assert _bon("all", out, *args) == 0
    err = capsys.readouterr().err
    assert "0 new, 12 reused" in err and "0 scored, 12 reused" in err
    assert (out / "candidates.jsonl").read_text() == before_c and (out / "scores.jsonl").read_text() == before_s

    # growing N to 6 generates and scores only the new candidates
    args6 = [a if a != "4" else "6" for a in args]
    assert _bon("all", out, *args6) == 0
    err = capsys.readouterr().err
    assert "6 new, 12 reused" in err and "6 scored, 12 reused" in err
    assert json.loads((out / "bon_table.json").read_text())["ns"] == [1, 2, 4, 6]


def test_bring_your_own_candidates(tiny_model_dir, tmp_path, capsys):
    own = tmp_path / "mine.jsonl"
    recs = []
    for pid, gold in (("q1", "4"), ("q2", "10")):
        for cid, resp in enumerate(["2 + 2 = 4.\n\nThe answer is 4.", "It is 10.\n\nThe answer is 10.",
                                    "Hmm.\n\nThe answer is 5."]):
            recs.append({"problem_id": pid, "candidate_id": cid, "prompt": f"Question {pid}?", "response": resp,
                         "task": "gsm8k", "gold": gold})
    append_jsonl(own, recs)
    out = tmp_path / "own"
    assert _bon("score", out, "--candidates", str(own), "--policy", tiny_model_dir) == 0
    assert _bon("report", out, "--candidates", str(own), "--n-subsets", "5", "--bootstrap", "20",
                "--aggregate", "min,q_last") == 0
    table = json.loads((out / "bon_table.json").read_text())
    rows = {r["method"]: r for r in table["methods"]}
    assert {"bon:min", "bon:q_last", "wmv:q_last:softmax"} <= set(rows)
    # each problem has exactly one correct candidate of three
    assert rows["random"]["cells"]["3"]["accuracy"] == pytest.approx(100 / 3, abs=0.01)
    assert rows["pass@N"]["cells"]["3"]["accuracy"] == 100.0
    assert rows["majority"]["cells"]["3"]["accuracy"] == 50.0  # 3-way tie: the first answer (4) wins
    # another prompt format is another scorer: rescored, never reused
    capsys.readouterr()
    assert _bon("score", out, "--candidates", str(own), "--policy", tiny_model_dir, "--prompt-format", "raw") == 0
    assert "6 scored, 0 reused" in capsys.readouterr().err


def test_report_without_scores_and_errors(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "x"
    assert _bon("report", out) == 2
    assert "no candidates" in capsys.readouterr().err
    own = tmp_path / "c.jsonl"
    append_jsonl(own, [{"problem_id": "a", "candidate_id": i, "prompt": "p", "response": r, "answer": a,
                        "correct": a == "1"} for i, (r, a) in enumerate([("r", "1"), ("s", "2"), ("t", "2")])])
    assert _bon("report", out, "--candidates", str(own), "--no-scores", "--n-subsets", "5", "--bootstrap", "20") == 0
    rows = [r["method"] for r in json.loads((out / "bon_table.json").read_text())["methods"]]
    assert rows == ["random", "majority", "pass@N"]
    assert _bon("report", out, "--candidates", str(own), "--n-subsets", "5") == 2  # PRM methods need scores
    assert "run the score stage" in capsys.readouterr().err

"""Problems from candidate/score records, the methods x N table and its markdown."""

import pytest

from freeprm.eval.report import build_problems, build_table, method_label, table_markdown


def _records():
    cands, scores = [], {}
    answers = {"m1": [(r"\frac12", True), ("0.5", True), ("2", False), ("3", False)],
               "m2": [("7", False), ("7", False), ("9", True), (None, False)]}
    for pid, rows in answers.items():
        for cid, (ans, ok) in reversed(list(enumerate(rows))):  # out of order on purpose
            cands.append({"problem_id": pid, "candidate_id": cid, "task": "math500", "answer": ans, "correct": ok})
            scores[(pid, cid)] = {"aggregates": {"min": 1.0 if ok else -1.0, "last": None if ans is None else 0.0}}
    return cands, scores


def test_build_problems_groups_and_orders():
    cands, scores = _records()
    probs = build_problems(cands, scores, ["min", "last"])
    p1, p2 = probs
    assert p1.problem_id == "m1" and p1.keys[0] == p1.keys[1] != p1.keys[2]  # \frac12 and 0.5 vote together
    assert p1.correct.tolist() == [True, True, False, False]
    assert p2.keys[3] is None and p2.scores["last"][3] == -float("inf")
    with pytest.raises(ValueError, match="has no score"):
        build_problems(cands, {}, ["min"])


def test_build_table_defaults_and_markdown():
    cands, scores = _records()
    table = build_table(build_problems(cands, scores, ["min"]), n_bootstrap=50)
    assert [r["method"] for r in table["methods"]] == ["random", "majority", "bon:min", "wmv:min:raw",
                                                       "wmv:min:sigmoid", "wmv:min:softmax", "pass@N"]
    assert table["ns"] == [1, 2, 4]
    rows = {r["method"]: r["cells"] for r in table["methods"]}
    assert rows["bon:min"]["4"]["accuracy"] == 100.0  # scores separate right from wrong
    assert rows["majority"]["4"]["accuracy"] == 50.0  # m1: {1/2, 0.5} wins; m2: 7 wins (wrong)
    assert rows["random"]["1"]["accuracy"] == pytest.approx(37.5)
    md = table_markdown(table, "t")
    assert md.startswith("### t") and "| majority vote | " in md and "50.0 [" in md
    assert method_label("wmv:q_last:softmax") == "weighted vote, q_last, softmax weights"

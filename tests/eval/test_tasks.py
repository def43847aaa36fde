"""Task loaders and the generated arithmetic task."""

import json

import pytest

from freeprm.eval.tasks import PROMPTS, default_data_dir, load_gsm8k, load_math500, load_task, make_arith


def test_arith_is_seeded_and_graded():
    a, b = make_arith(24, seed=0), make_arith(24, seed=0)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in make_arith(24, seed=1)] != [p.question for p in a]
    assert [p.meta["level"] for p in a[:8]] == [1, 2, 3, 4, 1, 2, 3, 4]
    assert len({p.problem_id for p in a}) == 24
    for p in a:
        assert int(p.gold) >= 0 and p.question.endswith("have now?")
        assert p.question.count("Then") + p.question.count("A friend") + p.question.count("loses") == p.meta["level"]
    lv = make_arith(6, seed=2, levels=(2,))
    assert {p.meta["level"] for p in lv} == {2}
    with pytest.raises(ValueError):
        make_arith(3, levels=())


def test_arith_answers_recomputed():
    # level-1 problems are one addition or subtraction: recompute them from the text
    import re

    for p in make_arith(40, seed=5, levels=(1,)):
        nums = [int(x) for x in re.findall(r"\d+", p.question)]
        start, k = nums[0], nums[1]
        assert int(p.gold) in (start + k, start - k)
        assert int(p.gold) == (start - k if ("gives away" in p.question or "loses" in p.question) else start + k)


def test_load_task_offsets_and_prompts():
    probs = load_task("arith", limit=5, offset=3, seed=0)
    assert [p.problem_id for p in probs] == [f"arith-s0-{i}" for i in range(3, 8)]
    assert "{question}" not in probs[0].prompt() and probs[0].question in probs[0].prompt()
    assert probs[0].prompt("Q: {question}") == "Q: " + probs[0].question
    with pytest.raises(ValueError, match="task must be"):
        load_task("aime")
    assert set(PROMPTS) == {"gsm8k", "arith", "math500"}


def test_data_dir_from_env(tmp_path, monkeypatch):
    rows = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}, {"question": "big?", "answer": "#### 1,000"}]
    (tmp_path / "gsm8k_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("FREEPRM_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    probs = load_gsm8k()
    assert [(p.problem_id, p.gold) for p in probs] == [("gsm8k-test-0", "2"), ("gsm8k-test-1", "1000")]
    with pytest.raises(ValueError, match="data file not found"):
        load_math500()


def test_shared_data_loaders(shared_data):
    shared_data("math500.jsonl", "gsm8k_test.jsonl")
    m = load_math500(limit=3)
    assert m[0].problem_id == "test/precalculus/807.json" and m[0].task == "math500" and m[0].grader_task == "math"
    g = load_gsm8k(limit=2)
    assert g[0].gold == "18" and g[1].gold == "3"
    s1, s2 = load_gsm8k(limit=4, shuffle_seed=1), load_gsm8k(limit=4, shuffle_seed=1)
    assert [p.problem_id for p in s1] == [p.problem_id for p in s2] != [p.problem_id for p in load_gsm8k(limit=4)]

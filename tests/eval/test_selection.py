"""Voting, selection and accuracy@N on synthetic candidates with known answers."""

import numpy as np
import pytest

from freeprm.eval.selection import (
    CandidateSet,
    accuracy_at_n,
    default_methods,
    default_ns,
    parse_method,
    select,
    vote,
    weights_from_scores,
)


def test_vote_counts_and_tie_break():
    assert vote(["a", "b", "b", "c"]) == "b"
    assert vote(["a", "b", "b", "a"]) == "a"  # tie on count: earliest first occurrence
    assert vote(["b", "a", "a", "b"]) == "b"
    assert vote([None, None, "x"]) == "x"  # None does not vote
    assert vote([None, None]) is None and vote([]) is None


def test_weighted_vote():
    assert vote(["a", "b", "b"], [0.9, 0.4, 0.4]) == "a"
    assert vote(["a", "b", "b"], [0.5, 0.25, 0.25]) == "b"  # equal total weight: more votes wins
    assert vote(["a", "b"], [0.5, 0.5]) == "a"  # equal weight and votes: earliest wins
    assert vote(["a", "b"], [-1.0, -2.0]) == "a"  # raw (negative) weights
    assert vote(["a", "b", "b"], [-1.0, -1.0, -1.0]) == "a"  # negative raw sums penalize repeats
    with pytest.raises(ValueError, match="weights has"):
        vote(["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        vote(["a"], [float("nan")])


def test_weights_from_scores():
    s = np.array([0.0, 2.0, -np.inf])
    np.testing.assert_allclose(weights_from_scores(s, "raw"), [0.0, 2.0, 0.0])
    np.testing.assert_allclose(weights_from_scores(s, "sigmoid"), [0.5, 1 / (1 + np.exp(-2)), 0.0])
    sm = weights_from_scores(s, "softmax")
    np.testing.assert_allclose(sm.sum(), 1.0)
    np.testing.assert_allclose(sm[:2], np.exp([0.0, 2.0]) / np.exp([0.0, 2.0]).sum())
    assert sm[2] == 0
    np.testing.assert_allclose(weights_from_scores(np.array([-np.inf]), "softmax"), [0.0])
    with pytest.raises(ValueError, match="weighting"):
        weights_from_scores(s, "exp")


def _problem():
    # candidates: A (correct) once with the best min score, B (wrong) three times with middling scores
    keys = ["B", "A", "B", "B", None]
    correct = [False, True, False, False, False]
    scores = {"min": np.array([-3.0, -0.5, -2.0, -2.5, -0.1]), "last": np.array([5.0, 1.0, 0.0, 0.0, 0.0])}
    return CandidateSet("p", keys, correct, scores)


def test_select_known_answers():
    p = _problem()
    idx = range(5)
    assert select(p, idx, "pass@N") == 1.0
    assert select(p, idx, "random") == pytest.approx(0.2)
    assert select(p, idx, "majority") == 0.0  # B wins the count
    assert select(p, idx, "bon:min") == 0.0  # the no-answer candidate has the highest min score
    assert select(p, [0, 1, 2, 3], "bon:min") == 1.0
    assert select(p, idx, "bon:last") == 0.0
    # softmax weights: A exp(-0.5) vs B exp(-3)+exp(-2)+exp(-2.5): A wins
    assert select(p, idx, "wmv:min:softmax") == 1.0
    # sigmoid weights: A 0.38 vs B 0.05+0.12+0.08 = 0.25: A wins
    assert select(p, idx, "wmv:min:sigmoid") == 1.0
    # raw weights: A -0.5 vs B -7.5: A wins; with "last" raw B has 5.0
    assert select(p, idx, "wmv:min:raw") == 1.0
    assert select(p, idx, "wmv:last:raw") == 0.0
    with pytest.raises(ValueError, match="needs scores 'q_min'"):
        select(p, idx, "bon:q_min")


def test_bon_ties_go_to_first_candidate():
    p = CandidateSet("t", ["a", "b"], [True, False], {"min": np.array([1.0, 1.0])})
    assert select(p, [0, 1], "bon:min") == 1.0
    assert select(p, [1, 0], "bon:min") == 0.0


@pytest.mark.parametrize("bad", ["bon", "wmv:min", "wmv:min:exp", "best", "majority:min"])
def test_parse_method_rejects(bad):
    with pytest.raises(ValueError, match="unknown method"):
        parse_method(bad)


def test_default_ns_and_methods():
    assert default_ns(8) == [1, 2, 4, 8]
    assert default_ns(6) == [1, 2, 4, 6]
    assert default_ns(1) == [1]
    m = default_methods(("min",))
    assert m[0] == "random" and m[-1] == "pass@N" and "bon:min" in m and "wmv:min:softmax" in m
    assert default_methods(scored=False) == ["random", "majority", "pass@N"]


def _synthetic(n_problems=40, n_cand=8, seed=0, signal=1.0):
    """Problems whose candidates are right with probability 0.35; score = signal * correct + noise."""
    rng = np.random.default_rng(seed)
    probs = []
    for i in range(n_problems):
        correct = rng.random(n_cand) < 0.35
        wrong_answers = rng.integers(1, 4, n_cand)  # wrong answers spread over 3 values
        keys = [0 if c else int(w) for c, w in zip(correct, wrong_answers)]
        score = signal * correct + rng.normal(0, 0.3, n_cand)
        probs.append(CandidateSet(f"p{i}", keys, correct, {"min": score}))
    return probs


def test_accuracy_at_n_known_values():
    probs = _synthetic()
    methods = ["random", "majority", "bon:min", "wmv:min:sigmoid", "pass@N"]
    res = accuracy_at_n(probs, methods, n_subsets=50, n_bootstrap=200, seed=0)
    assert sorted(res["random"]) == [1, 2, 4, 8]
    mean_correct = np.mean([p.correct.mean() for p in probs])
    any_correct = np.mean([p.correct.any() for p in probs])
    assert res["random"][8].accuracy == pytest.approx(mean_correct)  # exact at N = Nmax (one subset)
    for n in (1, 2, 4):
        assert res["random"][n].accuracy == pytest.approx(mean_correct)  # exact expectation at every N
        assert res["pass@N"][n].accuracy >= res["random"][n].accuracy - 0.03
    assert res["pass@N"][8].accuracy == pytest.approx(any_correct)
    assert res["pass@N"][1].accuracy == pytest.approx(res["random"][1].accuracy)  # 8 subsets <= 50: all enumerated
    pass_at = [res["pass@N"][n].accuracy for n in (1, 2, 4, 8)]
    assert pass_at == sorted(pass_at)
    # scores that separate right from wrong: best-of-N reaches the oracle
    for n in (1, 2, 4, 8):
        assert res["bon:min"][n].accuracy == pytest.approx(res["pass@N"][n].accuracy, abs=0.02)
        assert res["bon:min"][n].accuracy >= res["majority"][n].accuracy - 1e-9
        c = res["bon:min"][n]
        assert c.ci_low <= c.accuracy <= c.ci_high
    c = res["majority"][2]  # 40 problems: the CI is not degenerate
    assert c.ci_high - c.ci_low > 0.02


def test_accuracy_at_n_anti_correlated_scores_hurt():
    probs = _synthetic(signal=-1.0, seed=1)
    res = accuracy_at_n(probs, ["random", "bon:min"], n_subsets=30, n_bootstrap=100, seed=0)
    assert res["bon:min"][8].accuracy < 0.5 * res["random"][8].accuracy


def test_accuracy_at_n_is_deterministic():
    probs = _synthetic(n_problems=10)
    a = accuracy_at_n(probs, ["majority", "bon:min"], n_subsets=20, n_bootstrap=100, seed=3)
    b = accuracy_at_n(probs, ["majority", "bon:min"], n_subsets=20, n_bootstrap=100, seed=3)
    for m in a:
        for n in a[m]:
            assert (a[m][n].accuracy, a[m][n].ci_low, a[m][n].ci_high) == (b[m][n].accuracy, b[m][n].ci_low,
                                                                           b[m][n].ci_high)


def test_accuracy_at_n_validates():
    probs = _synthetic(n_problems=3)
    with pytest.raises(ValueError, match="N must be in"):
        accuracy_at_n(probs, ["random"], [16])
    with pytest.raises(ValueError, match="no problems"):
        accuracy_at_n([], ["random"])
    with pytest.raises(ValueError, match="entries for"):
        CandidateSet("x", ["a"], [True], {"min": [1.0, 2.0]})


def test_subsets_enumerate_when_few():
    from freeprm.eval.selection import subsets

    rng = np.random.default_rng(0)
    all2 = subsets(4, 2, 10, rng)
    assert all2.shape == (6, 2) and {tuple(r) for r in all2} == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)}
    assert subsets(4, 4, 1, rng).tolist() == [[0, 1, 2, 3]]
    drawn = subsets(10, 5, 7, rng)  # C(10, 5) = 252 > 7: sampled without replacement
    assert drawn.shape == (7, 5) and all(len(set(r)) == 5 for r in drawn.tolist())

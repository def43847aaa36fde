"""The search-and-learn adapter against a stand-in of that project's PRM interface and aggregations."""

import math

import pytest

from freeprm.engine import Scorer
from freeprm.integrations.search_and_learn import SearchAndLearnPRM


def sal_aggregate(scores: list[float], strategy: str) -> float:
    """Stand-in of search-and-learn's step-score aggregation (``last``, ``min``, ``prod``)."""
    if strategy == "last":
        return scores[-1]
    if strategy == "min":
        return min(scores)
    if strategy == "prod":
        return math.prod(scores)
    raise ValueError(strategy)


class SalConfig:  # the fields of search-and-learn's Config the adapter reads
    prm_batch_size = 2
    prm_path = "freeprm:tiny"


QUESTIONS = ["What is 2 + 2?", "How many clips did Natalia sell?"]
ANSWERS = [["2 + 2 = 4.\n\nThe answer is 4.", "2 + 2 = 5.\n\nThe answer is 5.\n\n", "\n\n4."],
           ["She sold 48 / 2 = 24 in May.\n\n48 + 24 = 72.\n\n\n\nThe answer is 72.", "   "]]


@pytest.fixture(scope="module")
def scorer(tiny_model_dir, tiny_ref_dir):
    return Scorer(tiny_model_dir, tiny_ref_dir, prompt_format="raw", beta=0.05)


@pytest.mark.parametrize("calibration", ["q", "step"])
def test_one_score_in_0_1_per_step_and_the_aggregations_work(scorer, calibration):
    prm = SearchAndLearnPRM(SalConfig(), scorer=scorer, calibration=calibration)
    out = prm.score(QUESTIONS, ANSWERS)
    assert len(out) == 2 and [len(x) for x in out] == [3, 2]
    for answers, scores in zip(ANSWERS, out):
        for a, s in zip(answers, scores):
            assert len(s) == len(a.split("\n\n"))  # one score per "\n\n" piece
            assert all(0.0 <= v <= 1.0 for v in s)
            for strategy in ("last", "min", "prod"):
                assert 0.0 <= sal_aggregate(s, strategy) <= 1.0
    # the values: sigmoid of the Scorer's Q values (or step rewards), blank pieces take their owner's
    res = scorer.score([{"prompt": QUESTIONS[1], "response": ANSWERS[1][0]}])[0]
    v = (res.q_values if calibration == "q" else res.step_rewards).tolist()
    sig = [1 / (1 + math.exp(-x)) for x in v]
    assert out[1][0] == pytest.approx([sig[0], sig[1], sig[1], sig[2]], rel=1e-6)  # "" piece -> step 1's
    res0 = scorer.score([{"prompt": QUESTIONS[0], "response": ANSWERS[0][1]}])[0]
    v0 = (res0.q_values if calibration == "q" else res0.step_rewards).tolist()
    assert out[0][1] == pytest.approx([1 / (1 + math.exp(-x)) for x in v0] + [1 / (1 + math.exp(-v0[-1]))], rel=1e-6)
    assert out[0][2][0] == out[0][2][1]  # a leading blank piece belongs to step 0
    assert out[1][1] == [0.5]  # no text: no evidence


def test_last_ranks_by_the_outcome_probability(scorer):
    """calibration='q' + last = sigmoid(total log-ratio): search-and-learn's pick equals the Scorer's q_last pick."""
    prm = SearchAndLearnPRM(scorer=scorer)
    (scores,) = prm.score(QUESTIONS[:1], [ANSWERS[0][:2]])
    sal_pick = max(range(2), key=lambda j: sal_aggregate(scores[j], "last"))
    res = scorer.score([{"prompt": QUESTIONS[0], "response": a} for a in ANSWERS[0][:2]], aggregate="q_last")
    assert sal_pick == max(range(2), key=lambda j: res[j].score)
    assert scores[0][-1] == pytest.approx(1 / (1 + math.exp(-res[0].score)), rel=1e-6)


def test_scale_and_bad_arguments(tiny_model_dir, scorer):
    raw = SearchAndLearnPRM(policy=tiny_model_dir, prompt_format="raw")  # reference-free, beta 1: log-probs
    wide = SearchAndLearnPRM(scorer=raw.scorer, scale=0.01)
    s_raw = raw.score(QUESTIONS[:1], [ANSWERS[0][:1]])[0][0]
    s_wide = wide.score(QUESTIONS[:1], [ANSWERS[0][:1]])[0][0]
    assert s_raw[-1] < 1e-6 < s_wide[-1] < 1  # saturated without scaling; scale keeps it informative
    with pytest.raises(ValueError, match="calibration"):
        SearchAndLearnPRM(scorer=scorer, calibration="prob")
    with pytest.raises(ValueError, match="scale"):
        SearchAndLearnPRM(scorer=scorer, scale=0)
    with pytest.raises(ValueError, match="not both"):
        SearchAndLearnPRM(scorer=scorer, policy=tiny_model_dir)
    with pytest.raises(ValueError, match="step_delimiter"):
        SearchAndLearnPRM(scorer=Scorer(tiny_model_dir, step_delimiter="\n"))
    with pytest.raises(ValueError, match="questions but"):
        SearchAndLearnPRM(scorer=scorer).score(QUESTIONS, ANSWERS[:1])
    with pytest.raises(ValueError, match="expected a string"):
        SearchAndLearnPRM(scorer=scorer).score(QUESTIONS[:1], [[3]])


def test_load_prm_snippet_from_the_docs(tiny_model_dir):
    """The lines docs/search.md tells a user to add to search-and-learn's load_prm build a working PRM."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "search.md").read_text()
    snippet = re.search(r"```python\n(    if config\.prm_path\.startswith.*?)```", doc, re.S).group(1)
    ns = {}
    exec("def load_prm(config):\n" + snippet + "    raise NotImplementedError\n", ns)
    cfg = SalConfig()
    cfg.prm_path = "freeprm:" + tiny_model_dir
    prm = ns["load_prm"](cfg)
    assert isinstance(prm, SearchAndLearnPRM) and prm.search_config is cfg
    out = prm.score(QUESTIONS[:1], [ANSWERS[0][:1]])
    assert len(out[0][0]) == 2

"""ImplicitPRM(config=ScoringConfig): keywords win, unset fields keep ImplicitPRM's defaults or come from a PRM
directory's freeprm_prm.json; the rewards are the keyword form's, bit for bit."""

import warnings

import pytest
import torch

from freeprm import ScoringConfig
from freeprm.engine import Scorer
from freeprm.prm_meta import PRMMetaWarning, read_meta
from freeprm.rl import ImplicitPRM, encode_batch

PROMPTS = ["What is 48 / 2?", "How many clips?"]
RESPONSES = ["48 / 2 = 24.\n\nThe answer is 24.", "She sold 48 + 24 = 72 clips.\n\nSo 72.\n\nThe answer is 72."]


def _rewards(prm):
    ids, am, rm = encode_batch(prm.tokenizer, PROMPTS, RESPONSES)
    return prm.token_rewards(ids, am, rm)


def test_config_equals_keywords_bit_for_bit(tiny_model_dir, tiny_ref_dir):
    kw = ImplicitPRM(tiny_model_dir, tiny_ref_dir, beta=0.5, granularity="step", step_delimiter="\n\n")
    cfg = ImplicitPRM(tiny_model_dir, config=ScoringConfig(beta=0.5, reference=tiny_ref_dir), granularity="step")
    assert cfg.beta == 0.5 and cfg.reference_kind == "model" and cfg.scoring_config.beta == 0.5
    torch.testing.assert_close(_rewards(cfg), _rewards(kw), atol=0, rtol=0)
    # keywords win over the config
    over = ImplicitPRM(tiny_model_dir, "none", config=ScoringConfig(beta=2.0, reference=tiny_ref_dir), beta=0.5)
    assert over.beta == 0.5 and over.reference_kind == "none" and over.scoring_config.reference == "none"
    torch.testing.assert_close(_rewards(over), _rewards(ImplicitPRM(tiny_model_dir, "none", beta=0.5)), atol=0,
                               rtol=0)
    # reference_free in the config is "none"; a config with no reference keeps the frozen default
    assert ImplicitPRM(tiny_model_dir, config=ScoringConfig(reference_free=True)).reference_kind == "none"
    assert ImplicitPRM(tiny_model_dir, config=ScoringConfig(beta=0.5)).reference_kind == "frozen"


def test_config_step_pattern_dtype_and_score_options(tiny_model_dir):
    pattern = ImplicitPRM(tiny_model_dir, "none", config=ScoringConfig(step_pattern=r"\n\n"), granularity="step")
    delim = ImplicitPRM(tiny_model_dir, "none", step_delimiter="\n\n", granularity="step")
    torch.testing.assert_close(_rewards(pattern), _rewards(delim), atol=0, rtol=0)
    one = ImplicitPRM(tiny_model_dir, "none", config=ScoringConfig(step_delimiter=""), granularity="step")
    assert one.step_delimiter is None
    assert int((_rewards(one) != 0).sum()) == len(RESPONSES)  # one step each: the sum on the last token
    assert next(ImplicitPRM(tiny_model_dir, "none", config=ScoringConfig(dtype="float64")).model.parameters()).dtype \
        == torch.float64
    assert next(ImplicitPRM(tiny_model_dir, "none", config=ScoringConfig(dtype="auto")).model.parameters()).dtype \
        == torch.float32  # auto: float32, as in training
    prm = ImplicitPRM(tiny_model_dir, "none", config=ScoringConfig(aggregate="sum", prompt_format="raw"))
    items = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES)]
    res = prm.score(items)
    assert prm._scorer.aggregate_name == "sum" and prm._scorer.prompt_format == "raw"
    for x in res:
        assert x.score == pytest.approx(float(x.step_rewards.sum()))
    with pytest.raises(ValueError, match="beta must be"):
        ImplicitPRM(tiny_model_dir, "none", beta=-1.0)
    with pytest.raises(ValueError, match="config must be a freeprm.ScoringConfig"):
        ImplicitPRM(tiny_model_dir, "none", config={"beta": 0.5})


def test_from_pretrained_fills_unset_from_metadata(tiny_model_dir, tmp_path):
    prm = ImplicitPRM(tiny_model_dir, "frozen", config=ScoringConfig(beta=0.5, prompt_format="raw"), lr=1e-2)
    ids, am, rm = encode_batch(prm.tokenizer, PROMPTS, RESPONSES)
    prm.update(ids, am, rm, torch.tensor([1.0, 0.0]))
    r = prm.token_rewards(ids, am, rm)
    prm.save_pretrained(tmp_path / "p")
    assert read_meta(tmp_path / "p").scoring.prompt_format == "raw"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PRMMetaWarning)
        loaded = ImplicitPRM.from_pretrained(tmp_path / "p", config=ScoringConfig(aggregate="sum"))
    assert loaded.beta == 0.5 and loaded.scoring_config.prompt_format == "raw"
    assert loaded.scoring_config.aggregate == "sum" and loaded.reference_kind == "frozen"
    torch.testing.assert_close(loaded.token_rewards(ids, am, rm), r, atol=0, rtol=0)
    with pytest.warns(PRMMetaWarning, match="beta: using the given 2.0"):
        assert ImplicitPRM.from_pretrained(tmp_path / "p", config=ScoringConfig(beta=2.0)).beta == 2.0
    with pytest.warns(PRMMetaWarning, match="beta: using the given 3.0"):  # keyword over config
        assert ImplicitPRM.from_pretrained(tmp_path / "p", config=ScoringConfig(beta=2.0), beta=3.0).beta == 3.0
    with pytest.warns(PRMMetaWarning, match="prompt_format: using the given 'chat'"):
        ImplicitPRM.from_pretrained(tmp_path / "p", config=ScoringConfig(prompt_format="chat"))
    # a reference-free config is a given reference
    assert ImplicitPRM.from_pretrained(tmp_path / "p", config=ScoringConfig(reference_free=True)).reference is None


def test_from_pretrained_of_a_trained_directory_uses_its_recorded_reference(tiny_model_dir, tiny_ref_dir, tmp_path):
    """A directory ``freeprm train`` writes records its reference (the initial policy) and no implicit_prm part:
    from_pretrained loads that reference, so its rewards are the Scorer's (it loaded reference-free before)."""
    from freeprm.config import ScoringConfig as SC
    from freeprm.prm_meta import content_digest, meta_dict, write_meta

    d = tmp_path / "trained"
    ImplicitPRM(tiny_model_dir, "none").save_pretrained(d)
    ref = str(tiny_ref_dir)
    write_meta(d, meta_dict(SC(beta=0.05, reference=ref), reference_digest=content_digest(ref),
                            training={"trainer": "freeprm.trainer", "loss": "ce"}))
    loaded = ImplicitPRM.from_pretrained(d)
    assert loaded.reference_kind == "model" and loaded.reference is not None and loaded.beta == 0.05
    assert loaded.scoring_config.reference == ref
    items = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, RESPONSES)]
    ids, am, rm = encode_batch(loaded.tokenizer, PROMPTS, RESPONSES)
    r = loaded.token_rewards(ids, am, rm)
    for b, x in enumerate(Scorer(str(d)).score(items)):
        torch.testing.assert_close(x.token_rewards, r[b][rm[b]], atol=1e-5, rtol=1e-5)

"""Scorer vs the naive full-logits computation, aggregations, batch invariance, bad inputs (tiny random Llama)."""

import math

import pytest
import torch

from freeprm.engine import AGGREGATIONS, Scorer, load_model, score
from freeprm.engine.tokenization import encode

ITEMS = [
    {"prompt": "What is 48 / 2?", "response": "Step 1: 48 / 2 = 24.\n\nThe answer is 24.", "id": "a"},
    {"prompt": "How many clips?", "steps": ["She sold 48 clips.", "Then 24 more.", "#### 72"], "id": "b"},
    {"prompt": "Short", "response": "72"},
    {"prompt": "Weng earns $12 an hour for babysitting. How much did she earn?",
     "response": "  Café naïve 🙂 step\n\n\n\nx = 5 so \\boxed{5}\n\n", "id": "d"},
]


@pytest.mark.parametrize("with_ref", [False, True])
def test_token_rewards_match_naive(tiny_model_dir, tiny_ref_dir, with_ref, naive_rewards):
    """Independent computation: the item tokenized here, full logits -> log_softmax -> gather, one sequence at a time."""
    ref = tiny_ref_dir if with_ref else None
    results = score(ITEMS, policy=tiny_model_dir, reference=ref, beta=0.7)
    model, tok = load_model(tiny_model_dir)
    ref_model = load_model(ref)[0] if with_ref else None
    for item, r in zip(ITEMS, results):
        enc = encode(tok, item["prompt"], item.get("response") or "\n\n".join(item["steps"]))
        expected = naive_rewards(model, ref_model, enc.input_ids, enc.response_start, 0.7)
        assert r.token_rewards.shape == expected.shape
        assert torch.allclose(r.token_rewards, expected, atol=1e-5, rtol=0), (r.token_rewards - expected).abs().max()
        assert (r.ref_logprobs is not None) == with_ref


def test_steps_q_values_and_aggregations(tiny_model_dir):
    results = score(ITEMS, policy=tiny_model_dir)
    for r in results:
        s = len(r.steps)
        expected_steps = torch.stack([r.token_rewards[r.token_steps == k].sum() for k in range(s)])
        assert torch.allclose(r.step_rewards, expected_steps, atol=1e-5)
        assert torch.allclose(r.q_values, torch.cumsum(expected_steps, 0), atol=1e-4)
        assert r.score == pytest.approx(float(expected_steps.min()), rel=1e-6, abs=1e-5)
        assert r.aggregation == "min"
        want = {"min": expected_steps.min(), "last": expected_steps[-1], "mean": expected_steps.mean(),
                "sum": expected_steps.sum(), "q_min": torch.cumsum(expected_steps, 0).min(),
                "q_last": torch.cumsum(expected_steps, 0)[-1], "q_mean": torch.cumsum(expected_steps, 0).mean(),
                "q_sum": torch.cumsum(expected_steps, 0).sum()}
        assert set(want) == set(AGGREGATIONS)
        for name, value in want.items():
            assert r.aggregate(name) == pytest.approx(float(value), rel=1e-6, abs=1e-4), name
        # token_steps is non-decreasing and covers every step of these inputs
        assert bool((r.token_steps[1:] >= r.token_steps[:-1]).all())
        assert r.token_steps.unique().tolist() == list(range(s))
        assert int(r.input_ids.shape[0]) == r.response_start + len(r.token_rewards)
    assert [r.steps for r in results][1] == ["She sold 48 clips.", "Then 24 more.", "#### 72"]
    assert results[3].steps == ["  Café naïve 🙂 step", "x = 5 so \\boxed{5}"]
    assert results[0].meta == {"id": "a"}


@pytest.mark.parametrize("aggregate", ["last", "q_mean"])
def test_aggregate_argument_sets_score(tiny_model_dir, aggregate):
    r = score(ITEMS[:1], policy=tiny_model_dir, aggregate=aggregate)[0]
    assert r.score == pytest.approx(r.aggregate(aggregate))
    assert r.aggregation == aggregate


def test_batch_invariance(tiny_model_dir, tiny_ref_dir):
    target = ITEMS[0]
    others = [ITEMS[3], {"prompt": "x", "response": "y"}, ITEMS[1], {"prompt": "p " * 30, "response": "long " * 40}]
    alone = Scorer(tiny_model_dir, tiny_ref_dir).score([target])[0]
    for side in ("right", "left"):
        for max_batch_tokens in (8192, 200):
            scorer = Scorer(tiny_model_dir, tiny_ref_dir, padding_side=side, max_batch_tokens=max_batch_tokens)
            batched = scorer.score(others[:2] + [target] + others[2:])[2]
            assert (batched.token_rewards - alone.token_rewards).abs().max() <= 1e-5, (side, max_batch_tokens)
            assert abs(batched.score - alone.score) <= 1e-5


def test_score_batch_tensor_form(tiny_model_dir):
    scorer = Scorer(tiny_model_dir)
    results = scorer.score(ITEMS)
    batch = scorer.score_batch(ITEMS)
    assert batch.token_rewards.shape == batch.mask.shape == batch.token_steps.shape
    for i, r in enumerate(results):
        n, k = len(r.token_rewards), len(r.step_rewards)
        assert torch.allclose(batch.token_rewards[i, :n], r.token_rewards)
        assert int(batch.mask[i].sum()) == n and float(batch.token_rewards[i, n:].abs().sum()) == 0.0
        assert torch.allclose(batch.step_rewards[i, :k], r.step_rewards)
        assert int(batch.step_mask[i].sum()) == k
        assert float(batch.scores[i]) == pytest.approx(r.score)


def test_token_rewards_matches_score(tiny_model_dir, tiny_ref_dir, naive_rewards):
    scorer = Scorer(tiny_model_dir, tiny_ref_dir, beta=2.0)
    r = scorer.score(ITEMS[:1])[0]
    ids = r.input_ids[None]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, r.response_start:] = True
    out = scorer.token_rewards(ids, torch.ones_like(ids), mask, with_logprobs=True)
    rewards, lp, lpr = out.rewards, out.logp, out.logp_ref
    assert torch.allclose(rewards[0, r.response_start:], r.token_rewards, atol=1e-6)
    # each model's log-probs against the naive full-logits computation of that model alone
    pol, ref = load_model(tiny_model_dir)[0], load_model(tiny_ref_dir)[0]
    rs = r.response_start
    assert torch.allclose(lp[0, rs:], naive_rewards(pol, None, r.input_ids, rs), atol=1e-5)
    assert torch.allclose(lpr[0, rs:], naive_rewards(ref, None, r.input_ids, rs), atol=1e-5)
    assert float(rewards[0, :rs].abs().sum()) == 0.0


def test_token_rewards_is_the_shared_protocol_and_the_old_name_is_a_deprecated_alias(tiny_model_dir, tiny_ref_dir):
    from freeprm.engine.protocols import TokenRewardSource
    from freeprm.rl import ImplicitPRM

    scorer = Scorer(tiny_model_dir, tiny_ref_dir, beta=2.0)
    prm = ImplicitPRM(tiny_model_dir, tiny_ref_dir, beta=2.0)
    assert isinstance(scorer, TokenRewardSource) and isinstance(prm, TokenRewardSource)
    r = scorer.score(ITEMS[:1])[0]
    ids = r.input_ids[None]
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, r.response_start:] = True
    new = scorer.token_rewards(ids, torch.ones_like(ids), mask)
    assert isinstance(new, torch.Tensor) and new.shape == ids.shape
    with pytest.warns(DeprecationWarning, match="token_rewards_from_ids"):
        old = scorer.token_rewards_from_ids(ids, torch.ones_like(ids), mask)
    assert torch.equal(old.rewards, new)
    torch.testing.assert_close(prm.token_rewards(ids, torch.ones_like(ids), mask), new, atol=1e-5, rtol=1e-5)


def test_reference_free_is_beta_times_logprob(tiny_model_dir, naive_rewards):
    r = score(ITEMS[:1], policy=tiny_model_dir, beta=3.0)[0]
    assert r.ref_logprobs is None
    model = load_model(tiny_model_dir)[0]
    logp = naive_rewards(model, None, r.input_ids, r.response_start)  # beta = 1: the log-probs themselves
    assert torch.allclose(r.token_logprobs, logp, atol=1e-5)
    assert torch.allclose(r.token_rewards, 3.0 * logp, atol=3e-5)
    assert bool((logp <= 0).all())


def test_to_dict_is_json_ready(tiny_model_dir):
    import json

    r = score(ITEMS[:1], policy=tiny_model_dir)[0]
    d = json.loads(json.dumps(r.to_dict(tokens=True)))
    assert d["id"] == "a" and d["score"] == pytest.approx(r.score)
    assert len(d["token_rewards"]) == len(r.token_rewards) and set(d["aggregates"]) == set(AGGREGATIONS)


def test_chat_and_raw_prompt_formats(tiny_model_dir):
    chat = score(ITEMS[:1], policy=tiny_model_dir, prompt_format="chat")[0]
    raw = score(ITEMS[:1], policy=tiny_model_dir, prompt_format="raw")[0]
    assert chat.response_start > raw.response_start
    assert torch.equal(chat.input_ids[chat.response_start:], raw.input_ids[raw.response_start:])
    assert not torch.allclose(chat.token_rewards, raw.token_rewards)


@pytest.mark.parametrize("item, match", [
    ({"prompt": "p", "response": ""}, "empty response"),
    ({"prompt": "p", "response": "   \n\n "}, "empty response"),
    ({"prompt": "p", "response": "one two", "steps": ["one", "three"]}, "not the next part"),
    ({"prompt": "p", "response": "one two three", "steps": ["one", "two"]}, "continues after the last step"),
    ({"prompt": "p", "steps": ["a", ""]}, "step 1 is empty"),
    ({"prompt": "p"}, "give 'response'"),
    ({"response": "r"}, "'prompt' must be a string"),
    ("just a string", "expected a dict"),
    ({"prompt": "p", "steps": "not a list"}, "must be a list"),
])
def test_bad_items_raise(tiny_model_dir, item, match):
    scorer = Scorer(tiny_model_dir)
    with pytest.raises(ValueError, match=match):
        scorer.score([ITEMS[0], item])


def test_over_length_input_raises_before_any_work(tiny_model_dir):
    scorer = Scorer(tiny_model_dir, max_length=64)
    with pytest.raises(ValueError, match=r"item 1: \d+ tokens exceed max_length=64"):
        scorer.score([ITEMS[0], {"prompt": "p", "response": "word " * 100}])


def test_bad_options_raise(tiny_model_dir):
    for kwargs, match in [({"beta": 0}, "beta"), ({"aggregate": "median"}, "aggregate"),
                          ({"prompt_format": "xml"}, "prompt_format"), ({"padding_side": "middle"}, "padding_side"),
                          ({"step_pattern": "(unclosed"}, "regex"), ({"dtype": "float8"}, "dtype")]:
        with pytest.raises(ValueError, match=match):
            Scorer(tiny_model_dir, **kwargs)


def test_tokenizer_mismatch_raises(tiny_model_dir, tmp_path):
    from freeprm.testing import make_tiny_model_dir, make_tiny_tokenizer

    other = make_tiny_model_dir(tmp_path / "other", tokenizer=make_tiny_tokenizer(vocab_size=300))
    with pytest.raises(ValueError, match="tokenizers differ"):
        Scorer(tiny_model_dir, reference=other)


def test_nan_weights_raise(tmp_path):
    from safetensors.torch import load_file, save_file

    from freeprm.testing import make_tiny_model_dir

    d = make_tiny_model_dir(tmp_path / "nan")
    sd = load_file(f"{d}/model.safetensors")
    key = next(k for k in sd if "mlp" in k)
    sd[key][0, 0] = float("nan")
    save_file(sd, f"{d}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="NaN or Inf"):
        Scorer(d)


def test_pickle_checkpoint_refused(tmp_path):
    from freeprm.testing import make_tiny_model_dir

    d = make_tiny_model_dir(tmp_path / "pkl")
    model, _ = load_model(d)
    torch.save(model.state_dict(), f"{d}/pytorch_model.bin")
    import os

    os.remove(f"{d}/model.safetensors")
    with pytest.raises(ValueError, match="allow_pickle"):
        Scorer(d)
    assert Scorer(d, allow_pickle=True).score(ITEMS[:1])[0].score < 0


def test_missing_model_raises(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Scorer(str(tmp_path / "nope" / "model"))


def test_scores_are_finite(tiny_model_dir):
    for r in score(ITEMS, policy=tiny_model_dir):
        assert math.isfinite(r.score)
        assert bool(torch.isfinite(r.token_rewards).all())


def test_fused_reference_kernel_path_matches_unfused(tiny_model_dir, tiny_ref_dir):
    # impl="triton" on CPU runs the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
    fused = Scorer(tiny_model_dir, tiny_ref_dir, beta=0.5, impl="triton", fuse_reference=True).score(ITEMS[:2])
    plain = Scorer(tiny_model_dir, tiny_ref_dir, beta=0.5, impl="torch").score(ITEMS[:2])
    for f, p in zip(fused, plain):
        assert f.token_logprobs is None and p.token_logprobs is not None  # the fused kernel ran
        assert (f.token_rewards - p.token_rewards).abs().max() <= 1e-4
        assert f.score == pytest.approx(p.score, abs=1e-4)
    unfused = Scorer(tiny_model_dir, tiny_ref_dir, beta=0.5, impl="triton").score(ITEMS[:1])[0]  # fusion is opt-in
    assert unfused.token_logprobs is not None
    assert (unfused.token_rewards - plain[0].token_rewards).abs().max() <= 1e-4


def test_bad_response_mask_raises(tiny_model_dir):
    scorer = Scorer(tiny_model_dir)
    ids = torch.tensor([[3, 4, 5, 6]])
    with pytest.raises(ValueError, match="first token"):
        scorer.token_rewards(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding"):
        scorer.token_rewards(ids, torch.tensor([[1, 1, 0, 0]]), torch.tensor([[False, True, True, True]]))

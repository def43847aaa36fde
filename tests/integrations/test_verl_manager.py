"""freeprm.integrations.verl.FreePRMRewardManager, called on a stand-in for verl's DataProto (verl not installed)."""

import numpy as np
import pytest
import torch

from freeprm.engine.steps import decoded_offsets
from freeprm.integrations.verl import FreePRMRewardManager

ITEMS = [{"prompt": "What is 48 / 2 + 48?", "response": "48 / 2 = 24.\n\n24 + 48 = 72.\n\nThe answer is 72."},
         {"prompt": "What is 7 * 6?", "response": "7 * 6 = 42.\n\nThe answer is 42."},
         {"prompt": "Natalia sold clips.", "response": "She sold clips: 48 + 24 = 72."}]


class FakeDataProto:
    """The fields of verl's DataProto that reward managers read: ``batch`` (tensors) and ``non_tensor_batch``."""

    def __init__(self, batch, non_tensor_batch):
        self.batch, self.non_tensor_batch = batch, non_tensor_batch

    def __len__(self):
        return next(iter(self.batch.values())).shape[0]


def make_batch(scorer, items, pad_extra=2):
    """verl layout: prompts left-padded to P, responses right-padded to R, from the scorer's own tokenization."""
    prepared = [scorer.prepare(it, i) for i, it in enumerate(items)]
    p = max(x.response_start for x in prepared)
    r = max(len(x.input_ids) - x.response_start for x in prepared) + pad_extra
    b, pad = len(items), scorer.pad_id
    prompts, responses = torch.full((b, p), pad), torch.full((b, r), pad)
    am = torch.zeros(b, p + r, dtype=torch.long)
    for i, x in enumerate(prepared):
        pi, ri = x.input_ids[:x.response_start], x.input_ids[x.response_start:]
        prompts[i, p - len(pi):] = torch.tensor(pi)
        responses[i, :len(ri)] = torch.tensor(ri)
        am[i, p - len(pi):p + len(ri)] = 1
    nt = {"data_source": np.array(["arith"] * b, dtype=object),
          "reward_model": np.array([{"ground_truth": g} for g in ["72", "41", "72"][:b]], dtype=object),
          "extra_info": np.array([None] * b, dtype=object)}
    return FakeDataProto({"prompts": prompts, "responses": responses, "attention_mask": am}, nt)


def test_dense_rewards_equal_scorer(any_prm, tiny_scorer):
    data = make_batch(tiny_scorer, ITEMS)
    mgr = FreePRMRewardManager(tiny_scorer.tokenizer, 0, prm=any_prm)
    rt = mgr(data)
    want = tiny_scorer.score(ITEMS)
    assert rt.shape == data.batch["responses"].shape and rt.dtype == torch.float32
    for i, w in enumerate(want):
        n = len(w.token_rewards)
        assert torch.allclose(rt[i, :n], w.token_rewards, atol=1e-5)
        assert (rt[i, n:] == 0).all()
        assert w.token_rewards.abs().min() > 0  # every response token carries a reward
    out = mgr(data, return_dict=True)
    assert torch.equal(out["reward_tensor"], rt)
    assert out["reward_extra_info"]["prm_reward_sum"] == pytest.approx([float(w.q_values[-1]) for w in want], abs=1e-4)
    if hasattr(any_prm, "version"):
        assert out["reward_extra_info"]["prm_version"] == [any_prm.version] * len(ITEMS)


def test_step_rewards_on_last_token(tiny_scorer):
    data = make_batch(tiny_scorer, ITEMS)
    rt = FreePRMRewardManager(tiny_scorer.tokenizer, 0, prm=tiny_scorer, granularity="step")(data)
    for i, w in enumerate(tiny_scorer.score(ITEMS)):
        steps = w.token_steps
        last = [int((steps == k).nonzero().max()) for k in range(len(w.step_rewards))]
        want = torch.zeros(rt.shape[1])
        want[last] = w.step_rewards
        assert len(last) == len(ITEMS[i]["response"].split("\n\n"))
        assert torch.allclose(rt[i], want, atol=1e-5)


def test_empty_delimiter_is_one_step(tiny_scorer):
    """The one delimiter rule (freeprm.config): "" means no delimiter, the whole response is one step, whose summed
    reward sits on its last token (it was an error here before)."""
    data = make_batch(tiny_scorer, ITEMS)
    rt = FreePRMRewardManager(tiny_scorer.tokenizer, 0, prm=tiny_scorer, granularity="step", step_delimiter="")(data)
    for i, w in enumerate(tiny_scorer.score(ITEMS)):
        n = len(w.token_rewards)
        want = torch.zeros(rt.shape[1])
        want[n - 1] = w.token_rewards.sum()
        assert torch.allclose(rt[i], want, atol=1e-5)


def test_outcome_term(tiny_scorer):
    data = make_batch(tiny_scorer, ITEMS)
    seen = []

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        seen.append((data_source, solution_str))
        return {"score": float(ground_truth in solution_str)}

    dense = FreePRMRewardManager(tiny_scorer.tokenizer, 0, prm=tiny_scorer)(data)
    mgr = FreePRMRewardManager(tiny_scorer.tokenizer, 1, compute_score=compute_score, prm=tiny_scorer,
                               outcome_coef=2.0, prm_coef=0.5)
    out = mgr(data, return_dict=True)
    assert out["reward_extra_info"]["outcome_score"] == [1.0, 0.0, 1.0]
    assert [s for s, _ in seen] == ["arith"] * 3 and seen[1][1] == ITEMS[1]["response"]
    want = 0.5 * dense
    n = data.batch["attention_mask"][:, data.batch["prompts"].shape[1]:].sum(1)
    for i, o in enumerate([1.0, 0.0, 1.0]):
        want[i, n[i] - 1] += 2.0 * o
    assert torch.allclose(out["reward_tensor"], want, atol=1e-6)


def test_builds_scorer_from_policy_and_checks(tiny_model_dir, tiny_scorer):
    data = make_batch(tiny_scorer, ITEMS[:2])
    a = FreePRMRewardManager(tiny_scorer.tokenizer, 0, policy=tiny_model_dir, max_resp_len=64, overlong_buffer_cfg=None)
    b = FreePRMRewardManager(tiny_scorer.tokenizer, 1, policy=tiny_model_dir)
    assert a.prm is b.prm  # verl's train and validation managers share one loaded model
    want = a.prm.score(ITEMS[:2])
    rt = a(data)
    assert torch.allclose(rt[0, :len(want[0].token_rewards)], want[0].token_rewards, atol=1e-5)
    with pytest.raises(ValueError, match="prm= .* or policy="):
        FreePRMRewardManager(tiny_scorer.tokenizer, 0)
    with pytest.raises(ValueError, match="compute_score"):
        FreePRMRewardManager(tiny_scorer.tokenizer, 0, prm=tiny_scorer, outcome_coef=1.0)
    with pytest.raises(ValueError, match="granularity"):
        FreePRMRewardManager(tiny_scorer.tokenizer, 0, prm=tiny_scorer, granularity="sentence")
    from freeprm.testing import make_tiny_tokenizer

    with pytest.raises(ValueError, match="vocabulary"):
        FreePRMRewardManager(make_tiny_tokenizer(vocab_size=300), 0, prm=tiny_scorer)


def test_token_ends_with_split_characters(tiny_scorer):
    """Characters split across byte-level tokens: ends stay monotone and the last one is the text length."""
    tok = tiny_scorer.tokenizer
    ids = tok("数学 🙂 ok\n\nπ", add_special_tokens=False)["input_ids"]
    text, offsets = decoded_offsets(tok, ids)
    ends = [e for _, e in offsets]
    assert text == "数学 🙂 ok\n\nπ" and ends[-1] == len(text)
    assert all(a <= b for a, b in zip(ends, ends[1:]))

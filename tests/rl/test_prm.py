"""ImplicitPRM on the tiny random model: rewards and update against the naive full-logits path."""

import copy

import pytest
import torch
import torch.nn.functional as F

from freeprm.engine import Scorer
from freeprm.engine.logprobs import position_ids_from_mask, split_lm
from freeprm.engine.steps import split_steps, token_steps
from freeprm.engine.tokenization import encode, response_tokens
from freeprm.eval.metrics import auroc
from freeprm.rl import ImplicitPRM, encode_batch

ITEMS = [
    ("What is 48 / 2?", "48 / 2 = 24.\n\nThe answer is 24."),
    ("How many clips?", "She sold 48 + 24 = 72 clips.\n\nSo 72.\n\nThe answer is 72."),
    ("Let x be the number.", "3x + 5 = 20, so x = 5."),
    ("Weng earns $12 an hour.", "50 minutes is 5/6 of an hour.\n\n12 * 5/6 = 10.\n\n#### 10"),
]
OUTCOME = torch.tensor([1.0, 0.0, 1.0, 0.0])


def batch(tok, items=ITEMS, side="right"):
    """[B, T] input_ids, attention_mask, response_mask built with the engine's encoding."""
    encs = [encode(tok, p, r) for p, r in items]
    t = max(len(e.input_ids) for e in encs)
    ids = torch.full((len(encs), t), tok.pad_token_id, dtype=torch.long)
    am = torch.zeros(len(encs), t, dtype=torch.long)
    rm = torch.zeros(len(encs), t, dtype=torch.bool)
    for b, e in enumerate(encs):
        n = len(e.input_ids)
        o = t - n if side == "left" else 0
        ids[b, o:o + n] = torch.tensor(e.input_ids)
        am[b, o:o + n] = 1
        rm[b, o + e.response_start:o + n] = True
    return ids, am, rm


def naive_logprobs(model, ids, am, rm):
    logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    out = torch.zeros(ids.shape)
    out[:, 1:] = lp * rm[:, 1:]
    return out


def naive_rewards(prm, ids, am, rm):
    with torch.no_grad():
        lp = naive_logprobs(prm.model, ids, am, rm)
        lpr = naive_logprobs(prm.reference, ids, am, rm) if prm.reference is not None else 0.0
    return prm.beta * (lp - lpr) * rm


def naive_ce(prm, ids, am, rm, y):
    lp = naive_logprobs(prm.model, ids, am, rm)
    with torch.no_grad():
        lpr = naive_logprobs(prm.reference, ids, am, rm)
    r = prm.beta * ((lp - lpr) * rm).sum(-1)
    return F.binary_cross_entropy(torch.sigmoid(r), y)


@pytest.fixture
def prm(tiny_model_dir, tiny_ref_dir):
    return ImplicitPRM(tiny_model_dir, tiny_ref_dir, beta=0.5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_rewards_match_naive_and_do_not_depend_on_batch(prm, side):
    ids, am, rm = batch(prm.tokenizer, side=side)
    r = prm.token_rewards(ids, am, rm)
    assert r.shape == ids.shape and r.dtype == torch.float32
    torch.testing.assert_close(r, naive_rewards(prm, ids, am, rm), atol=1e-5, rtol=1e-5)
    assert bool((r[~rm] == 0).all()) and bool((r[rm] != 0).all())  # last response token included
    for b, item in enumerate(ITEMS):  # alone, unpadded
        ids1, am1, rm1 = batch(prm.tokenizer, [item])
        alone = prm.token_rewards(ids1, am1, rm1)
        torch.testing.assert_close(r[b][rm[b]], alone[0][rm1[0]], atol=1e-5, rtol=1e-5)


def test_step_granularity_places_step_sums_on_last_tokens(tiny_model_dir, tiny_ref_dir):
    dense = ImplicitPRM(tiny_model_dir, tiny_ref_dir, beta=0.5)
    stepped = ImplicitPRM(tiny_model_dir, tiny_ref_dir, beta=0.5, granularity="step")
    ids, am, rm = batch(dense.tokenizer, side="left")
    r_tok, r_step = dense.token_rewards(ids, am, rm), stepped.token_rewards(ids, am, rm)
    for b, (_, resp) in enumerate(ITEMS):
        _, offsets = response_tokens(dense.tokenizer, resp)
        steps = torch.tensor(token_steps(offsets, split_steps(resp)))
        tok_r, step_r = r_tok[b][rm[b]], r_step[b][rm[b]]
        expected = torch.zeros_like(tok_r)
        for k in range(int(steps.max()) + 1):
            where = (steps == k).nonzero().flatten()
            expected[where[-1]] = tok_r[where].sum()
        torch.testing.assert_close(step_r, expected, atol=1e-6, rtol=1e-5)
        assert int((step_r != 0).sum()) == len(split_steps(resp))
    assert bool((r_step[~rm] == 0).all())


def test_ref_logprobs_skip_the_reference_forward(prm):
    ids, am, rm = batch(prm.tokenizer)
    calls = []
    base = split_lm(prm.reference)[0]  # sequence_logprobs runs the base model, not the LM head module
    hook = base.register_forward_hook(lambda *a: calls.append(1))
    try:
        given = torch.randn(ids.shape) * rm
        r = prm.token_rewards(ids, am, rm, ref_logprobs=given)
        assert not calls
        lp = naive_logprobs(prm.model, ids, am, rm)
        torch.testing.assert_close(r, prm.beta * (lp - given) * rm, atol=1e-5, rtol=1e-5)
        prm.token_rewards(ids, am, rm)
        assert calls
    finally:
        hook.remove()


def test_policy_reference_needs_ref_logprobs(tiny_model_dir):
    prm = ImplicitPRM(tiny_model_dir, "policy")
    ids, am, rm = batch(prm.tokenizer)
    with pytest.raises(ValueError, match="ref_logprobs"):
        prm.token_rewards(ids, am, rm)
    with pytest.raises(ValueError, match="ref_logprobs"):
        prm.update(ids, am, rm, OUTCOME)
    lp = naive_logprobs(prm.model, ids, am, rm).detach()
    assert float(prm.token_rewards(ids, am, rm, ref_logprobs=lp).abs().max()) < 1e-5


def test_update_gradients_equal_naive(prm):
    prm.grad_clip = None
    prm.optimizer.param_groups[0]["lr"] = 0.0  # the step leaves the weights (and .grad) as they are
    ids, am, rm = batch(prm.tokenizer, side="left")
    naive = copy.copy(prm)
    naive.model = copy.deepcopy(prm.model)
    loss = naive_ce(naive, ids, am, rm, OUTCOME)
    loss.backward()
    metrics = prm.update(ids, am, rm, OUTCOME)
    pairs = list(zip(prm.model.named_parameters(), naive.model.named_parameters()))
    assert pairs
    for (name, p), (_, q) in pairs:
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4)
    assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert metrics["version"] == 1 and prm.version == 1


def test_update_lowers_ce_loss_and_bumps_version(tiny_model_dir, tiny_ref_dir):
    prm = ImplicitPRM(tiny_model_dir, tiny_ref_dir, beta=0.5, lr=3e-3, mini_batch_size=2)
    ids, am, rm = batch(prm.tokenizer)
    with torch.no_grad():
        before = float(naive_ce(prm, ids, am, rm, OUTCOME))
    for v in range(1, 4):
        m = prm.update(ids, am, rm, OUTCOME)
        assert m["version"] == v == prm.version and m["optimizer_steps"] == 2
        assert set(m) >= {"loss", "accuracy", "grad_norm", "version"}
    with torch.no_grad():
        after = float(naive_ce(prm, ids, am, rm, OUTCOME))
    assert after < before - 1e-3
    r = prm.token_rewards(ids, am, rm) * rm
    assert float(prm.update(ids, am, rm, OUTCOME)["accuracy"]) == ((r.sum(1) > 0) == (OUTCOME > 0.5)).float().mean()


def test_dpo_update_pairs_within_groups(tiny_model_dir):
    prm = ImplicitPRM(tiny_model_dir, "frozen", beta=0.5, lr=3e-3, loss="dpo")
    ids, am, rm = batch(prm.tokenizer)
    m = prm.update(ids, am, rm, OUTCOME, groups=torch.tensor([0, 0, 1, 1]))
    assert m["optimizer_steps"] == 1 and m["loss"] == pytest.approx(0.6931, abs=1e-3)  # frozen ref: rewards 0
    r = (prm.token_rewards(ids, am, rm)).sum(1)
    assert r[0] > r[1] and r[2] > r[3]
    m = prm.update(ids, am, rm, OUTCOME, groups=torch.tensor([0, 1, 2, 3]))  # no pair: no step
    assert m["optimizer_steps"] == 0 and prm.version == 2


def test_step_modes_order(tiny_model_dir):
    a = ImplicitPRM(tiny_model_dir, "frozen", beta=0.5, lr=1e-2)
    b = ImplicitPRM(tiny_model_dir, "frozen", beta=0.5, lr=1e-2)
    ids, am, rm = batch(a.tokenizer)
    r0 = a.token_rewards(ids, am, rm)
    assert float(r0.abs().max()) == 0.0  # frozen copy of itself
    out_after = a.step(ids, am, rm, OUTCOME, mode="after")
    assert out_after["version"] == 0 and out_after["metrics"]["version"] == 1 and a.version == 1
    torch.testing.assert_close(out_after["rewards"], r0)
    r1 = a.token_rewards(ids, am, rm)
    assert float(r1.abs().max()) > 0
    out_before = b.step(ids, am, rm, OUTCOME, mode="before")
    assert out_before["version"] == 1 and b.version == 1
    torch.testing.assert_close(out_before["rewards"], r1, atol=1e-6, rtol=1e-5)
    out_none = b.step(ids, am, rm, mode="none")
    assert out_none["metrics"] == {} and out_none["version"] == 1
    assert a.token_rewards(ids, am, rm, return_version=True).version == 1


def test_state_dict_and_save_load_round_trip(tiny_model_dir, tmp_path):
    prm = ImplicitPRM(tiny_model_dir, "frozen", beta=0.5, lr=1e-2)
    ids, am, rm = batch(prm.tokenizer, side="left")
    prm.update(ids, am, rm, OUTCOME)
    state = copy.deepcopy(prm.state_dict())
    r1 = prm.token_rewards(ids, am, rm)

    other = ImplicitPRM(tiny_model_dir, "frozen", beta=0.5, lr=1e-2)
    other.load_state_dict(state)
    assert other.version == 1
    torch.testing.assert_close(other.token_rewards(ids, am, rm), r1, atol=0, rtol=0)

    prm.save_pretrained(tmp_path / "prm")
    loaded = ImplicitPRM.from_pretrained(tmp_path / "prm")
    assert loaded.version == 1 and loaded.beta == 0.5 and loaded.reference_kind == "frozen"
    torch.testing.assert_close(loaded.token_rewards(ids, am, rm), r1, atol=0, rtol=0)
    # optimizer state came back too: the next update is the same in all three
    for p in (prm, other, loaded):
        p.update(ids, am, rm, OUTCOME)
    r2 = prm.token_rewards(ids, am, rm)
    torch.testing.assert_close(other.token_rewards(ids, am, rm), r2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loaded.token_rewards(ids, am, rm), r2, atol=1e-6, rtol=1e-5)

    # the saved directory is a policy for the engine's Scorer (reference in reference/)
    items = [{"prompt": p, "response": r} for p, r in ITEMS]
    scorer = Scorer(str(tmp_path / "prm"), str(tmp_path / "prm" / "reference"), beta=0.5)
    via_scorer = scorer.score(items)
    lefts = batch(prm.tokenizer, side="left")
    for b, res in enumerate(via_scorer):
        torch.testing.assert_close(res.token_rewards, r1[b][lefts[2][b]], atol=1e-5, rtol=1e-5)


def test_score_is_the_scorer_contract(prm):
    items = [{"prompt": p, "response": r} for p, r in ITEMS] + [{"prompt": "Q", "steps": ["a = 1.", "So 1."]}]
    results = prm.score(items, aggregate="min")
    ids, am, rm = batch(prm.tokenizer)
    r = prm.token_rewards(ids, am, rm)
    for b in range(len(ITEMS)):
        torch.testing.assert_close(results[b].token_rewards, r[b][rm[b]], atol=1e-5, rtol=1e-5)
        assert results[b].score == pytest.approx(float(results[b].step_rewards.min()))
        assert results[b].meta["prm_version"] == 0
    assert len(results[-1].step_rewards) == 2


def test_invalid_inputs(prm):
    ids, am, rm = batch(prm.tokenizer)
    with pytest.raises(ValueError, match="shape"):
        prm.token_rewards(ids, am[:, 1:], rm)
    with pytest.raises(ValueError, match=r"response_mask\[:, 0\]"):
        bad = rm.clone()
        bad[0, 0] = True
        prm.token_rewards(ids, am, bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prm.update(ids, am, rm, torch.tensor([1.0, 2.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="outcome"):
        prm.update(ids, am, rm, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="mode"):
        prm.step(ids, am, rm, OUTCOME, mode="later")
    with pytest.raises(ValueError, match="at least one response token"):
        prm.token_rewards(ids, am, torch.zeros_like(rm))
    with pytest.raises(ValueError, match="granularity"):
        ImplicitPRM(prm.model, "none", tokenizer=prm.tokenizer, granularity="word")
    with pytest.raises(ValueError, match="ref_logprobs"):
        prm.token_rewards(ids, am, rm, ref_logprobs=torch.zeros(2, 2))
    assert prm.version == 0  # nothing was updated by the failed calls


@pytest.mark.parametrize("side", ["right", "left"])
def test_encode_batch_matches_the_engine_encoding(prm, side):
    got = encode_batch(prm.tokenizer, [p for p, _ in ITEMS], [r for _, r in ITEMS], padding_side=side)
    for a, b in zip(got, batch(prm.tokenizer, side=side)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="pair 1"):
        encode_batch(prm.tokenizer, ["a", "b"], ["x", ""])


def test_auroc_counts_pairs():
    g = torch.Generator().manual_seed(0)
    s = (torch.randint(0, 5, (30,), generator=g)).tolist()  # ties included
    y = (torch.rand(30, generator=g) > 0.4).tolist()
    pos = [a for a, t in zip(s, y) if t]
    neg = [a for a, t in zip(s, y) if not t]
    brute = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(s, y) == pytest.approx(brute)
    assert auroc([1.0, 2.0], [True, True]) != auroc([1.0, 2.0], [True, True])  # nan: one class only

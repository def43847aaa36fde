"""Each loss against an independent float64 formula written with plain loops / log(sigmoid), values and grads.

Random inputs come from the global RNG, seeded before each test (the autouse ``seed`` fixture of tests/conftest.py).
"""

import math
from types import SimpleNamespace

import pytest
import torch

from freeprm.trainer import losses


def _rand(n, scale=3.0):
    return (torch.randn(n, dtype=torch.float64) * scale).float().requires_grad_()


def _grad_check(fn_impl, fn_ref, *tensors):
    """Both sides: value, and gradient of (random grad_output) * loss w.r.t. every input."""
    go = float(torch.randn(())) * 2.0
    out = fn_impl(*tensors)
    assert out.dim() == 0 and out.dtype == torch.float32
    (go * out).backward()
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    ref_in = [t.detach().double().requires_grad_() for t in tensors]
    ref = fn_ref(*ref_in)
    (go * ref).backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_in):
        torch.testing.assert_close(g.double(), r.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [1, 8, 37])
def test_ce_none(n):
    y = (torch.rand(n) > 0.4).float()
    y[0] = 0.3 if n > 1 else y[0]  # soft label allowed without balancing

    def ref(r):
        terms = [-(float(y[i]) * torch.log(torch.sigmoid(r[i])) + (1 - float(y[i])) * torch.log(torch.sigmoid(-r[i])))
                 for i in range(n)]
        return sum(terms) / n

    _grad_check(lambda r: losses.ce_loss(r, y), ref, _rand(n))


@pytest.mark.parametrize("pf", [None, 0.2])
def test_ce_dataset_balanced(pf):
    n = 37
    y = (torch.rand(n) > 0.7).float()
    y[:2] = torch.tensor([0.0, 1.0])

    def ref(r):
        pos = [i for i in range(n) if y[i] == 1]
        neg = [i for i in range(n) if y[i] == 0]
        lpos = [-torch.log(torch.sigmoid(r[i])) for i in pos]
        lneg = [-torch.log(torch.sigmoid(-r[i])) for i in neg]
        if pf is None:  # equal halves: mean over correct and mean over incorrect, averaged
            return 0.5 * sum(lpos) / len(pos) + 0.5 * sum(lneg) / len(neg)
        return (sum(lpos) / (2 * pf) + sum(lneg) / (2 * (1 - pf))) / n

    _grad_check(lambda r: losses.ce_loss(r, y, balance="dataset", positive_fraction=pf), ref, _rand(n))


def test_ce_instruction_balanced():
    # prompt 7: 3 correct 1 incorrect; prompt 2: 1 correct 2 incorrect; prompt 5: 2 incorrect only
    groups = torch.tensor([7, 7, 7, 7, 2, 2, 2, 5, 5])
    y = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 0]).float()

    def ref(r):
        total = 0.0
        for g in (7, 2, 5):
            idx = [i for i in range(len(y)) if int(groups[i]) == g]
            by_class = {}
            for i in idx:
                li = -torch.log(torch.sigmoid(r[i])) if y[i] == 1 else -torch.log(torch.sigmoid(-r[i]))
                by_class.setdefault(int(y[i]), []).append(li)
            total = total + sum(sum(v) / len(v) for v in by_class.values()) / len(by_class)
        return total / 3

    _grad_check(lambda r: losses.ce_loss(r, y, balance="instruction", groups=groups), ref, _rand(len(y)))
    w = losses.ce_weights(y, balance="instruction", groups=groups)
    assert abs(float(w.sum()) - len(y)) < 1e-4


@pytest.mark.parametrize("n", [1, 37])
def test_dpo(n):
    def ref(c, r):
        return sum(-torch.log(torch.sigmoid(c[i] - r[i])) for i in range(n)) / n

    _grad_check(losses.dpo_loss, ref, _rand(n), _rand(n))


@pytest.mark.parametrize("n", [1, 37])
def test_nca(n):
    def ref(c, r):
        return sum(-torch.log(torch.sigmoid(c[i])) - 0.5 * torch.log(torch.sigmoid(-c[i]))
                   - 0.5 * torch.log(torch.sigmoid(-r[i])) for i in range(n)) / n

    _grad_check(losses.nca_loss, ref, _rand(n), _rand(n))


@pytest.mark.parametrize("z0,wd,wu", [(0.0, 1.0, 1.0), (0.7, 1.0, 1.33)])
def test_kto(z0, wd, wu):
    n = 37
    y = (torch.rand(n) > 0.5).float()

    def ref(r):
        t = [wd * (1 - torch.sigmoid(r[i] - z0)) if y[i] == 1 else wu * (1 - torch.sigmoid(z0 - r[i])) for i in range(n)]
        return sum(t) / n

    _grad_check(lambda r: losses.kto_loss(r, y, z0, wd, wu), ref, _rand(n))


def test_kto_ref_point_is_clamped_and_detached():
    m = torch.tensor([-3.0, 1.0], requires_grad=True)
    z = losses.kto_ref_point(m)
    assert float(z) == 0.0 and not z.requires_grad
    m2 = torch.tensor([1.0, 2.0], requires_grad=True)
    assert float(losses.kto_ref_point(m2)) == pytest.approx(1.5)
    # no gradient reaches the mismatched rewards through the loss
    r = torch.tensor([0.5, -0.5], requires_grad=True)
    losses.kto_loss(r, torch.tensor([1.0, 0.0]), losses.kto_ref_point(m2)).backward()
    assert m2.grad is None and r.grad is not None


def test_extreme_rewards_are_finite():
    r = torch.tensor([200.0, -200.0], requires_grad=True)
    y = torch.tensor([0.0, 1.0])
    loss = losses.ce_loss(r, y)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and float(loss.detach()) == pytest.approx(200.0, rel=1e-5)
    assert torch.isfinite(r.grad).all()


def test_response_rewards_and_reference_free():
    lp = torch.randn(3, 5)
    lpr = torch.randn(3, 5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, 2:] = True
    mask[2, 4] = False
    r = losses.response_rewards(lp, lpr, mask, beta=0.1)
    for b in range(3):
        exp = 0.1 * sum(float(lp[b, t] - lpr[b, t]) for t in range(5) if mask[b, t])
        assert float(r[b]) == pytest.approx(exp, abs=1e-6)
    free = losses.response_rewards(lp, None, mask, beta=0.5)
    assert float(free[0]) == pytest.approx(0.5 * float(lp[0, 2:].sum()), abs=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: losses.ce_loss(torch.zeros(2, 3), torch.zeros(2, 3)), "1-D"),
    (lambda: losses.ce_loss(torch.zeros(3), torch.zeros(2)), "labels shape"),
    (lambda: losses.ce_loss(torch.zeros(2), torch.tensor([0.0, 2.0])), r"\[0, 1\]"),
    (lambda: losses.ce_loss(torch.zeros(2), torch.tensor([0.0, 0.5]), balance="dataset"), "exactly 0 or 1"),
    (lambda: losses.ce_loss(torch.zeros(2), torch.zeros(2), balance="instruction"), "needs groups"),
    (lambda: losses.ce_loss(torch.zeros(2), torch.zeros(2), balance="batch"), "balance must be"),
    (lambda: losses.ce_loss(torch.tensor([float("nan")]), torch.zeros(1)), "NaN"),
    (lambda: losses.ce_loss(torch.zeros(0), torch.zeros(0)), "empty"),
    (lambda: losses.dpo_loss(torch.zeros(2), torch.zeros(3)), "same order"),
    (lambda: losses.kto_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2)), "ref_point"),
    (lambda: losses.kto_loss(torch.zeros(2), torch.zeros(2), 0.0, -1.0), ">= 0"),
    (lambda: losses.response_rewards(torch.zeros(2, 3), None, torch.ones(2, 3), beta=0.0), "beta"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_registry_feeds_each_loss_its_inputs_and_options():
    """The registered functions pass the right inputs and the config's options (asymmetric, so swaps show)."""
    r, rej, mis = _rand(6), _rand(6), _rand(6)
    y = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    opt = SimpleNamespace(ce_balance="instruction", kto_desirable_weight=2.0, kto_undesirable_weight=0.5)
    x = losses.LossInputs(r, rejected=rej, labels=y, groups=g, mismatched=mis)
    reg = losses.REGISTRY
    assert set(losses.LOSSES) == set(reg) and set(losses.PAIR_LOSSES) == {n for n in reg if reg[n].pairs}
    torch.testing.assert_close(reg["ce"].fn(x, opt), losses.ce_loss(r, y, balance="instruction", groups=g))
    torch.testing.assert_close(reg["dpo"].fn(x, opt), losses.dpo_loss(r, rej))
    torch.testing.assert_close(reg["nca"].fn(x, opt), losses.nca_loss(r, rej))
    torch.testing.assert_close(reg["kto"].fn(x, opt), losses.kto_loss(r, y, losses.kto_ref_point(mis), 2.0, 0.5))
    with pytest.raises(ValueError, match="loss must be one of"):
        losses.get_loss("ppo")

"""prime_advantages against a loop-written version of the PRIME formula (docs/rl.md)."""

import math

import pytest
import torch

from freeprm.rl import prime_advantages


def slow_prime(r, y, mask, k, gamma, pc, oc, whiten):
    """Explicit loops over groups, responses and tokens."""
    b, t = r.shape
    total = [[0.0] * t for _ in range(b)]
    for g in range(b // k):
        rows = list(range(g * k, g * k + k))
        means = {}
        for i in rows:
            toks = [float(r[i, s]) for s in range(t) if mask[i, s]]
            means[i] = sum(toks) / len(toks)
        for i in rows:
            others = [j for j in rows if j != i]
            base_p = sum(means[j] for j in others) / (k - 1)
            base_o = sum(float(y[j]) for j in others) / (k - 1)
            last = max(s for s in range(t) if mask[i, s])
            for s in range(t):
                if mask[i, s]:
                    total[i][s] = pc * (float(r[i, s]) - base_p)
            total[i][last] += oc * (float(y[i]) - base_o)
    returns = [[0.0] * t for _ in range(b)]
    for i in range(b):
        for s in range(t):
            if not mask[i, s]:
                continue
            acc, power = 0.0, 0
            for u in range(s, t):
                if mask[i, u]:
                    acc += gamma ** power * total[i][u]
                    power += 1
            returns[i][s] = acc
    vals = [returns[i][s] for i in range(b) for s in range(t) if mask[i, s]]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    adv = [[0.0] * t for _ in range(b)]
    for i in range(b):
        for s in range(t):
            if mask[i, s]:
                adv[i][s] = (returns[i][s] - mean) / math.sqrt(var + 1e-8) if whiten else returns[i][s]
    return torch.tensor(adv), torch.tensor(returns)


def random_case(b, t, seed, left):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):
        start = int(torch.randint(1, t // 2, (1,), generator=g))
        n = int(torch.randint(1, t - start + 1, (1,), generator=g))
        if left:  # response ends at the last column (left padding)
            mask[i, t - n:] = True
        else:
            mask[i, start:start + n] = True
    r = torch.randn(b, t, generator=g) * 0.3
    y = (torch.rand(b, generator=g) > 0.5).float()
    return r, y, mask


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("left", [False, True])
def test_matches_loops(gamma, whiten, left):
    r, y, mask = random_case(6, 11, seed=int(gamma * 10) + 2 * whiten + left, left=left)
    adv, ret = prime_advantages(r, y, mask, 3, gamma=gamma, process_coef=2.0, outcome_coef=3.0, whiten=whiten)
    adv_s, ret_s = slow_prime(r, y, mask, 3, gamma, 2.0, 3.0, whiten)
    torch.testing.assert_close(ret, ret_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adv, adv_s, atol=1e-5, rtol=1e-5)
    assert bool((adv[~mask] == 0).all()) and bool((ret[~mask] == 0).all())


def test_last_token_reward_is_kept():
    # group of 2; row 0's only non-zero reward sits on its last token
    r = torch.tensor([[0.0, 0.0, 3.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    mask = torch.tensor([[False, True, True, False], [False, True, True, False]])
    _, ret = prime_advantages(r, torch.zeros(2), mask, 2, process_coef=1.0, outcome_coef=0.0, whiten=False)
    # means: 1.5 and 1.0; leave-one-out baselines: 1.0 and 1.5
    torch.testing.assert_close(ret[0], torch.tensor([0.0, (0 - 1.0) + (3 - 1.0), 3 - 1.0, 0.0]))
    torch.testing.assert_close(ret[1], torch.tensor([0.0, (1 - 1.5) + (1 - 1.5), 1 - 1.5, 0.0]))


def test_verl_process_baseline():
    """process_baseline='verl' equals verl's masked_rloo, written as its loop, and differs from the paper's."""
    r, y, mask = random_case(6, 9, seed=7, left=False)
    k = 3
    expect = torch.zeros_like(r)
    for g0 in range(0, 6, k):
        means = [float(r[i][mask[i]].mean()) for i in range(g0, g0 + k)]
        for i in range(g0, g0 + k):
            for s in range(9):
                if mask[i, s]:
                    expect[i, s] = float(r[i, s]) * k / (k - 1) - sum(means) / (k - 1)
    _, ret = prime_advantages(r, torch.zeros(6), mask, k, process_coef=1.0, outcome_coef=0.0, gamma=0.0,
                              whiten=False, process_baseline="verl")
    torch.testing.assert_close(ret, expect, atol=1e-6, rtol=1e-6)
    _, ret_paper = prime_advantages(r, torch.zeros(6), mask, k, process_coef=1.0, outcome_coef=0.0, gamma=0.0,
                                    whiten=False)
    assert not torch.allclose(ret, ret_paper)
    with pytest.raises(ValueError, match="process_baseline"):
        prime_advantages(r, y, mask, k, process_baseline="rloo")


def test_outcome_only_is_rloo():
    y = torch.tensor([1.0, 0.0, 0.0, 1.0])
    mask = torch.tensor([[False, True, True]] * 4)
    _, ret = prime_advantages(torch.zeros(4, 3), y, mask, 4, process_coef=0.0, outcome_coef=1.0, whiten=False)
    loo = torch.stack([y[i] - (y.sum() - y[i]) / 3 for i in range(4)])
    torch.testing.assert_close(ret[:, 1], loo)
    torch.testing.assert_close(ret[:, 2], loo)


def test_invalid_inputs():
    r, y, mask = random_case(6, 8, seed=0, left=False)
    with pytest.raises(ValueError, match="does not divide"):
        prime_advantages(r, y, mask, 4)
    with pytest.raises(ValueError, match="group_size"):
        prime_advantages(r, y, mask, 1)
    with pytest.raises(ValueError, match="response_mask"):
        prime_advantages(r, y, mask[:, 1:], 3)
    with pytest.raises(ValueError, match="outcome"):
        prime_advantages(r, y[:5], mask, 3)
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match="at least one"):
        prime_advantages(r, y, empty, 3)
    with pytest.raises(ValueError, match="gamma"):
        prime_advantages(r, y, mask, 3, gamma=1.5)

"""The chunked torch path with many token chunks and vocab blocks (online logsumexp across blocks)."""

import pytest
import torch

from freeprm.kernels import chunked, linear_logprobs
from freeprm.kernels import oracle as oracle_ops


@pytest.mark.parametrize("transform", [{}, {"logit_scale": 0.7, "softcap": 3.0}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_many_vocab_blocks_match_oracle(monkeypatch, transform, dtype):
    monkeypatch.setattr(chunked, "MIN_VOCAB_BLOCK", 64)
    monkeypatch.setattr(chunked, "TILE_BYTES", 4 * 16 * 96)  # 16-row chunks -> 96-wide vocab blocks
    torch.manual_seed(0)
    n, v, d = 37, 1000, 64
    hidden = (torch.randn(n, d) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, d) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,))
    targets[:11] = torch.arange(0, 1000, 96)[:11]  # a target in every block, including block edges
    targets[11] = v - 1
    g = torch.randn(n)

    def run(fn, h, w):
        out = fn(h, w)
        dh, dw = torch.autograd.grad((out.float() * g).sum(), (h, w))
        return out.float(), dh.float(), dw.float()

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    oracle = run(lambda h, w: oracle_ops.linear_logprobs(h, w, targets, upcast=False, **transform).double(), h64, w64)
    plain = run(lambda h, w: oracle_ops.linear_logprobs(h, w, targets, upcast=False, **transform), hidden, weight)
    ours = run(lambda h, w: linear_logprobs(h, w, targets, impl="torch", chunk_rows=16, **transform), hidden, weight)
    for o, p, k in zip(oracle, plain, ours):
        o = o.float()
        assert ((k - o).abs() <= 2 * (p - o).abs() + 1e-4).all(), (k - o).abs().max()

"""Token log-probs and entropies in plain torch from one tiled pass: the CPU path of
``linear_logprobs(..., return_entropy=True)``.

Per token i (x = h_i W^T in fp32, z = transform(x), p = softmax(z)), online over vocab blocks, with
alpha = exp(m_old - m):
    m <- max(m, max_b z);  l <- alpha l + sum_b exp(z - m)
    s <- alpha (s + (m_old - m) l_old) + sum_b exp(z - m) (z - m)        (s relative to the running max)
    lse_i = m + log l,   logp_i = z_{i,t_i} - lse_i,   H_i = log l - s / l   (= -sum_v p_iv log p_iv)
Keeping s relative to the running max keeps H a difference of small numbers: ``lse - E_p[z]`` on
absolute logits cancels two numbers of the size of the logits (a common offset of 100 cost 30x the
naive error). Tiles are ``[rows, vocab block]`` fp32 (never ``[N, V]``). The entropy carries no
gradient; the log-probs' gradient is the chunked path's backward (``chunked.chunked_linear_logprobs_bwd``)
from the ``lse`` of this same pass: one forward over the vocabulary, with or without gradients.
"""

from __future__ import annotations

import torch

from .chunked import chunked_linear_logprobs_bwd

ROWS = 1024
TILE_BYTES = 16 * 2**20  # one fp32 [ROWS, block] tile


def _transform(x: torch.Tensor, logit_scale: float, softcap: float | None) -> torch.Tensor:
    if logit_scale != 1.0:
        x = x * logit_scale
    return x if softcap is None else softcap * torch.tanh(x / softcap)


@torch.no_grad()
def logprobs_entropy_fwd(hidden, weight, targets, logit_scale=1.0, softcap=None, chunk_rows=None, block=None):
    """(logp [N] fp32, lse [N] fp32, entropy [N] fp32) of ``softmax(transform(hidden @ weight.T))``; no autograd.

    ``block``: vocab columns per tile (default: a [rows, block] fp32 tile of about TILE_BYTES)."""
    n, v = hidden.shape[0], weight.shape[0]
    rows = int(chunk_rows or ROWS)
    block = int(block or max(256, min(v, TILE_BYTES // (4 * max(1, min(rows, n))))))
    w32 = weight.float()
    tgt = targets.long()
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    for a in range(0, n, rows):
        b = min(a + rows, n)
        h, t = hidden[a:b].float(), tgt[a:b]
        m = torch.full((b - a,), float("-inf"), device=hidden.device)
        l = torch.zeros(b - a, device=hidden.device)
        s = torch.zeros(b - a, device=hidden.device)
        zt = torch.zeros(b - a, device=hidden.device)
        for v0 in range(0, v, block):
            v1 = min(v0 + block, v)
            z = _transform(h @ w32[v0:v1].T, logit_scale, softcap)  # [C, Vb] fp32
            m_new = torch.maximum(m, z.amax(-1))
            alpha = torch.exp(m - m_new)
            zc = z - m_new[:, None]  # <= 0
            p = torch.exp(zc)
            if v0:  # re-base s to the new max (before the first block l = s = 0 and m = -inf)
                s = alpha * (s + (m - m_new) * l)
            s = s + (p * zc).sum(-1)
            l = l * alpha + p.sum(-1)
            m = m_new
            inb = (t >= v0) & (t < v1)
            zt = torch.where(inb, z.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], zt)
        lse[a:b] = m + torch.log(l)
        logp[a:b] = zt - lse[a:b]
        ent[a:b] = torch.log(l) - s / l
    return logp, lse, ent


class LinearLogprobsEntropy(torch.autograd.Function):
    """autograd glue: (logp, entropy) from one pass; saves lse; the backward is the chunked path's."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, logit_scale, softcap, chunk_rows):
        logp, lse, ent = logprobs_entropy_fwd(hidden, weight, targets, logit_scale, softcap, chunk_rows)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.args = (logit_scale, softcap, chunk_rows)
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad, _grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        logit_scale, softcap, chunk_rows = ctx.args
        dh, dw = chunked_linear_logprobs_bwd(grad, hidden, weight, targets, lse, logit_scale, softcap, chunk_rows,
                                             need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1])
        return dh, dw, None, None, None, None


def torch_linear_logprobs_entropy(hidden, weight, targets, logit_scale=1.0, softcap=None, chunk_rows=None):
    """(logp, entropy), float32 ``[N]`` each, from one forward pass; logp differentiable w.r.t. hidden and weight."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearLogprobsEntropy.apply(hidden, weight, targets, logit_scale, softcap, chunk_rows)
    logp, _lse, ent = logprobs_entropy_fwd(hidden, weight, targets, logit_scale, softcap, chunk_rows)
    return logp, ent

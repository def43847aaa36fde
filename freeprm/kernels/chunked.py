"""Linear + gathered log-softmax in plain torch, chunked over tokens: the CPU path.

Math (per token i, x_i = h_i . W^T in fp32, z = transform(x), t_i the target):
    lse_i  = logsumexp_v z_iv
    out_i  = z_{i,t_i} - lse_i
Gradient, with g_i = d loss / d out_i and p = softmax(z_i):
    dz_iv  = g_i * (onehot(t_i)_v - p_iv)
    dx_iv  = dz_iv * dz/dx      (scale, times 1 - tanh^2 under soft-cap)
    dh_i   = sum_v dx_iv W_v               d_hidden = dx @ W        [N, D]
    dW_v   = sum_i dx_iv h_i               d_weight = dx^T @ h      [V, D]
Only ``lse`` ([N] fp32) is saved; ``[chunk, vocab block]`` tiles of logits are recomputed in
backward, so the full ``[N, V]`` matrix never exists, in forward or backward. The logsumexp is
taken online over vocab blocks: m <- max(m, max_tile z); s <- s * exp(m_old - m) + sum exp(z - m).
"""

from __future__ import annotations

import torch

# Tiles: token chunks of CHUNK_ROWS rows x vocab blocks sized so one fp32 [rows, block] tile stays
# near TILE_BYTES. The weight is then read once per token chunk (not once per few rows, which made
# the pass memory-bound on large vocabularies), and the logsumexp runs online across vocab blocks.
DEFAULT_CHUNK_ROWS = 2048
TILE_BYTES = 32 * 2**20
MIN_VOCAB_BLOCK = 1024


def _vocab_block(rows: int, vocab: int) -> int:
    return max(MIN_VOCAB_BLOCK, min(vocab, TILE_BYTES // (4 * max(rows, 1))))


def _logits(h: torch.Tensor, w32: torch.Tensor, logit_scale: float, softcap: float | None):
    """fp32 logits of one tile and, under soft-cap, tanh (needed for the gradient)."""
    x = h.float() @ w32.T  # [C, Vb] fp32
    if logit_scale != 1.0:
        x = x * logit_scale
    if softcap is None:
        return x, None
    th = torch.tanh(x / softcap)
    return softcap * th, th


def _tiles(n: int, vocab: int, chunk_rows: int | None):
    rows = chunk_rows or DEFAULT_CHUNK_ROWS
    block = _vocab_block(min(rows, max(n, 1)), vocab)
    for a in range(0, n, rows):
        yield a, min(a + rows, n), [(v, min(v + block, vocab)) for v in range(0, vocab, block)]


def chunked_linear_logprobs_fwd(hidden, weight, targets, logit_scale=1.0, softcap=None, chunk_rows=None):
    """Returns (logp [N] fp32, lse [N] fp32)."""
    n = hidden.shape[0]
    w32 = weight.float()
    tgt = targets.long()
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for a, b, blocks in _tiles(n, weight.shape[0], chunk_rows):
        h, t = hidden[a:b], tgt[a:b]
        m = torch.full((b - a,), float("-inf"), device=hidden.device)  # running max
        s = torch.zeros(b - a, device=hidden.device)  # running sum of exp(z - m)
        zt = torch.zeros(b - a, device=hidden.device)  # target logit
        for v0, v1 in blocks:
            z, _ = _logits(h, w32[v0:v1], logit_scale, softcap)  # [C, Vb]
            m_new = torch.maximum(m, z.amax(-1))
            s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(-1)
            m = m_new
            inb = (t >= v0) & (t < v1)
            if bool(inb.any()):
                rows = inb.nonzero(as_tuple=True)[0]
                zt[rows] = z[rows, t[rows] - v0]
        lse[a:b] = m + torch.log(s)
        logp[a:b] = zt - lse[a:b]
    return logp, lse


def chunked_linear_logprobs_bwd(grad, hidden, weight, targets, lse, logit_scale=1.0, softcap=None,
                                chunk_rows=None, need_hidden=True, need_weight=True):
    """Returns (d_hidden [N, D] in hidden's dtype or None, d_weight [V, D] in weight's dtype or None)."""
    n = hidden.shape[0]
    w32 = weight.float()
    tgt = targets.long()
    dh = torch.empty_like(hidden) if need_hidden else None
    dw32 = torch.zeros_like(w32) if need_weight else None
    g = grad.float()
    for a, b, blocks in _tiles(n, weight.shape[0], chunk_rows):
        h32, t, ga = hidden[a:b].float(), tgt[a:b], g[a:b]
        dh32 = torch.zeros_like(h32) if need_hidden else None
        for v0, v1 in blocks:
            z, th = _logits(h32, w32[v0:v1], logit_scale, softcap)
            dz = torch.exp(z - lse[a:b, None]).mul_(-ga[:, None])  # -g * softmax, [C, Vb]
            inb = (t >= v0) & (t < v1)
            if bool(inb.any()):
                rows = inb.nonzero(as_tuple=True)[0]
                dz[rows, t[rows] - v0] += ga[rows]
            if softcap is not None:
                dz.mul_(1.0 - th * th)
            if logit_scale != 1.0:
                dz.mul_(logit_scale)
            if need_hidden:
                dh32.addmm_(dz, w32[v0:v1])
            if need_weight:
                dw32[v0:v1].addmm_(dz.T, h32)
        if need_hidden:
            dh[a:b] = dh32.to(hidden.dtype)
    dw = None if dw32 is None else dw32.to(weight.dtype)
    return dh, dw


class ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, logit_scale, softcap, chunk_rows):
        logp, lse = chunked_linear_logprobs_fwd(hidden, weight, targets, logit_scale, softcap, chunk_rows)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.args = (logit_scale, softcap, chunk_rows)
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        logit_scale, softcap, chunk_rows = ctx.args
        dh, dw = chunked_linear_logprobs_bwd(
            grad, hidden, weight, targets, lse, logit_scale, softcap, chunk_rows,
            need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1])
        return dh, dw, None, None, None, None


def chunked_linear_logprobs(hidden, weight, targets, logit_scale=1.0, softcap=None, chunk_rows=None):
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedLinearLogprobs.apply(hidden, weight, targets, logit_scale, softcap, chunk_rows)
    return chunked_linear_logprobs_fwd(hidden, weight, targets, logit_scale, softcap, chunk_rows)[0]

"""Linear + gathered log-softmax in plain torch, chunked over tokens: the CPU path.

Math (per token i, x_i = h_i . W^T in fp32, z = transform(x), t_i the target):
    lse_i  = logsumexp_v z_iv
    out_i  = z_{i,t_i} - lse_i
Gradient, with g_i = d loss / d out_i and p = softmax(z_i):
    dz_iv  = g_i * (onehot(t_i)_v - p_iv)
    dx_iv  = dz_iv * dz/dx      (scale, times 1 - tanh^2 under soft-cap)
    dh_i   = sum_v dx_iv W_v               d_hidden = dx @ W        [N, D]
    dW_v   = sum_i dx_iv h_i               d_weight = dx^T @ h      [V, D]
Only ``lse`` ([N] fp32) is saved; the ``[chunk, V]`` logits are recomputed in backward, so
the full ``[N, V]`` matrix never exists, in forward or backward.
"""

from __future__ import annotations

import torch

# rows per chunk are chosen so one fp32 [rows, V] tile stays near this many bytes
DEFAULT_CHUNK_BYTES = 32 * 2**20


def default_chunk_rows(vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    return max(16, chunk_bytes // (4 * max(vocab, 1)))


def _logits(h: torch.Tensor, w32: torch.Tensor, logit_scale: float, softcap: float | None):
    """fp32 logits of one chunk and, under soft-cap, tanh (needed for the gradient)."""
    x = h.float() @ w32.T  # [C, V] fp32
    if logit_scale != 1.0:
        x = x * logit_scale
    if softcap is None:
        return x, None
    th = torch.tanh(x / softcap)
    return softcap * th, th


def chunked_linear_logprobs_fwd(hidden, weight, targets, logit_scale=1.0, softcap=None, chunk_rows=None):
    """Returns (logp [N] fp32, lse [N] fp32)."""
    n = hidden.shape[0]
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0])
    w32 = weight.float()
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for a in range(0, n, chunk_rows):
        b = min(a + chunk_rows, n)
        z, _ = _logits(hidden[a:b], w32, logit_scale, softcap)
        lse_c = torch.logsumexp(z, dim=-1)
        lse[a:b] = lse_c
        logp[a:b] = z.gather(-1, targets[a:b].long().unsqueeze(-1)).squeeze(-1) - lse_c
    return logp, lse


def chunked_linear_logprobs_bwd(grad, hidden, weight, targets, lse, logit_scale=1.0, softcap=None,
                                chunk_rows=None, need_hidden=True, need_weight=True):
    """Returns (d_hidden [N, D] in hidden's dtype or None, d_weight [V, D] in weight's dtype or None)."""
    n = hidden.shape[0]
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0])
    w32 = weight.float()
    dh = torch.empty_like(hidden) if need_hidden else None
    dw32 = torch.zeros_like(w32) if need_weight else None
    g = grad.float()
    for a in range(0, n, chunk_rows):
        b = min(a + chunk_rows, n)
        z, th = _logits(hidden[a:b], w32, logit_scale, softcap)
        p = torch.exp(z - lse[a:b, None])  # softmax, [C, V]
        dz = p.mul_(-g[a:b, None])
        dz.scatter_add_(-1, targets[a:b].long().unsqueeze(-1), g[a:b, None])
        if softcap is not None:
            dz.mul_(1.0 - th * th)
        if logit_scale != 1.0:
            dz.mul_(logit_scale)
        if need_hidden:
            dh[a:b] = (dz @ w32).to(hidden.dtype)
        if need_weight:
            dw32.addmm_(dz.T, hidden[a:b].float())
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

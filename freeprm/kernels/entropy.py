"""Token log-probs and entropies in plain torch from one tiled pass: the CPU path of
``linear_logprobs(..., return_entropy=True)``.

Per token i (x = h_i W^T in fp32, z = transform(x), p = softmax(z)), online over vocab blocks:
    m <- max(m, max_b z);  l <- l exp(m_old - m) + sum_b exp(z - m);  s <- s exp(m_old - m) + sum_b exp(z - m) z
    lse_i = m + log l,   logp_i = z_{i,t_i} - lse_i,   H_i = lse_i - s / l   (= -sum_v p_iv log p_iv)
Tiles are ``[rows, vocab block]`` fp32 (never ``[N, V]``). The entropy carries no gradient; when
hidden or weight need one, the log-probs come from the differentiable chunked path
(``chunked.chunked_linear_logprobs``) and this pass adds the entropy.
"""

from __future__ import annotations

import torch

from .chunked import chunked_linear_logprobs

ROWS = 1024
TILE_BYTES = 16 * 2**20  # one fp32 [ROWS, block] tile


def _transform(x: torch.Tensor, logit_scale: float, softcap: float | None) -> torch.Tensor:
    if logit_scale != 1.0:
        x = x * logit_scale
    return x if softcap is None else softcap * torch.tanh(x / softcap)


@torch.no_grad()
def logprobs_entropy_fwd(hidden, weight, targets, logit_scale=1.0, softcap=None, chunk_rows=None):
    """(logp [N] fp32, entropy [N] fp32) of ``softmax(transform(hidden @ weight.T))``; no autograd."""
    n, v = hidden.shape[0], weight.shape[0]
    rows = int(chunk_rows or ROWS)
    block = max(256, min(v, TILE_BYTES // (4 * max(1, min(rows, n)))))
    w32 = weight.float()
    tgt = targets.long()
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
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
            p = torch.exp(z - m_new[:, None])
            l = l * alpha + p.sum(-1)
            s = s * alpha + (p * z).sum(-1)
            m = m_new
            inb = (t >= v0) & (t < v1)
            zt = torch.where(inb, z.gather(1, (t - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], zt)
        lse = m + torch.log(l)
        logp[a:b] = zt - lse
        ent[a:b] = lse - s / l
    return logp, ent


def torch_linear_logprobs_entropy(hidden, weight, targets, logit_scale=1.0, softcap=None, chunk_rows=None):
    """(logp, entropy), float32 ``[N]`` each; logp differentiable as in ``chunked_linear_logprobs``."""
    logp, ent = logprobs_entropy_fwd(hidden, weight, targets, logit_scale, softcap, chunk_rows)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        logp = chunked_linear_logprobs(hidden, weight, targets, logit_scale, softcap, chunk_rows)
    return logp, ent

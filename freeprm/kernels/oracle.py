"""Plain-torch versions of every freeprm op: the test oracle and the simplest CPU path.

Every function here is the *definition* of its op. Kernels (Triton) and the memory-lean
chunked torch path (``chunked.py``) must agree with these within the error budget
``|impl - oracle| <= 2 * |torch_in_dtype - oracle| + atol`` where the oracle is
``f(..., upcast=True)`` and ``torch_in_dtype`` is ``f(..., upcast=False)``.

Shapes: N tokens (flattened), D hidden size, V vocabulary, S steps, B responses.
Segments are given cu_seqlens style: ``cu`` is an int tensor ``[K+1]`` with ``cu[0] == 0``,
non-decreasing, ``cu[-1] == len(values)``; segment k is ``values[cu[k]:cu[k+1]]``.

These functions materialize ``[N, V]`` logits: they are for tests and small inputs only.
"""

from __future__ import annotations

import torch


def apply_logit_transform(logits: torch.Tensor, logit_scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """``z = softcap * tanh(logit_scale * x / softcap)`` (or ``logit_scale * x`` without soft-cap)."""
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """``log_softmax(transform(hidden @ weight.T))[i, targets[i]]`` as float32 ``[N]``.

    hidden ``[N, D]``, weight ``[V, D]``, targets ``[N]`` (int, in ``[0, V)``).
    ``upcast=True`` computes everything in float32 (the oracle); ``upcast=False`` runs the
    matmul and the log-softmax in the inputs' dtype, as naive model code does.
    """
    if upcast:
        hidden, weight = hidden.float(), weight.float()
    logits = apply_logit_transform(hidden @ weight.T, logit_scale, softcap)  # [N, V]
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).float()


def linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Entropy of ``softmax(transform(hidden @ weight.T))`` per row, float32 ``[N]``.

    ``H_i = -sum_v p_iv log p_iv`` with p the softmax; hidden ``[N, D]``, weight ``[V, D]``.
    """
    if upcast:
        hidden, weight = hidden.float(), weight.float()
    logp = torch.log_softmax(apply_logit_transform(hidden @ weight.T, logit_scale, softcap), dim=-1)  # [N, V]
    return -(logp.exp() * logp).sum(-1).float()


def token_rewards(
    logp: torch.Tensor,
    logp_ref: torch.Tensor | None,
    mask: torch.Tensor | None,
    beta: float,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """``beta * (logp - logp_ref) * mask``; ``logp_ref=None`` is reference-free (``pi_ref`` uniform).

    All tensors share one shape (``[N]`` or ``[B, T]``); ``mask`` is bool or 0/1.
    """
    if upcast:
        logp = logp.float()
        logp_ref = None if logp_ref is None else logp_ref.float()
    r = logp if logp_ref is None else logp - logp_ref
    r = beta * r
    if mask is not None:
        r = torch.where(mask.bool(), r, torch.zeros((), dtype=r.dtype, device=r.device))
    return r


def _segment_ids(cu: torch.Tensor, n: int) -> torch.Tensor:
    """Segment index of each of the ``n`` values: ``[n]`` long."""
    lengths = (cu[1:] - cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths, output_size=n)


def segment_sum(values: torch.Tensor, cu: torch.Tensor, *, upcast: bool = True) -> torch.Tensor:
    """Per-segment sums: ``out[k] = values[cu[k]:cu[k+1]].sum()``; empty segments give 0. ``[K]``."""
    v = values.float() if upcast else values
    k = len(cu) - 1
    out = torch.zeros(k, dtype=v.dtype, device=v.device)
    return out.index_add(0, _segment_ids(cu, len(v)), v)


def _dense(v: torch.Tensor, cu: torch.Tensor, fill: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segments laid out as rows of a ``[K, L_max]`` matrix padded with ``fill``; also (seg ids, positions)."""
    lengths = (cu[1:] - cu[:-1]).long()
    seg = _segment_ids(cu, len(v))
    pos = torch.arange(len(v), device=v.device) - cu.long()[seg]
    width = int(lengths.max()) if len(lengths) else 0
    dense = torch.full((len(lengths), width), fill, dtype=v.dtype, device=v.device)
    dense[seg, pos] = v
    return dense, seg, pos


def segment_cumsum(values: torch.Tensor, cu: torch.Tensor, *, upcast: bool = True) -> torch.Tensor:
    """Cumulative sum restarting at each segment: ``out[i] = sum(values[cu[k]:i+1])`` for i in segment k. ``[N]``.

    Applied to step rewards with response offsets, this gives the Q values ``q_t = sum_{i<=t} r_i``.
    Equivalent loop: ``for k: out[cu[k]:cu[k+1]] = values[cu[k]:cu[k+1]].cumsum(0)``.
    """
    v = values.float() if upcast else values
    dense, seg, pos = _dense(v, cu, 0.0)
    return dense.cumsum(1)[seg, pos]


SEGMENT_OPS = ("min", "max", "last", "mean", "sum")


def segment_reduce(values: torch.Tensor, cu: torch.Tensor, op: str, *, upcast: bool = True) -> torch.Tensor:
    """One value per segment: min, max, last, mean or sum of ``values[cu[k]:cu[k+1]]``. ``[K]``.

    Empty segments give NaN for min, max, last and mean, and 0 for sum.
    Equivalent loop: ``[getattr(values[cu[k]:cu[k+1]], op)() for k in range(K)]`` (``last``: ``[-1]``).
    """
    if op not in SEGMENT_OPS:
        raise ValueError(f"op must be one of {SEGMENT_OPS}, got {op!r}")
    v = values.float() if upcast else values
    lengths = (cu[1:] - cu[:-1]).long()
    empty = lengths == 0
    nan = torch.tensor(float("nan"), dtype=v.dtype, device=v.device)
    if op == "sum":
        return segment_sum(v, cu, upcast=False)
    if op == "mean":
        return torch.where(empty, nan, segment_sum(v, cu, upcast=False) / lengths.clamp(min=1).to(v.dtype))
    if op == "last":
        return torch.where(empty, nan, v[(cu[1:].long() - 1).clamp(min=0)] if len(v) else nan.expand(len(lengths)))
    dense, _, _ = _dense(v, cu, float("inf") if op == "min" else float("-inf"))
    if dense.shape[1] == 0:
        return nan.expand(len(lengths)).clone()
    red = dense.amin(1) if op == "min" else dense.amax(1)
    return torch.where(empty, nan, red)


def policy_ref_rewards(
    h_pol: torch.Tensor,
    w_pol: torch.Tensor,
    h_ref: torch.Tensor,
    w_ref: torch.Tensor,
    targets: torch.Tensor,
    beta: float,
    mask: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Implicit-PRM token rewards from hidden states: ``beta * (lp_pol - lp_ref) * mask``, float32 ``[N]``.

    ``lp_pol = linear_logprobs(h_pol, w_pol, targets)`` and ``lp_ref`` likewise with the reference
    model; h_pol ``[N, Dp]``, w_pol ``[V, Dp]``, h_ref ``[N, Dr]``, w_ref ``[V, Dr]``, targets and
    mask ``[N]``. The same logit transform applies to both models.
    """
    kw = dict(logit_scale=logit_scale, softcap=softcap, upcast=upcast)
    lp = linear_logprobs(h_pol, w_pol, targets, **kw)
    lr = linear_logprobs(h_ref, w_ref, targets, **kw)
    return token_rewards(lp, lr, mask, beta, upcast=upcast)

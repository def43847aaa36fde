"""Public, validated entry points of the freeprm ops, with ``impl`` dispatch.

``impl="auto"`` takes the Triton kernel for CUDA tensors and the plain-torch path otherwise;
``impl="triton"`` forces the kernel (on CPU it needs ``TRITON_INTERPRET=1`` set before triton
is imported); ``impl="torch"`` forces the torch path. The torch path of ``linear_logprobs`` is
the chunked one in ``chunked.py`` (never ``[N, V]``; with entropy: ``entropy.py``); the others are
in ``oracle.py``.

Validation: shapes, dtypes and devices are always checked (no device work). Checks of tensor
*values* (target ids in ``[0, V)``, segment offsets) need a device-to-host copy, which on a GPU
stalls the stream on every call: they run for CPU tensors, and for GPU tensors only with
``validate=True`` or ``FREEPRM_DEBUG=1``. ``freeprm.engine.Scorer`` validates token ids against
the vocabulary when it tokenizes (on the host), so the scoring hot path needs no value checks.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..config import DEFAULT_BETA
from . import oracle
from .chunked import chunked_linear_logprobs
from .entropy import torch_linear_logprobs_entropy

IMPLS = ("auto", "triton", "torch")
DEBUG_ENV = "FREEPRM_DEBUG"


def _value_checks(validate: bool | None, *tensors: torch.Tensor) -> bool:
    """Whether to check tensor values: ``validate`` if given, else on CPU always, on GPU under FREEPRM_DEBUG=1."""
    if validate is not None:
        return bool(validate)
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0") or all(t.device.type == "cpu" for t in tensors)


def _autocast(hidden: torch.Tensor, weight: torch.Tensor):
    """hidden and weight in the autocast dtype when autocast is on for their device (as ``F.linear`` would be)."""
    dev = hidden.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return hidden.to(dt), weight.to(dt)
    return hidden, weight


def _no_autocast(t: torch.Tensor):
    """The ops' own fp32 accumulation must not be recast by an enclosing autocast region."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if dev in ("cuda", "cpu") else contextlib.nullcontext()


def _resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        if impl == "triton" and not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing triton, move the tensors to CUDA, or use impl='torch'")
        return impl
    return "triton" if all(t.is_cuda for t in tensors) and _triton_available() else "torch"


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_cu(cu: torch.Tensor, n: int, what: str, validate: bool | None = None) -> None:
    if cu.dim() != 1 or len(cu) < 1 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what} must be a 1-D int32/int64 tensor of offsets [K+1], got shape {tuple(cu.shape)} {cu.dtype}")
    if not _value_checks(validate, cu):
        return
    if int(cu[0]) != 0 or int(cu[-1]) != n:
        raise ValueError(f"{what} must start at 0 and end at len(values)={n}; got {int(cu[0])}..{int(cu[-1])}")
    if len(cu) > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{what} must be non-decreasing (offsets of consecutive segments)")


def _check_values(values: torch.Tensor) -> None:
    """Segment ops take one flat ``[N]`` float tensor: each impl would otherwise read a 2-D one differently."""
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D [N] (the segments' values back to back, cu their offsets), got shape "
                         f"{tuple(values.shape)}; for a padded [B, T] batch pass values[mask] and offsets of the rows")


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, who: str = "") -> None:
    """Shapes, dtypes and devices of one (hidden [N, D], weight [V, D]) pair."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{who}hidden must be [N, D] and weight [V, D]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{who}hidden size mismatch: hidden has D={hidden.shape[1]}, weight has D={weight.shape[1]}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"{who}hidden and weight must be floating point")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError(f"{who}hidden, weight and targets must be on the same device")


def _check_targets(targets: torch.Tensor, n: int, vocab: int, validate: bool | None = None) -> None:
    if targets.shape != (n,):
        raise ValueError(f"targets must be [N]={n}, got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32/int64 token ids, got {targets.dtype}")
    if targets.numel() and _value_checks(validate, targets) and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must lie in [0, V={vocab}); mask padding before calling")


def _check_softcap(softcap: float | None) -> None:
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
    return_entropy: bool = False,
    validate: bool | None = None,
):
    """Log-probabilities of ``targets`` under ``softmax(hidden @ weight.T)``, without ``[N, V]`` logits.

    Equivalent plain torch (fp32)::

        z = logit_scale * hidden.float() @ weight.float().T        # [N, V]
        if softcap: z = softcap * torch.tanh(z / softcap)
        out = torch.log_softmax(z, -1).gather(-1, targets[:, None])[:, 0]
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)   # return_entropy=True

    Args:
        hidden: ``[N, D]`` float tensor (fp32, fp16 or bf16).
        weight: ``[V, D]`` LM-head weight, same device (a different float dtype is promoted).
        targets: ``[N]`` int tensor with values in ``[0, V)``.
        return_entropy: also return the entropy of each token's distribution, from the same pass.
        validate: check target values (a device sync on GPU); default: on CPU, or FREEPRM_DEBUG=1.
    Under ``torch.autocast`` for the tensors' device, hidden and weight are cast to the autocast
    dtype first (as ``F.linear`` would be). fp32 inputs on the Triton path use TF32 dots when
    ``torch.get_float32_matmul_precision()`` is not "highest".
    Returns:
        float32 ``[N]``, differentiable w.r.t. ``hidden`` and ``weight``; with ``return_entropy``,
        ``(logp, entropy)``, entropy float32 ``[N]`` without gradient.
    """
    _check_head(hidden, weight, targets)
    _check_targets(targets, hidden.shape[0], weight.shape[0], validate)
    _check_softcap(softcap)
    which = _resolve_impl(impl, hidden, weight)
    hidden, weight = _autocast(hidden, weight)
    with _no_autocast(hidden):
        if which == "triton":
            from .linear_logprob_kernel import triton_linear_logprobs

            return triton_linear_logprobs(hidden, weight, targets, logit_scale=logit_scale, softcap=softcap,
                                          return_entropy=return_entropy)
        if return_entropy:
            return torch_linear_logprobs_entropy(hidden, weight, targets, logit_scale, softcap, chunk_rows)
        return chunked_linear_logprobs(hidden, weight, targets, logit_scale, softcap, chunk_rows)


def token_rewards(
    logp: torch.Tensor,
    logp_ref: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    beta: float = DEFAULT_BETA,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """``beta * (logp - logp_ref) * mask`` in float32; ``logp_ref=None`` is reference-free.

    Equivalent plain torch: ``oracle.token_rewards(logp, logp_ref, mask, beta)``.
    Shapes: all ``[N]`` (or all ``[B, T]``).
    """
    if logp_ref is not None and logp_ref.shape != logp.shape:
        raise ValueError(f"logp_ref shape {tuple(logp_ref.shape)} must equal logp shape {tuple(logp.shape)}")
    if mask is not None and mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal logp shape {tuple(logp.shape)}")
    which = _resolve_impl(impl, logp)
    if which == "triton":
        from .reward_kernel import triton_token_rewards

        return triton_token_rewards(logp, logp_ref, mask, beta)
    return oracle.token_rewards(logp, logp_ref, mask, beta)


def segment_sum(values: torch.Tensor, cu: torch.Tensor, *, impl: str = "auto",
                validate: bool | None = None) -> torch.Tensor:
    """Per-segment sums (step rewards from token rewards): ``out[k] = values[cu[k]:cu[k+1]].sum()``.

    values ``[N]``, cu ``[K+1]`` offsets; returns float32 ``[K]``; empty segments give 0.
    Differentiable w.r.t. ``values``.
    """
    _check_values(values)
    _check_cu(cu, values.shape[0], "cu", validate)
    which = _resolve_impl(impl, values)
    if which == "triton":
        from .segment_kernel import triton_segment_sum

        return triton_segment_sum(values, cu)
    return oracle.segment_sum(values, cu)


def segment_cumsum(values: torch.Tensor, cu: torch.Tensor, *, impl: str = "auto",
                   validate: bool | None = None) -> torch.Tensor:
    """Cumulative sums restarting at each segment (Q values from step rewards). ``[N]`` float32."""
    _check_values(values)
    _check_cu(cu, values.shape[0], "cu", validate)
    which = _resolve_impl(impl, values)
    if which == "triton":
        from .segment_kernel import triton_segment_cumsum

        return triton_segment_cumsum(values, cu)
    return oracle.segment_cumsum(values, cu)


def segment_reduce(values: torch.Tensor, cu: torch.Tensor, op: str, *, impl: str = "auto",
                   validate: bool | None = None) -> torch.Tensor:
    """One value per segment: ``op`` in min, max, last, mean, sum. ``[K]`` float32.

    Empty segments give NaN (min, max, last, mean) or 0 (sum).
    """
    if op not in oracle.SEGMENT_OPS:
        raise ValueError(f"op must be one of {oracle.SEGMENT_OPS}, got {op!r}")
    _check_values(values)
    _check_cu(cu, values.shape[0], "cu", validate)
    which = _resolve_impl(impl, values)
    if which == "triton":
        from .segment_kernel import triton_segment_reduce

        return triton_segment_reduce(values, cu, op)
    return oracle.segment_reduce(values, cu, op)


def policy_ref_rewards(
    h_pol: torch.Tensor,
    w_pol: torch.Tensor,
    h_ref: torch.Tensor,
    w_ref: torch.Tensor,
    targets: torch.Tensor,
    beta: float = DEFAULT_BETA,
    mask: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    """Implicit-PRM token rewards straight from both models' last hidden states, float32 ``[N]``.

    Equivalent plain torch: ``oracle.policy_ref_rewards(...)``, i.e.::

        beta * (linear_logprobs(h_pol, w_pol, targets) - linear_logprobs(h_ref, w_ref, targets)) * mask

    Args:
        h_pol: ``[N, Dp]`` policy hidden states; w_pol: ``[V, Dp]`` policy LM head.
        h_ref: ``[N, Dr]`` reference hidden states; w_ref: ``[V, Dr]`` reference LM head (same V).
        targets: ``[N]`` int token ids in ``[0, V)``; mask: ``[N]`` bool or 0/1, or None.
    With ``impl="triton"`` and no gradients this is one kernel launch reading both pairs (the
    scoring pass); with gradients the differentiable per-model kernels are composed. The same
    ``logit_scale`` / ``softcap`` applies to both models.
    """
    for name, h, w in (("policy", h_pol, w_pol), ("reference", h_ref, w_ref)):
        _check_head(h, w, targets, f"{name} ")
    if h_pol.shape[0] != h_ref.shape[0]:
        raise ValueError(f"policy and reference must score the same tokens: N={h_pol.shape[0]} vs N={h_ref.shape[0]}")
    if w_pol.shape[0] != w_ref.shape[0]:
        raise ValueError(f"policy and reference must share a vocabulary: V={w_pol.shape[0]} vs V={w_ref.shape[0]}")
    if mask is not None and (mask.shape != targets.shape or mask.device != targets.device):
        raise ValueError(f"mask must be [N]={targets.shape[0]} on the targets' device, got {tuple(mask.shape)}")
    _check_targets(targets, h_pol.shape[0], w_pol.shape[0], validate)
    _check_softcap(softcap)
    which = _resolve_impl(impl, h_pol, w_pol, h_ref, w_ref)
    h_pol, w_pol = _autocast(h_pol, w_pol)
    h_ref, w_ref = _autocast(h_ref, w_ref)
    with _no_autocast(h_pol):
        if which == "triton":
            from .reward_kernel import triton_policy_ref_rewards

            return triton_policy_ref_rewards(h_pol, w_pol, h_ref, w_ref, targets, beta, mask,
                                             logit_scale=logit_scale, softcap=softcap)
        lp = chunked_linear_logprobs(h_pol, w_pol, targets, logit_scale, softcap, chunk_rows)
        lr = chunked_linear_logprobs(h_ref, w_ref, targets, logit_scale, softcap, chunk_rows)
        return oracle.token_rewards(lp, lr, mask, beta)

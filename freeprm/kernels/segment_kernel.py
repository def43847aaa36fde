"""Segmented reductions over cu_seqlens offsets in Triton: step rewards, Q values, aggregates.

Segments: ``cu`` ``[K+1]`` int offsets, cu[0] = 0, non-decreasing, cu[K] = N; segment k is
values[cu[k]:cu[k+1]] (length n_k, possibly 0). One program per segment walks it in BLOCK chunks,
accumulating in fp32 (deterministic, fixed order). Outputs are float32.

    sum:     s_k = sum_{i in k} v_i                    dv_i = g_{k(i)}                      (empty: 0)
    mean:    a_k = s_k / n_k                           dv_i = g_{k(i)} / n_k                (empty: NaN)
    min/max: e_k = min/max_{i in k} v_i                dv_i = g_{k(i)} [v_i = e_k] / #ties  (empty: NaN)
    last:    l_k = v_{cu[k+1]-1}                       dv_i = g_k at i = cu[k+1]-1, else 0  (empty: NaN)
    cumsum:  q_i = sum_{cu[k] <= j <= i} v_j           dv_i = sum_{i <= j < cu[k+1]} g_j    (reverse cumsum)
The min/max gradient splits g evenly among tied extremes, as torch's full min()/max() does.
Shapes: N values (tokens or steps), K segments (steps or responses); S = steps in the docs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as tc
from .oracle import SEGMENT_OPS
from .triton_common import cast_rn

_BLOCK = 1024
_OP_CODE = {"sum": 0, "mean": 1, "min": 2, "max": 3, "last": 4}


# out_k = op(values[cu[k]:cu[k+1]]), op in sum / mean / min / max / last; empty: 0 (sum) or NaN
@triton.jit
def _segment_reduce_kernel(
    VALS,  # [N] values, any float dtype
    CU,  # [K+1] int32/int64 segment offsets
    OUT,  # [K] fp32 out: one value per segment
    OP: tl.constexpr, BLOCK: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    a = tl.load(CU + k).to(tl.int64)
    b = tl.load(CU + k + 1).to(tl.int64)
    if OP == 4:  # last
        res = tl.load(VALS + b - 1, mask=b > a, other=0.0).to(tl.float32)
    else:
        if OP == 2:
            acc = tl.full((BLOCK,), float("inf"), tl.float32)
        elif OP == 3:
            acc = tl.full((BLOCK,), float("-inf"), tl.float32)
        else:
            acc = tl.zeros((BLOCK,), tl.float32)
        for s in range(a, b, BLOCK):
            offs = s + tl.arange(0, BLOCK)
            ok = offs < b
            x = tl.load(VALS + offs, mask=ok, other=0.0).to(tl.float32)
            if OP == 2:
                acc = tl.minimum(acc, tl.where(ok, x, float("inf")))
            elif OP == 3:
                acc = tl.maximum(acc, tl.where(ok, x, float("-inf")))
            else:
                acc += x
        if OP == 2:
            res = tl.min(acc, axis=0)
        elif OP == 3:
            res = tl.max(acc, axis=0)
        else:
            res = tl.sum(acc, axis=0)
            if OP == 1:
                res = res / tl.maximum(b - a, 1).to(tl.float32)
    if OP != 0:
        res = tl.where(b > a, res, float("nan"))
    tl.store(OUT + k, res)


# backward of sum / mean: dv_i = g_{k(i)} (/ n_k)
@triton.jit
def _segment_broadcast_kernel(
    G,  # [K] fp32 upstream gradient, one per segment
    CU,  # [K+1] int32/int64 segment offsets
    DV,  # [N] out: g_k (or g_k / n_k) over segment k, in the values' dtype
    MEAN: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RN: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    a = tl.load(CU + k).to(tl.int64)
    b = tl.load(CU + k + 1).to(tl.int64)
    g = tl.load(G + k).to(tl.float32)
    if MEAN:
        g = g / tl.maximum(b - a, 1).to(tl.float32)
    for s in range(a, b, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        dv = cast_rn(tl.zeros((BLOCK,), tl.float32) + g, DV.dtype.element_ty, EMULATE_RN)
        tl.store(DV + offs, dv, mask=offs < b)


# q_i = sum_{cu[k] <= j <= i} v_j ; backward: dv_i = sum_{i <= j < cu[k+1]} g_j (REVERSE)
@triton.jit
def _segment_cumsum_kernel(
    VALS,  # [N] values, any float dtype
    CU,  # [K+1] int32/int64 segment offsets
    OUT,  # [N] out: running sums restarting at each segment (fp32, or the grad's dtype)
    REVERSE: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RN: tl.constexpr,
):
    # REVERSE walks each segment from its end: out_i = sum_{i <= j < b} v_j (the cumsum gradient)
    k = tl.program_id(0).to(tl.int64)
    a = tl.load(CU + k).to(tl.int64)
    b = tl.load(CU + k + 1).to(tl.int64)
    carry = tl.sum(tl.zeros((BLOCK,), tl.float32), axis=0)  # fp32 scalar: sum of the chunks already done
    for j in range(0, b - a, BLOCK):
        step = j + tl.arange(0, BLOCK)
        if REVERSE:
            offs = b - 1 - step
        else:
            offs = a + step
        ok = step < b - a
        x = tl.load(VALS + offs, mask=ok, other=0.0).to(tl.float32)
        c = tl.cumsum(x, axis=0) + carry
        tl.store(OUT + offs, cast_rn(c, OUT.dtype.element_ty, EMULATE_RN), mask=ok)
        carry += tl.sum(x, axis=0)


def _prep(values: torch.Tensor, cu: torch.Tensor):
    return values.reshape(-1).contiguous(), cu.to(values.device).contiguous()


def segment_reduce_fwd(values, cu, op):
    v, cu = _prep(values, cu)
    k = cu.numel() - 1
    out = torch.empty(k, dtype=torch.float32, device=v.device)
    if k > 0:
        tc.launch(_segment_reduce_kernel, (k,), (v, cu, out), dict(OP=_OP_CODE[op], BLOCK=_BLOCK), num_warps=4)
    return out


def segment_broadcast(g, cu, n, dtype, mean=False):
    """dv [n] with g_k (or g_k / n_k) on every element of segment k."""
    cu = cu.to(g.device).contiguous()
    dv = torch.empty(n, dtype=dtype, device=g.device)
    k = cu.numel() - 1
    if k > 0 and n > 0:
        tc.launch(_segment_broadcast_kernel, (k,), (g.float().contiguous(), cu, dv),
                  dict(MEAN=mean, BLOCK=_BLOCK, EMULATE_RN=tc.interpreting(dv)), num_warps=4)
    return dv


def segment_cumsum_fwd(values, cu, reverse=False, out_dtype=torch.float32):
    v, cu = _prep(values, cu)
    out = torch.empty(v.numel(), dtype=out_dtype, device=v.device)
    k = cu.numel() - 1
    if k > 0 and v.numel() > 0:
        tc.launch(_segment_cumsum_kernel, (k,), (v, cu, out),
                  dict(REVERSE=reverse, BLOCK=_BLOCK, EMULATE_RN=tc.interpreting(out)), num_warps=4)
    return out


def _segment_ids(cu: torch.Tensor, n: int) -> torch.Tensor:
    lengths = (cu[1:] - cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths, output_size=n)


class SegmentReduce(torch.autograd.Function):
    """autograd glue for the per-segment reductions; gradients as in the module docstring."""

    @staticmethod
    def forward(ctx, values, cu, op):
        out = segment_reduce_fwd(values, cu, op)
        ctx.save_for_backward(values, cu, out)
        ctx.op = op
        return out

    @staticmethod
    def backward(ctx, grad):
        values, cu, out = ctx.saved_tensors
        op, n = ctx.op, values.shape[0]
        cu = cu.to(values.device)
        if op in ("sum", "mean"):
            dv = segment_broadcast(grad, cu, n, values.dtype, mean=op == "mean")
        elif op == "last":  # g_k onto the last value of segment k; no boolean indexing (a device sync)
            dv = torch.zeros(n, dtype=values.dtype, device=values.device)
            if n:  # an empty segment points at a neighbour's value (or 0) and adds an exact 0 there
                g = torch.where(cu[1:] > cu[:-1], grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
                dv.index_add_(0, (cu[1:] - 1).clamp_(min=0).long(), g.to(values.dtype))
        else:  # min / max: split evenly among ties, like torch
            seg = _segment_ids(cu, n)
            hit = (values.float() == out[seg]).float()
            ties = segment_reduce_fwd(hit, cu, "sum")
            dv = (hit * (grad.float() / ties.clamp_min(1))[seg]).to(values.dtype)
        return dv, None, None


class SegmentCumsum(torch.autograd.Function):
    """autograd glue: the gradient of a segmented cumsum is the reverse segmented cumsum."""

    @staticmethod
    def forward(ctx, values, cu):
        ctx.save_for_backward(cu)
        ctx.dtype = values.dtype
        return segment_cumsum_fwd(values, cu)

    @staticmethod
    def backward(ctx, grad):
        (cu,) = ctx.saved_tensors
        return segment_cumsum_fwd(grad, cu, reverse=True, out_dtype=ctx.dtype), None


def _wants_grad(values: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and values.requires_grad


def triton_segment_reduce(values: torch.Tensor, cu: torch.Tensor, op: str) -> torch.Tensor:
    """float32 ``[K]``: op in min, max, last, mean, sum over ``values[cu[k]:cu[k+1]]``; differentiable."""
    if op not in SEGMENT_OPS:
        raise ValueError(f"op must be one of {SEGMENT_OPS}, got {op!r}")
    if _wants_grad(values):
        return SegmentReduce.apply(values, cu, op)
    return segment_reduce_fwd(values, cu, op)


def triton_segment_sum(values: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """float32 ``[K]`` per-segment sums (0 for empty segments); differentiable."""
    return triton_segment_reduce(values, cu, "sum")


def triton_segment_cumsum(values: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """float32 ``[N]`` cumulative sums restarting at each segment; differentiable."""
    if _wants_grad(values):
        return SegmentCumsum.apply(values, cu)
    return segment_cumsum_fwd(values, cu)

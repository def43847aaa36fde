"""Linear + gathered log-softmax in Triton: ``logp[i] = log_softmax(transform(h_i W^T))[t_i]``.

Shapes: N = B*T tokens, D hidden size, V vocabulary. hidden ``[N, D]``, weight ``[V, D]``,
targets ``[N]``; out and the saved ``lse`` are float32 ``[N]``.

Forward, per token i (x_iv = h_i . w_v accumulated in fp32, z = transform(x)):
    z_iv   = s * x_iv                                    (no soft-cap)
    z_iv   = c * tanh(s * x_iv / c)                      (soft-cap c)
    lse_i  = log sum_v exp(z_iv)                          online over vocab tiles:
             m <- max(m, max_tile z);  l <- l * exp(m_old - m) + sum_tile exp(z - m)
    out_i  = z_{i,t_i} - lse_i                            z_{i,t_i} taken from the same fp32 tile
    ent_i  = log l_i - s_i / l_i                          (return_entropy, no gradient), online alongside l,
             relative to the running max (no cancellation when all logits share a large offset):
             s <- exp(m_old - m) (s + (m_old - m) l_old) + sum_tile exp(z - m) (z - m)
The vocab may be cut into SPLITS ranges (a runtime argument: more programs when N is small, L2 reuse
of the hidden rows when it is large); each range writes its partial (m_k, l_k) (and its entropy H_k)
to ``[SPLITS, N]`` buffers and a tiny second kernel combines the ranges in a fixed order:
    M = max_k m_k,  lse = M + log sum_k exp(m_k - M) l_k,  ent = sum_k w_k (H_k - log w_k),
    w_k = exp(m_k - M) l_k / exp(lse - M),  log w_k = (m_k - M) + log l_k - (lse - M)
deterministic, no atomics. With one range the kernel writes out and lse itself.

Backward, with g_i = dL/d out_i and p_iv = exp(z_iv - lse_i):
    dz_iv  = g_i * (onehot(t_i)_v - p_iv)
    dx_iv  = dz_iv * s                                   (no soft-cap)
    dx_iv  = dz_iv * s * (1 - tanh^2(s x_iv / c))        (soft-cap)
    d_hidden = dx @ W          [N, D]
    d_weight = dx^T @ h        [V, D]
split into the softmax term and the target term, dx = dxs + onehot(t) gt:
    dxs_iv = -g_i p_iv dz/dx_iv                          (the slab, in the GEMM dtype)
    gt_i   =  g_i dz/dx_{i,t_i}                          (fp32: the row's large entry, never rounded to 16 bits)
    d_hidden_i = (dxs @ W)_i + gt_i W_{t_i}              d_weight_v = (dxs^T @ h)_v + sum_{i: t_i = v} gt_i h_i
``dxs`` is recomputed from (h, W, lse) by a Triton kernel into a slab (stored rounded to nearest,
``cast_rn``) and fed to two cuBLAS GEMMs accumulating in fp32; the kernel also writes ``gt``, and the
target term is added in fp32 (a gather for d_hidden, a sorted ``index_put_`` for d_weight) before each
gradient is rounded to its dtype once. ``[N, V]`` never exists and only ``lse`` is saved. When V > N
the slab is ``[N, Vc]`` (a vocab slice): each d_weight slice is finished in fp32 and written once and
d_hidden accumulates in fp32 ``[N, D]``; otherwise the slab is ``[C, V]`` (a row chunk) and d_weight
accumulates in fp32 ``[V, D]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as tc
from .triton_common import cast_rn, combine_splits, logit_tile, row_block_partial, safe_log, split_prologue

# backward slab budget: the [C, V] or [N, Vc] dz slab is sized to stay near this
BWD_SLAB_BYTES = 256 * 2**20
BWD_SPLITS = ("auto", "rows", "vocab")
# rows per [rows, D] fp32 temporary of the target term
TARGET_ROWS = 2048


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


# out_i = z_{i,t_i} - lse_i, lse_i = log sum_v exp z_iv, z = transform(h W^T): online over vocab tiles
@triton.jit(do_not_specialize=["N", "SPLITS"])
def _linear_logprob_fwd_kernel(
    H,  # [N, D] hidden, row stride stride_h
    W,  # [V, D] weight, row stride stride_w
    TGT,  # [N] int32/int64 target ids in [0, V)
    OUT,  # [N] fp32: log-prob of the target (not SPLIT) or the target logit (SPLIT)
    LSE,  # [N] fp32 logsumexp of the row (written when not SPLIT)
    ENT,  # [N] fp32 entropy of the row (written when HAS_ENT and not SPLIT)
    PART,  # [2 + HAS_ENT, SPLITS, N] fp32 per-range max (-inf if empty), sum exp (0 if empty), entropy (SPLIT)
    N, V, D, SPLITS, stride_h, stride_w, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    rows, row_ok, tgt, pid_s, v_lo, v_hi = split_prologue(TGT, N, V, SPLITS, BLOCK_N, BLOCK_V)
    m, l, s, zt = row_block_partial(H, W, rows, row_ok, tgt, v_lo, v_hi, D, stride_h, stride_w, scale, softcap,
                                    HAS_SOFTCAP, HAS_ENT, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, DOT_PREC)
    if SPLIT:
        tl.store(PART + pid_s * N + rows, m, mask=row_ok)
        tl.store(PART + (SPLITS + pid_s) * N + rows, l, mask=row_ok)
        if HAS_ENT:
            tl.store(PART + (2 * SPLITS + pid_s) * N + rows, safe_log(l) - s / tl.where(l > 0, l, 1.0), mask=row_ok)
        tl.store(OUT + rows, zt, mask=row_ok & (tgt >= v_lo) & (tgt < v_hi))
    else:
        lse = m + tl.log(l)
        tl.store(LSE + rows, lse, mask=row_ok)
        tl.store(OUT + rows, zt - lse, mask=row_ok)
        if HAS_ENT:
            tl.store(ENT + rows, tl.log(l) - s / l, mask=row_ok)


# lse_i = M + log sum_k exp(m_k - M) l_k over the vocab ranges, out_i = z_{i,t_i} - lse_i,
# ent_i = sum_k w_k (H_k - log w_k), w_k = exp(m_k - M) l_k / exp(lse_i - M)   (triton_common.combine_splits)
@triton.jit(do_not_specialize=["N", "SPLITS"])
def _linear_logprob_combine_kernel(
    PART,  # [2 + HAS_ENT, SPLITS, N] fp32 written by _linear_logprob_fwd_kernel
    OUT,  # [N] fp32 in: target logit z_{i,t_i}; out: log-prob
    LSE,  # [N] fp32 out: logsumexp of the row
    ENT,  # [N] fp32 out: entropy of the row (HAS_ENT)
    N, SPLITS,
    HAS_ENT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    lse, ent = combine_splits(PART, offs, ok, N, SPLITS, HAS_ENT)
    tl.store(LSE + offs, lse, mask=ok)
    tl.store(OUT + offs, tl.load(OUT + offs, mask=ok, other=0.0) - lse, mask=ok)
    if HAS_ENT:
        tl.store(ENT + offs, ent, mask=ok)


def linear_logprob_fwd(hidden, weight, targets, logit_scale=1.0, softcap=None, num_splits=None, entropy=False):
    """Launcher. Returns (logp [N] fp32, lse [N] fp32, entropy [N] fp32 or None)."""
    hidden, weight = tc.common_dtype(hidden, weight)
    targets = targets.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    ent = torch.empty_like(out) if entropy else None
    if n == 0:
        return out, torch.empty_like(out), ent
    interp = tc.interpreting(hidden)
    config = tc.pick_config(hidden.dtype, interp, entropy)
    splits = int(num_splits or tc.num_splits(n, v, config, hidden.element_size(), hidden.device, interp))
    lse = torch.empty_like(out)
    ent_arg = out if ent is None else ent  # unused pointer when not HAS_ENT
    part = torch.empty(3 if entropy else 2, splits, n, dtype=torch.float32, device=hidden.device) if splits > 1 else out
    args = (hidden, weight, targets, out, lse, ent_arg, part, n, v, d, splits, hidden.stride(0), weight.stride(0),
            float(logit_scale), float(softcap or 1.0))
    consts = dict(HAS_SOFTCAP=softcap is not None, HAS_ENT=entropy, **tc.dot_flags(hidden.dtype, interp))
    tc.split_vocab_launch(_linear_logprob_fwd_kernel, n, splits, args, consts, config)
    if splits > 1:  # out holds the target logits: a tiny second pass combines the ranges
        tc.launch(_linear_logprob_combine_kernel, (triton.cdiv(n, tc.COMBINE_BLOCK),),
                  (part, out, lse, ent_arg, n, splits), dict(HAS_ENT=entropy, BLOCK=tc.COMBINE_BLOCK), num_warps=4)
    return out, lse, ent


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


# softmax term dx_iv = -g_i exp(z_iv - lse_i) dz/dx_iv, dz/dx = s or s (1 - tanh^2): one tile each;
# target term gt_i = g_i dz/dx_{i,t_i} (fp32, added by the host: it is the large entry of the row)
@triton.jit(do_not_specialize=["C", "v_off"])
def _linear_logprob_dx_kernel(
    H,  # [C, D] hidden rows of this slab, row stride stride_h
    W,  # [V, D] weight rows of this slab (vocab ids v_off .. v_off + V), row stride stride_w
    TGT,  # [C] int32/int64 target ids (global vocab ids)
    LSE,  # [C] fp32 logsumexp saved by the forward (over the whole vocabulary)
    G,  # [C] fp32 upstream gradient dL/d out
    DX,  # [C, V] out: softmax term of dL/dx (pre-transform logits) in the GEMM dtype, row stride stride_dx
    GT,  # [C] fp32 out: target term g_i dz/dx at (i, t_i), written for rows whose target is in this slab
    C, V, D, v_off, stride_h, stride_w, stride_dx, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE_RN: tl.constexpr,
):
    # program (i, j): rows block i, vocab block j; consecutive programs share one weight tile
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < C
    col_ok = cols < V
    z, th = logit_tile(H, W, rows, cols, row_ok, col_ok, D, stride_h, stride_w, scale, softcap,
                       HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, DOT_PREC)
    tgt = tl.load(TGT + rows, mask=row_ok, other=0).to(tl.int64) - v_off
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])  # 0 past V (z = -inf)
    dz = -g[:, None] * p
    if HAS_SOFTCAP:
        dz = dz * (1.0 - th * th)
    dz = dz * scale
    dx_ptrs = DX + rows[:, None] * stride_dx + cols[None, :]
    tl.store(dx_ptrs, cast_rn(dz, DX.dtype.element_ty, EMULATE_RN), mask=row_ok[:, None] & col_ok[None, :])
    # target term, by the one program whose tile holds the target column
    hit = row_ok & (tgt >= pid_v * BLOCK_V) & (tgt < pid_v * BLOCK_V + BLOCK_V) & (tgt < V)
    gt = g * scale
    if HAS_SOFTCAP:
        tht = tl.sum(tl.where(cols[None, :] == tgt[:, None], th, 0.0), axis=1)
        gt = gt * (1.0 - tht * tht)
    tl.store(GT + rows, gt, mask=hit)


def _slab(rows: int, cols: int, dtype, device) -> torch.Tensor:
    return torch.empty(rows * cols, dtype=dtype, device=device)


def _dx(hidden, weight, targets, lse, g, gt, slab, v_off, consts, config, logit_scale, softcap):
    """dx [C, Vc] (a contiguous view of the slab): the softmax term for hidden [C, D] against the vocab slice
    weight [Vc, D]; writes gt [C] (fp32 target term) for the rows whose target lies in the slice."""
    c, vc = hidden.shape[0], weight.shape[0]
    dx = slab[: c * vc].view(c, vc)
    grid = (triton.cdiv(c, config.kwargs["BLOCK_N"]), triton.cdiv(vc, config.kwargs["BLOCK_V"]))
    tc.launch(_linear_logprob_dx_kernel, grid,
              (hidden, weight, targets, lse, g, dx, gt, c, vc, hidden.shape[1], v_off, hidden.stride(0),
               weight.stride(0), dx.stride(0), float(logit_scale), float(softcap or 1.0)), consts, config)
    return dx


def addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b possibly 16-bit: fp32 accumulation across slabs.

    torch 2.13 has ``addmm(..., out_dtype=float32)`` (``aten::addmm.dtype_out``) for CUDA only
    (the CPU backend raises NotImplementedError); elsewhere the operands are upcast.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:  # cuBLAS 16-bit GEMM accumulating into an fp32 C in place: no temporary
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
        try:  # fp32-output GEMM plus one fp32 temporary
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.addmm_(a.float(), b.float())


def mm_fp32_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out = a @ b into fp32 ``out`` (a, b possibly 16-bit), fp32 accumulation, no rounding to 16 bits."""
    out.zero_()
    addmm_fp32_(out, a, b)
    return out


def _bwd_chunk(n_other: int, extent: int, elt: int) -> int:
    """Slab extent (rows or vocab columns, a multiple of 128) so [extent, n_other] stays near BWD_SLAB_BYTES."""
    size = max(128, (BWD_SLAB_BYTES // max(n_other * elt, 1)) // 128 * 128)
    return min(size, extent)


def _add_target_rows_(acc: torch.Tensor, index: torch.Tensor, hidden: torch.Tensor, coef: torch.Tensor) -> None:
    """acc[index[i]] += coef[i] * hidden[i] in fp32 (the target term of d_weight), TARGET_ROWS rows at a time.

    ``index_put_(accumulate=True)``: sorted accumulation on CUDA, so repeated targets sum in a fixed order."""
    for a in range(0, hidden.shape[0], TARGET_ROWS):
        b = min(a + TARGET_ROWS, hidden.shape[0])
        acc.index_put_((index[a:b],), torch.mul(hidden[a:b], coef[a:b, None]), accumulate=True)  # fp32, a new tensor


def linear_logprob_bwd(grad, hidden, weight, targets, lse, logit_scale=1.0, softcap=None,
                       need_hidden=True, need_weight=True, chunk_rows=None, chunk_vocab=None, split="auto"):
    """Returns (d_hidden [N, D] or None, d_weight [V, D] or None), in the inputs' dtypes.

    split: "vocab" ([N, Vc] slabs; each d_weight slice finished in fp32 and written once, d_hidden
    accumulated in fp32), "rows" ([C, V] slabs; d_weight accumulated in fp32) or "auto" (vocab when V > N).
    The slab holds the softmax term in the GEMM dtype; the GEMMs accumulate into fp32, the target term
    (fp32) is added there, and each gradient is rounded to its dtype once.
    """
    if split not in BWD_SPLITS:
        raise ValueError(f"split must be one of {BWD_SPLITS}, got {split!r}")
    h_dtype, w_dtype = hidden.dtype, weight.dtype
    hidden, weight = tc.common_dtype(hidden, weight)
    targets, lse = targets.contiguous(), lse.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    if n == 0:
        return (torch.empty_like(hidden).to(h_dtype) if need_hidden else None,
                torch.zeros_like(weight).to(w_dtype) if need_weight else None)
    g = grad.float().contiguous()
    gt = torch.zeros(n, dtype=torch.float32, device=hidden.device)  # target term, filled by the dx kernel
    tgt = targets.long()
    dt, dev, elt = hidden.dtype, hidden.device, hidden.element_size()
    fp32 = dt == torch.float32
    interp = tc.interpreting(hidden)
    config = tc.pick_config(dt, interp)
    consts = dict(HAS_SOFTCAP=softcap is not None, EMULATE_RN=interp, **tc.dot_flags(dt, interp))
    dh = dw = None
    if split == "vocab" or (split == "auto" and v > n):
        cols = max(1, min(int(chunk_vocab or _bwd_chunk(n, v, elt)), v))
        if chunk_vocab is None and need_weight and not fp32:  # the slice's fp32 d_weight [Vc, D] near the budget too
            cols = min(cols, _bwd_chunk(d, v, 4))
        slab = _slab(n, cols, dt, dev)
        dh32 = torch.zeros(n, d, dtype=torch.float32, device=dev) if need_hidden else None
        if need_weight:
            dw = torch.empty_like(weight)
            acc = None if fp32 else torch.empty(cols, d, dtype=torch.float32, device=dev)
        for v0 in range(0, v, cols):
            w = weight[v0:v0 + cols]
            vc = w.shape[0]
            dx = _dx(hidden, w, targets, lse, g, gt, slab, v0, consts, config, logit_scale, softcap)
            if need_weight:  # [Vc, N] @ [N, D] plus the target rows of this slice, rounded once
                out = dw[v0:v0 + vc] if fp32 else acc[:vc]
                mm_fp32_(out, dx.T, hidden)
                in_slice = (tgt >= v0) & (tgt < v0 + vc)
                _add_target_rows_(out, (tgt - v0).clamp_(0, vc - 1), hidden, torch.where(in_slice, gt, 0.0))
                if not fp32:
                    dw[v0:v0 + vc].copy_(out)
            if need_hidden:
                addmm_fp32_(dh32, dx, w)  # [N, Vc] @ [Vc, D] into fp32 [N, D]
        if need_hidden:
            for a in range(0, n, TARGET_ROWS):
                b = min(a + TARGET_ROWS, n)
                dh32[a:b].addcmul_(weight[tgt[a:b]].float(), gt[a:b, None])
            dh = dh32
    else:
        rows = max(1, min(int(chunk_rows or _bwd_chunk(v, n, elt)), n))
        slab = _slab(rows, v, dt, dev)
        if need_hidden:
            dh = torch.empty_like(hidden)
            acc = None if fp32 else torch.empty(rows, d, dtype=torch.float32, device=dev)
        if need_weight:
            dw = torch.zeros(v, d, dtype=torch.float32, device=dev)
        for a in range(0, n, rows):
            b = min(a + rows, n)
            h = hidden[a:b]
            dx = _dx(h, weight, targets[a:b], lse[a:b], g[a:b], gt[a:b], slab, 0, consts, config, logit_scale,
                     softcap)
            if need_hidden:  # [C, V] @ [V, D] plus the target rows, rounded once
                out = dh[a:b] if fp32 else acc[: b - a]
                mm_fp32_(out, dx, weight)
                out.addcmul_(weight[tgt[a:b]].float(), gt[a:b, None])
                if not fp32:
                    dh[a:b].copy_(out)
            if need_weight:
                addmm_fp32_(dw, dx.T, h)
                _add_target_rows_(dw, tgt[a:b], h, gt[a:b])
    dh = None if dh is None else dh.to(h_dtype)
    dw = None if dw is None else dw.to(w_dtype)
    return dh, dw


class LinearLogprobs(torch.autograd.Function):
    """autograd glue: saves (hidden, weight, targets, lse) and recomputes dz in backward.

    With ``entropy`` the forward also returns the token entropy, which carries no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, logit_scale, softcap, num_splits, bwd, entropy):
        targets = targets.contiguous()  # backward reads targets with unit stride: save what the forward read
        logp, lse, ent = linear_logprob_fwd(hidden, weight, targets, logit_scale, softcap, num_splits, entropy)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.args = (logit_scale, softcap, bwd)
        if ent is None:
            return logp
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad, *_grad_entropy):
        hidden, weight, targets, lse = ctx.saved_tensors
        logit_scale, softcap, bwd = ctx.args
        dh, dw = linear_logprob_bwd(grad, hidden, weight, targets, lse, logit_scale, softcap,
                                    need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1], **bwd)
        return dh, dw, None, None, None, None, None, None


def triton_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           logit_scale: float = 1.0, softcap: float | None = None,
                           num_splits: int | None = None, bwd_chunk_rows: int | None = None,
                           bwd_chunk_vocab: int | None = None, bwd_split: str = "auto",
                           return_entropy: bool = False):
    """float32 ``[N]`` log-probs of ``targets`` under ``softmax(transform(hidden @ weight.T))``.

    hidden ``[N, D]``, weight ``[V, D]``, targets ``[N]``. Inputs are validated by
    ``freeprm.kernels.linear_logprobs``. Tuning knobs, chosen automatically when None:
    ``num_splits`` (vocab ranges per row block), ``bwd_split`` ("auto", "rows", "vocab"),
    ``bwd_chunk_rows`` / ``bwd_chunk_vocab`` (slab extent of the row / vocab split).
    ``return_entropy``: returns ``(logp, entropy)``, entropy float32 ``[N]`` without gradient.
    """
    bwd = dict(chunk_rows=bwd_chunk_rows, chunk_vocab=bwd_chunk_vocab, split=bwd_split)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearLogprobs.apply(hidden, weight, targets, logit_scale, softcap, num_splits, bwd, return_entropy)
    logp, _lse, ent = linear_logprob_fwd(hidden, weight, targets, logit_scale, softcap, num_splits, return_entropy)
    return (logp, ent) if return_entropy else logp

"""Linear + gathered log-softmax in Triton: ``logp[i] = log_softmax(transform(h_i W^T))[t_i]``.

Shapes: N = B*T tokens, D hidden size, V vocabulary. hidden ``[N, D]``, weight ``[V, D]``,
targets ``[N]``; out and the saved ``lse`` are float32 ``[N]``.

Forward, per token i (x_iv = h_i . w_v accumulated in fp32, z = transform(x)):
    z_iv   = s * x_iv                                    (no soft-cap)
    z_iv   = c * tanh(s * x_iv / c)                      (soft-cap c)
    lse_i  = log sum_v exp(z_iv)                          online over vocab tiles:
             m <- max(m, max_tile z);  l <- l * exp(m_old - m) + sum_tile exp(z - m)
    out_i  = z_{i,t_i} - lse_i                            z_{i,t_i} taken from the same fp32 tile
The vocab may be cut into SPLITS ranges (more programs when N is small, L2 reuse of the hidden
rows when it is large); each range writes its partial m + log(l) to a ``[SPLITS, N]`` buffer and a
tiny second kernel combines the ranges by a fixed-order logsumexp: deterministic, no atomics.
With SPLITS == 1 the kernel writes out and lse itself.

Backward, with g_i = dL/d out_i and p_iv = exp(z_iv - lse_i):
    dz_iv  = g_i * (onehot(t_i)_v - p_iv)
    dx_iv  = dz_iv * s                                   (no soft-cap)
    dx_iv  = dz_iv * s * (1 - tanh^2(s x_iv / c))        (soft-cap)
    d_hidden = dx @ W          [N, D]
    d_weight = dx^T @ h        [V, D]   accumulated in fp32 over row chunks
``dx`` is recomputed from (h, W, lse) by a Triton kernel one row chunk at a time into a
``[C, V]`` slab and fed to two cuBLAS GEMMs; ``[N, V]`` never exists and only ``lse`` is saved.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# backward slab budget: rows per chunk are chosen so one [C, V] dz slab stays near this size
BWD_SLAB_BYTES = 256 * 2**20

_COMBINE_BLOCK = 1024
# interpreter (CPU) tiles: few, large programs keep TRITON_INTERPRET=1 runs quick
_CPU_BLOCKS = dict(BLOCK_N=32, BLOCK_V=512, BLOCK_D=64)
# GPU tiles: the autotuned kernels pick among these. Educated guesses, not yet timed on a GPU; each
# compiles for sm_90 in bf16 to wgmma with a cp.async pipeline and no register spills (checked AOT
# without a GPU, tests/kernels/test_sm90_compile.py); 128x256 tiles spill and are left out.
_GPU_CONFIGS = [
    triton.Config(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64), num_warps=8, num_stages=4),
    triton.Config(dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=32), num_warps=8, num_stages=4),
]


def _interpreting(t: torch.Tensor) -> bool:
    return (not t.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# shared tile helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _logit_tile(
    H,  # [N, D] hidden (pointer to element 0), unit column stride
    W,  # [V, D] weight (pointer to element 0), unit column stride
    rows,  # [BLOCK_N] int64 token indices of this tile
    cols,  # [BLOCK_V] int64 vocab indices of this tile
    row_ok, col_ok, D, stride_h, stride_w, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """fp32 [BLOCK_N, BLOCK_V] tile of z = transform(h W^T), -inf past V, and tanh (soft-cap grad)."""
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = H + rows[:, None] * stride_h + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    w_ptrs = W + cols[:, None] * stride_w + offs_d[None, :]  # [BLOCK_V, BLOCK_D]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = offs_d < D - d0
        h = tl.load(h_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST_DOT:  # the interpreter multiplies 16-bit bit patterns wrongly (triton #11584)
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PREC)
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    x = acc * scale
    if HAS_SOFTCAP:
        y = x / softcap
        e = tl.exp(-2.0 * tl.abs(y))  # tanh(|y|) = (1 - e) / (1 + e), stable for large |y|
        th = (1.0 - e) / (1.0 + e)
        th = tl.where(y < 0, -th, th)
        z = softcap * th
    else:
        th = x
        z = x
    z = tl.where(col_ok[None, :], z, float("-inf"))
    return z, th


@triton.jit
def _row_block_partial(
    H,  # [N, D] hidden
    W,  # [V, D] weight
    rows, row_ok,
    tgt,  # [BLOCK_N] int64 target ids of these rows
    v_lo, v_hi, V, D, stride_h, stride_w, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Online (max, sum exp) over vocab [v_lo, v_hi) and the target logit if it lies there."""
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < v_hi
        z, _th = _logit_tile(H, W, rows, cols, row_ok, col_ok, D, stride_h, stride_w, scale, softcap,
                             HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, DOT_PREC)
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile holds >= 1 valid column
        l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    return m, l, zt


@triton.jit
def _range_lse(m, l):
    """m + log(l), and -inf for an empty vocab range (l == 0) without evaluating log(0)."""
    return tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), float("-inf"))


@triton.jit
def _lse_over_splits(
    PART,  # [SPLITS, N] fp32 per-range logsumexp, -inf for an empty range
    offs, ok, N, SPLITS: tl.constexpr,
):
    """Fixed-order logsumexp over the SPLITS ranges; 0 for rows where every range is empty."""
    m = tl.full(offs.shape, float("-inf"), tl.float32)
    for s in tl.static_range(SPLITS):
        m = tl.maximum(m, tl.load(PART + s * N + offs, mask=ok, other=0.0))
    m = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros(offs.shape, tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.exp(tl.load(PART + s * N + offs, mask=ok, other=0.0) - m)
    return m + tl.log(tl.where(acc > 0, acc, 1.0))


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


# out_i = z_{i,t_i} - lse_i, lse_i = log sum_v exp z_iv, z = transform(h W^T): online over vocab tiles
@triton.jit
def _linear_logprob_fwd_kernel(
    H,  # [N, D] hidden, row stride stride_h
    W,  # [V, D] weight, row stride stride_w
    TGT,  # [N] int32/int64 target ids in [0, V)
    OUT,  # [N] fp32: log-prob of the target (SPLITS == 1) or the target logit (SPLITS > 1)
    LSE,  # [N] fp32 logsumexp of the row (written when SPLITS == 1)
    PART,  # [SPLITS, N] fp32 logsumexp of each vocab range, -inf if empty (written when SPLITS > 1)
    N, V, D, stride_h, stride_w, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # flat program id: the SPLITS programs of one token block are adjacent, so they run together and
    # share the block's hidden rows through L2 while each streams its own slice of W
    pid = tl.program_id(0)
    pid_n = pid // SPLITS
    pid_s = pid % SPLITS
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(TGT + rows, mask=row_ok, other=0).to(tl.int64)
    v_per = tl.cdiv(tl.cdiv(V, SPLITS), BLOCK_V) * BLOCK_V
    v_lo = pid_s * v_per
    v_hi = tl.minimum(v_lo + v_per, V)
    m, l, zt = _row_block_partial(H, W, rows, row_ok, tgt, v_lo, v_hi, V, D, stride_h, stride_w, scale,
                                  softcap, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, DOT_PREC)
    if SPLITS == 1:
        lse = m + tl.log(l)
        tl.store(LSE + rows, lse, mask=row_ok)
        tl.store(OUT + rows, zt - lse, mask=row_ok)
    else:
        tl.store(PART + pid_s * N + rows, _range_lse(m, l), mask=row_ok)
        tl.store(OUT + rows, zt, mask=row_ok & (tgt >= v_lo) & (tgt < v_hi))


# lse_i = log sum_s exp(part_si) over the vocab ranges, out_i = z_{i,t_i} - lse_i
@triton.jit
def _linear_logprob_combine_kernel(
    PART,  # [SPLITS, N] fp32 per-range logsumexp written by _linear_logprob_fwd_kernel
    OUT,  # [N] fp32 in: target logit z_{i,t_i}; out: log-prob
    LSE,  # [N] fp32 out: logsumexp of the row
    N, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    lse = _lse_over_splits(PART, offs, ok, N, SPLITS)
    tl.store(LSE + offs, lse, mask=ok)
    tl.store(OUT + offs, tl.load(OUT + offs, mask=ok, other=0.0) - lse, mask=ok)


_linear_logprob_fwd_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["V", "D", "SPLITS"])(_linear_logprob_fwd_kernel)


def _dot_flags(dtype: torch.dtype, interpreting: bool) -> dict:
    # fp32 inputs get an IEEE fp32 dot (torch's default matmul does not use TF32 either)
    return dict(UPCAST_DOT=interpreting, DOT_PREC="ieee" if (dtype == torch.float32 or interpreting) else "tf32")


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# vocab ranges per token block on GPU even when N alone fills the machine: the adjacent programs of
# one block share its hidden rows in L2, so DRAM traffic per step is ~(programs / SPLITS) hidden
# blocks + SPLITS weight tiles instead of one hidden block per program. Costs 4 * SPLITS bytes per
# token of transient partials (3: 12 B + 4 B lse). An untuned default: measure on the GPU.
L2_SPLITS = 3


def _num_splits(n: int, v: int, device: torch.device, interpreting: bool) -> int:
    """Vocab ranges per token block: enough programs to fill the GPU, and at least L2_SPLITS."""
    if interpreting:
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    row_blocks = triton.cdiv(max(n, 1), 64)
    splits = max(triton.cdiv(2 * sms, row_blocks), L2_SPLITS)
    return int(max(1, min(splits, triton.cdiv(v, 2048), 64)))


def _common_dtype(hidden: torch.Tensor, weight: torch.Tensor):
    if hidden.dtype == weight.dtype:
        return hidden, weight
    dt = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(dt), weight.to(dt)


def linear_logprob_fwd(hidden, weight, targets, logit_scale=1.0, softcap=None, num_splits=None):
    """Launcher. Returns (logp [N] fp32, lse [N] fp32)."""
    hidden, weight = _common_dtype(hidden, weight)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    targets = targets.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return out, torch.empty_like(out)
    interp = _interpreting(hidden)
    splits = int(num_splits or _num_splits(n, v, hidden.device, interp))
    lse = torch.empty_like(out)
    part = torch.empty(splits, n, dtype=torch.float32, device=hidden.device) if splits > 1 else out  # else unused
    args = (hidden, weight, targets, out, lse, part, n, v, d, hidden.stride(0), weight.stride(0),
            float(logit_scale), float(softcap or 1.0))
    flags = dict(HAS_SOFTCAP=softcap is not None, SPLITS=splits, **_dot_flags(hidden.dtype, interp))
    if interp:
        grid = (splits * triton.cdiv(n, _CPU_BLOCKS["BLOCK_N"]),)
        _linear_logprob_fwd_kernel[grid](*args, **flags, **_CPU_BLOCKS)
    else:
        grid = lambda meta: (splits * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _linear_logprob_fwd_tuned[grid](*args, **flags)
    if splits > 1:  # out holds the target logits: a tiny second pass combines the ranges
        _linear_logprob_combine_kernel[(triton.cdiv(n, _COMBINE_BLOCK),)](part, out, lse, n, SPLITS=splits,
                                                                          BLOCK=_COMBINE_BLOCK)
    return out, lse


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


# dx_iv = g_i (onehot(t_i)_v - exp(z_iv - lse_i)) * dz/dx_iv, dz/dx = s or s (1 - tanh^2): one tile each
@triton.jit
def _linear_logprob_dx_kernel(
    H,  # [C, D] hidden rows of this chunk, row stride stride_h
    W,  # [V, D] weight, row stride stride_w
    TGT,  # [C] int32/int64 target ids of the chunk
    LSE,  # [C] fp32 logsumexp saved by the forward
    G,  # [C] fp32 upstream gradient dL/d out
    DX,  # [C, V] out: dL/dx (pre-transform logits) in the GEMM dtype, row stride stride_dx
    C, V, D, stride_h, stride_w, stride_dx, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # program (i, j): rows block i, vocab block j; consecutive programs share one weight tile
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < C
    col_ok = cols < V
    z, th = _logit_tile(H, W, rows, cols, row_ok, col_ok, D, stride_h, stride_w, scale, softcap,
                        HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, DOT_PREC)
    tgt = tl.load(TGT + rows, mask=row_ok, other=0).to(tl.int64)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])  # 0 past V (z = -inf)
    dz = tl.where(cols[None, :] == tgt[:, None], g[:, None], 0.0) - g[:, None] * p
    if HAS_SOFTCAP:
        dz = dz * (1.0 - th * th)
    dz = dz * scale
    dx_ptrs = DX + rows[:, None] * stride_dx + cols[None, :]
    tl.store(dx_ptrs, dz.to(DX.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_linear_logprob_dx_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["V", "D"])(_linear_logprob_dx_kernel)


def _bwd_chunk_rows(n: int, v: int, elt: int) -> int:
    rows = max(128, (BWD_SLAB_BYTES // max(v * elt, 1)) // 128 * 128)
    return min(rows, n)


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 and a, b possibly 16-bit: fp32 accumulation across chunks."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:  # cuBLAS 16-bit GEMM accumulating into an fp32 C in place (torch >= 2.8): no temporary
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
        try:  # fp32-output GEMM plus one [V, D] fp32 temporary
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc.addmm_(a.float(), b.float())


def linear_logprob_bwd(grad, hidden, weight, targets, lse, logit_scale=1.0, softcap=None,
                       need_hidden=True, need_weight=True, chunk_rows=None):
    """Returns (d_hidden [N, D] or None, d_weight [V, D] or None), in the inputs' dtypes."""
    h_dtype, w_dtype = hidden.dtype, weight.dtype
    hidden, weight = _common_dtype(hidden, weight)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    g = grad.float().contiguous()
    interp = _interpreting(hidden)
    chunk = int(chunk_rows or _bwd_chunk_rows(n, v, hidden.element_size()))
    chunk = max(1, min(chunk, n)) if n else 1
    dh = torch.empty_like(hidden) if need_hidden else None
    single = n <= chunk
    dw = None
    if need_weight and not single:
        dw = torch.zeros(v, d, dtype=torch.float32, device=hidden.device)
    slab = torch.empty(min(chunk, max(n, 1)), v, dtype=hidden.dtype, device=hidden.device)
    flags = dict(HAS_SOFTCAP=softcap is not None, **_dot_flags(hidden.dtype, interp))
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        c = b - a
        dx = slab[:c]
        args = (hidden[a:b], weight, targets[a:b], lse[a:b], g[a:b], dx, c, v, d, hidden.stride(0), weight.stride(0),
                dx.stride(0), float(logit_scale), float(softcap or 1.0))
        if interp:
            grid = (triton.cdiv(c, _CPU_BLOCKS["BLOCK_N"]), triton.cdiv(v, _CPU_BLOCKS["BLOCK_V"]))
            _linear_logprob_dx_kernel[grid](*args, **flags, **_CPU_BLOCKS)
        else:
            grid = lambda meta: (triton.cdiv(c, meta["BLOCK_N"]), triton.cdiv(v, meta["BLOCK_V"]))  # noqa: E731
            _linear_logprob_dx_tuned[grid](*args, **flags)
        if need_hidden:
            torch.mm(dx, weight, out=dh[a:b])  # [C, V] @ [V, D]
        if need_weight:
            if single:
                dw = dx.T @ hidden[a:b]  # one GEMM, fp32 accumulation inside it
            else:
                _addmm_fp32_(dw, dx.T, hidden[a:b])
    if need_weight and n == 0:
        dw = torch.zeros_like(weight)
    dh = None if dh is None else dh.to(h_dtype)
    dw = None if dw is None else dw.to(w_dtype)
    return dh, dw


class LinearLogprobs(torch.autograd.Function):
    """autograd glue: saves (hidden, weight, targets, lse) and recomputes dz in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, logit_scale, softcap, num_splits, bwd_chunk_rows):
        logp, lse = linear_logprob_fwd(hidden, weight, targets, logit_scale, softcap, num_splits)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.args = (logit_scale, softcap, bwd_chunk_rows)
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        logit_scale, softcap, chunk_rows = ctx.args
        dh, dw = linear_logprob_bwd(grad, hidden, weight, targets, lse, logit_scale, softcap,
                                    need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1],
                                    chunk_rows=chunk_rows)
        return dh, dw, None, None, None, None, None


def triton_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                           logit_scale: float = 1.0, softcap: float | None = None,
                           num_splits: int | None = None, bwd_chunk_rows: int | None = None) -> torch.Tensor:
    """float32 ``[N]`` log-probs of ``targets`` under ``softmax(transform(hidden @ weight.T))``.

    hidden ``[N, D]``, weight ``[V, D]``, targets ``[N]``. Inputs are validated by
    ``freeprm.kernels.linear_logprobs``; ``num_splits`` (vocab ranges per row block) and
    ``bwd_chunk_rows`` (rows per backward slab) are tuning knobs, chosen automatically when None.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearLogprobs.apply(hidden, weight, targets, logit_scale, softcap, num_splits, bwd_chunk_rows)
    return linear_logprob_fwd(hidden, weight, targets, logit_scale, softcap, num_splits)[0]

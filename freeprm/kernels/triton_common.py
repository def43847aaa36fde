"""Shared Triton pieces of the linear + log-softmax kernels (``linear_logprob_kernel.py``, ``reward_kernel.py``).

Device code: the logit tile (``logit_tile``), the online (max, sum exp[, sum exp * z]) over one
vocab range for a block of rows (``row_block_partial``), the split-vocab prologue (``split_prologue``)
and the range / split logsumexp helpers. Host code: tile configs (pinned, so results do not depend
on timing), the vocab split count, the dot precision flags, input dtype resolution, and one
``launch`` through which every kernel of the package starts.

Introspection seam (used by tests, never by production code): every launcher reaches the device
only through three functions of this module, looked up at call time, ``launch(kernel, grid, args,
consts, config, **options)``, ``interpreting(tensor)`` and ``sm_count(device)``. Replacing them
(``tests/kernels/_launches.py``) records the launches a call would make on a GPU, from meta
tensors, without running anything; nothing else here exists for tests.

Online logsumexp over vocab tiles, per row (z the fp32 logits of one tile, -inf past the range), with
alpha = exp(m - m'):
    m' = max(m, max_v z_v);  l' = alpha l + sum_v exp(z_v - m')
    s' = alpha (s + (m - m') l) + sum_v exp(z_v - m') (z_v - m')      (entropy only)
so that lse = m + log l and, s being sum_v exp(z_v - m) (z_v - m) relative to the running max, the
entropy of the range is H = log l - s / l (small terms: no cancellation of lse against E_p[z] when
the logits share a large offset). Ranges k with (m_k, l_k, H_k) combine (``combine_splits``) as
    M = max_k m_k,  L = sum_k exp(m_k - M) l_k,  lse = M + log L,  w_k = exp(m_k - M) l_k / L
    H = sum_k w_k (H_k - log w_k),  log w_k = (m_k - M) + log l_k - log L
(log w_k from lse_k - lse would carry the rounding of two lse-sized numbers: ulp(100) ~ 8e-6).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

COMBINE_BLOCK = 1024
# interpreter (CPU) tiles: few, large programs keep TRITON_INTERPRET=1 runs quick
CPU_BLOCKS = dict(BLOCK_N=32, BLOCK_V=512, BLOCK_D=64)

# GPU tile candidates. Each compiles for sm_90 in bf16 to wgmma with a cp.async pipeline and no
# register spills (tests/kernels/test_sm90_compile.py); 128x256 tiles spill and are left out. Their timings:
# `bench/bench_kernels.py --config` (status in docs/kernels.md).
GPU_CONFIGS = [
    triton.Config(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64), num_warps=8, num_stages=4),
    triton.Config(dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=32), num_warps=8, num_stages=4),
]
# pinned defaults (no autotune): the vocab-range boundaries and the accumulation order depend on the
# tiles, so a timing-based choice would make results differ between processes. 16-bit inputs take
# the first candidate; fp32 (tf32 or IEEE dots) halves BLOCK_D to keep the same shared memory.
PINNED_16BIT = GPU_CONFIGS[0]
PINNED_FP32 = triton.Config(dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32), num_warps=8, num_stages=3)
# fp32 with IEEE dots (torch's default precision, "highest") runs on the FMA units, whose operands sit in
# registers: at 128x128 the forward and the fused reward spill on sm_90 (255 registers and a 16-176 byte
# stack). 64x128 tiles over 16-wide D slices compile without spills for every launch the Scorer and the
# trainer make (tests/kernels/test_sm90_compile.py); FMA-bound, they lose nothing to the smaller tile.
PINNED_FP32_IEEE = triton.Config(dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=16), num_warps=8, num_stages=3)
CONFIG_ENV = "FREEPRM_TRITON_CONFIG"  # e.g. "BLOCK_N=64,BLOCK_V=256,BLOCK_D=64,num_warps=8,num_stages=3"

# vocab ranges per token block on GPU even when N alone fills the machine: the adjacent programs of
# one block share its hidden rows in L2 (see docs/kernels.md). An untuned default: measure on a GPU.
L2_SPLITS = 3
MAX_SPLITS = 64
MIN_RANGE_TILES = 4  # a vocab range spans at least this many BLOCK_V tiles
# a split count within this fraction of the best wave utilisation is good enough (fewer splits win)
WAVE_SLACK = 0.95


def interpreting(t: torch.Tensor) -> bool:
    """True when kernels on ``t`` run under the Triton interpreter (CPU tensors or TRITON_INTERPRET=1)."""
    return (not t.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def logit_tile(
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
def row_block_partial(
    H,  # [N, D] hidden
    W,  # [V, D] weight
    rows, row_ok,
    tgt,  # [BLOCK_N] int64 target ids of these rows
    v_lo, v_hi, D, stride_h, stride_w, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Online (max m, sum exp l, sum exp * (z - m) s) over vocab [v_lo, v_hi) and the target logit if it lies there.

    s (relative to the running max m: the range's entropy is log l - s / l) is 0 unless HAS_ENT.
    Empty range: m = -inf, l = 0.
    """
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < v_hi
        z, _th = logit_tile(H, W, rows, cols, row_ok, col_ok, D, stride_h, stride_w, scale, softcap,
                            HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, DOT_PREC)
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile holds >= 1 valid column
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])  # 0 past the range
        if HAS_ENT:  # re-base s from m to m_new, then add the tile (p = 0 past the range; l = 0 before any tile)
            s = alpha * (s + tl.where(l > 0, (m - m_new) * l, 0.0))
            s += tl.sum(p * tl.where(col_ok[None, :], z - m_new[:, None], 0.0), axis=1)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    return m, l, s, zt


@triton.jit
def split_prologue(
    TGT,  # [N] int32/int64 target ids
    N, V, SPLITS,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Rows, targets and vocab range [v_lo, v_hi) of this program in a flat split-vocab grid.

    The SPLITS programs of one token block are adjacent, so they run together and share the
    block's hidden rows through L2 while each streams its own slice of W.
    """
    pid = tl.program_id(0)
    pid_n = pid // SPLITS
    pid_s = pid % SPLITS
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(TGT + rows, mask=row_ok, other=0).to(tl.int64)
    v_per = tl.cdiv(tl.cdiv(V, SPLITS), BLOCK_V) * BLOCK_V
    v_lo = pid_s * v_per
    v_hi = tl.minimum(v_lo + v_per, V)
    return rows, row_ok, tgt, pid_s, v_lo, v_hi


@triton.jit
def cast_rn(
    x,  # fp32 block
    DTYPE: tl.constexpr,  # target float dtype (e.g. a pointer's element type)
    EMULATE_RN: tl.constexpr,  # True under the interpreter: round fp32 -> bf16 with integer ops
):
    """x in DTYPE rounded to nearest, ties to even (what a GPU's cvt.rn does).

    The interpreter (triton 3.9) truncates fp32 -> bf16 toward zero whatever the rounding mode asked
    for, so there the rounding is spelled out on the bits: add 0x7FFF plus the lowest kept bit, keep
    the high 16 bits. fp16 and same-dtype casts are exact in both.
    """
    if EMULATE_RN and DTYPE == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE, fp_downcast_rounding="rtne")


@triton.jit
def safe_log(l):
    """log(l) for l > 0 and 0 where l == 0 (an empty or skipped range)."""
    return tl.log(tl.where(l > 0, l, 1.0))


@triton.jit
def range_lse(m, l):
    """m + log(l), and -inf for an empty vocab range (l == 0) without evaluating log(0)."""
    return tl.where(l > 0, m + safe_log(l), float("-inf"))


@triton.jit
def lse_over_splits(
    PART,  # [SPLITS, N] fp32 per-range logsumexp, -inf for an empty range
    offs, ok, N, SPLITS,
):
    """Fixed-order logsumexp over the SPLITS ranges; 0 for rows where every range is empty."""
    m = tl.full(offs.shape, float("-inf"), tl.float32)
    for k in range(0, SPLITS):
        m = tl.maximum(m, tl.load(PART + k * N + offs, mask=ok, other=0.0))
    m = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros(offs.shape, tl.float32)
    for k in range(0, SPLITS):
        acc += tl.exp(tl.load(PART + k * N + offs, mask=ok, other=0.0) - m)
    return m + safe_log(acc)


@triton.jit
def combine_splits(
    PART,  # [2 + HAS_ENT, SPLITS, N] fp32 per-range max m_k (-inf if empty), sum exp l_k (0 if empty), entropy H_k
    offs, ok, N, SPLITS,
    HAS_ENT: tl.constexpr,
):
    """(lse, entropy) of each row over the SPLITS vocab ranges, in a fixed order; entropy 0 unless HAS_ENT.

    M = max_k m_k, L = sum_k exp(m_k - M) l_k, lse = M + log L; with w_k = exp(m_k - M) l_k / L,
    log w_k = (m_k - M) + log l_k - log L (no difference of two lse-sized numbers) and
    H = sum_k w_k (H_k - log w_k).
    """
    mx = tl.full(offs.shape, float("-inf"), tl.float32)
    for k in range(0, SPLITS):
        mx = tl.maximum(mx, tl.load(PART + k * N + offs, mask=ok, other=float("-inf")))
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    big_l = tl.zeros(offs.shape, tl.float32)
    for k in range(0, SPLITS):
        m_k = tl.load(PART + k * N + offs, mask=ok, other=float("-inf"))
        big_l += tl.exp(m_k - mx) * tl.load(PART + (SPLITS + k) * N + offs, mask=ok, other=0.0)
    log_l = safe_log(big_l)
    ent = tl.zeros(offs.shape, tl.float32)
    if HAS_ENT:
        inv_l = 1.0 / tl.where(big_l > 0, big_l, 1.0)
        for k in range(0, SPLITS):
            m_k = tl.load(PART + k * N + offs, mask=ok, other=float("-inf"))
            l_k = tl.load(PART + (SPLITS + k) * N + offs, mask=ok, other=0.0)
            h_k = tl.load(PART + (2 * SPLITS + k) * N + offs, mask=ok, other=0.0)
            w = tl.exp(m_k - mx) * l_k * inv_l
            log_w = (m_k - mx) + safe_log(l_k) - log_l
            ent += tl.where(l_k > 0, w * (h_k - log_w), 0.0)
    return mx + log_l, ent


# ----------------------------------------------------------------------------------------------
# host helpers
# ----------------------------------------------------------------------------------------------


def dot_flags(dtype: torch.dtype, interp: bool) -> dict:
    """Constexprs of the ``tl.dot`` in ``logit_tile``.

    fp32 inputs follow ``torch.get_float32_matmul_precision()``: "highest" (torch's default) keeps
    IEEE fp32 dots; "high" or "medium" allow TF32 tensor cores, as they do for torch's matmuls.
    16-bit inputs always take native tensor-core dots with fp32 accumulation (the flag is ignored).
    """
    if interp:
        return dict(UPCAST_DOT=True, DOT_PREC="ieee")
    return dict(UPCAST_DOT=False, DOT_PREC="ieee" if ieee_fp32(dtype) else "tf32")


def ieee_fp32(dtype: torch.dtype) -> bool:
    """fp32 inputs at torch's "highest" matmul precision: IEEE fp32 dots on the GPU (no tensor cores)."""
    return dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def common_dtype(hidden: torch.Tensor, weight: torch.Tensor):
    """Both operands in one dtype (the promoted one), each with a unit last stride."""
    if hidden.dtype != weight.dtype:
        dt = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(dt), weight.to(dt)
    return (hidden if hidden.stride(-1) == 1 else hidden.contiguous(),
            weight if weight.stride(-1) == 1 else weight.contiguous())


def _parse_config(text: str) -> triton.Config:
    kv = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        kv[k.strip()] = int(v)
    blocks = {k: kv.pop(k) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")}
    return triton.Config(blocks, num_warps=kv.pop("num_warps", 8), num_stages=kv.pop("num_stages", 3))


def pick_config(dtype: torch.dtype, interp: bool, entropy: bool = False) -> triton.Config:
    """The tile config of the GEMM-like kernels: a function of (dtype, matmul precision, entropy, environment), never timing.

    ``FREEPRM_TRITON_CONFIG`` overrides the pinned default on GPU (for tuning runs). With entropy
    the forward keeps a second fp32 tile (p * (z - m)) live, which at 128x128 spills on sm_90, so
    BLOCK_V is halved (the override's too).
    """
    if interp:
        return triton.Config(dict(CPU_BLOCKS), num_warps=4, num_stages=1)
    env = os.environ.get(CONFIG_ENV)
    if env:
        base = _parse_config(env)
    else:
        base = PINNED_16BIT if dtype != torch.float32 else PINNED_FP32_IEEE if ieee_fp32(dtype) else PINNED_FP32
    if entropy:
        return triton.Config(dict(base.kwargs, BLOCK_V=max(16, base.kwargs["BLOCK_V"] // 2)), num_warps=base.num_warps,
                             num_stages=base.num_stages)
    return base


def programs_per_sm(config: triton.Config, elt: int) -> int:
    """Resident programs per SM (H100-class: 228 KB shared memory, 64k registers), an estimate.

    Shared memory: num_stages * (BLOCK_N + BLOCK_V) * BLOCK_D operand bytes; registers: the hot
    kernels use up to ~255 per thread at 128x128 tiles (sm_90 compile test), so 8 warps fit once.
    """
    k = config.kwargs
    smem = config.num_stages * (k["BLOCK_N"] + k["BLOCK_V"]) * k["BLOCK_D"] * elt
    by_smem = max(1, (228 * 1024) // max(smem, 1))
    by_regs = max(1, 65536 // (config.num_warps * 32 * 255))
    return int(min(by_smem, by_regs))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_splits(n: int, v: int, block_n: int, block_v: int, wave: int) -> int:
    """Vocab ranges per token block: the fewest (>= L2_SPLITS) that fill whole waves of programs.

    ``wave`` is the number of programs resident at once (SMs x programs per SM). Utilisation of a
    grid of P programs is P / (ceil(P / wave) * wave); the count taken is the smallest within
    WAVE_SLACK of the best over [L2_SPLITS, cap], cap keeping >= MIN_RANGE_TILES tiles per range.
    """
    blocks = triton.cdiv(max(n, 1), block_n)
    hi = max(1, min(MAX_SPLITS, v // (MIN_RANGE_TILES * block_v)))
    lo = min(L2_SPLITS, hi)

    def util(s):
        p = blocks * s
        return p / (triton.cdiv(p, wave) * wave)

    best = max(util(s) for s in range(lo, hi + 1))
    return next(s for s in range(lo, hi + 1) if util(s) >= WAVE_SLACK * best)


def num_splits(n: int, v: int, config: triton.Config, elt: int, device: torch.device, interp: bool) -> int:
    """Vocab split count for a launch (1 under the interpreter)."""
    if interp:
        return 1
    wave = sm_count(device) * programs_per_sm(config, elt)
    return choose_splits(n, v, config.kwargs["BLOCK_N"], config.kwargs["BLOCK_V"], wave)


# ----------------------------------------------------------------------------------------------
# launch
# ----------------------------------------------------------------------------------------------


def launch(kernel, grid: tuple, args: tuple, consts: dict, config: triton.Config | None = None,
           **options) -> None:
    """``kernel[grid](*args, **consts, **config)``; the one place kernels of this package start."""
    consts, options = with_config(consts, options, config)
    if interpreting_env():
        options = {}
    kernel[tuple(grid)](*args, **consts, **options)


def with_config(consts: dict, options: dict, config: triton.Config | None) -> tuple[dict, dict]:
    """(constexprs, launch options) of a launch: ``config``'s block sizes, warps and stages merged in."""
    if config is None:
        return dict(consts), dict(options)
    return ({**consts, **config.kwargs},
            {**dict(num_warps=config.num_warps, num_stages=config.num_stages), **options})


def interpreting_env() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def split_vocab_launch(kernel, n: int, splits: int, args: tuple, consts: dict, config: triton.Config) -> None:
    """Flat grid of ``splits`` programs per BLOCK_N token block (``split_prologue``'s layout)."""
    launch(kernel, (splits * triton.cdiv(n, config.kwargs["BLOCK_N"]),), args,
           dict(consts, SPLIT=splits > 1), config)

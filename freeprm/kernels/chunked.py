"""Linear + gathered log-softmax in plain torch, chunked over tokens: the CPU path.

Math (per token i, x_i = h_i . W^T in fp32, z = transform(x), t_i the target):
    lse_i  = logsumexp_v z_iv
    out_i  = z_{i,t_i} - lse_i
Gradient, with g_i = d loss / d out_i and p = softmax(z_i):
    dz_iv  = g_i * (onehot(t_i)_v - p_iv)
    dx_iv  = dz_iv * dz/dx      (scale, times 1 - tanh^2 under soft-cap)
    dh_i   = sum_v dx_iv W_v               d_hidden = dx @ W        [N, D]
    dW_v   = sum_i dx_iv h_i               d_weight = dx^T @ h      [V, D]
Forward: [rows, vocab block] tiles small enough for L2, the per-tile max and sum of exp merged at
the end (``lse_torch``), target logits as rowwise dots (``target_logits``); for fp32 CPU inputs the
C++ kernel in ``csrc/cpu_head.cpp`` does the same tile loop inside one parallel region (threads own
row blocks), when it could be built (``cpu_ext.get()``). Only ``lse`` ([N] fp32) is saved;
``[chunk, vocab block]`` tiles of logits are recomputed in backward, so the full ``[N, V]`` matrix
never exists, in forward or backward. The backward recomputes tiles of logits and feeds the gradient
GEMMs from each (C++ ``softmax_bwd``: [BWD_ROWS, BWD_COLS] per thread; pure torch: 2048 rows x up to
32 MB, ``_tiles``).
"""

from __future__ import annotations

import torch

from . import cpu_ext

# Tiles: token chunks of CHUNK_ROWS rows x vocab blocks sized so one fp32 [rows, block] tile stays
# near TILE_BYTES. The weight is then read once per token chunk (not once per few rows, which made
# the pass memory-bound on large vocabularies), and the logsumexp runs online across vocab blocks.
DEFAULT_CHUNK_ROWS = 2048
TILE_BYTES = 32 * 2**20
MIN_VOCAB_BLOCK = 1024
# Forward tiles (no gradient to keep, so they can be small): [FWD_ROWS, FWD_TILE_ELEMS / FWD_ROWS] fp32,
# 1 MB: stays in L2 between the GEMM that writes it and the max / exp / sum that read it (the tile-size
# measurement: docs/kernels.md, CPU path).
FWD_ROWS = 256
FWD_TILE_ELEMS = 256 * 1024
# Take the C++ forward (csrc/cpu_head.cpp) for fp32 CPU inputs when it is built; False forces the
# pure-torch forward (``lse_torch``); so does the environment variable FREEPRM_CPU_EXT=0.
USE_EXT = True
# The pure-torch forward keeps large tiles (2048 x 4096 fp32): with 2 threads on shared cores its
# per-tile ops each end in a thread barrier, so many small tiles were measured 3x slower than these.
TORCH_FWD_ROWS = 2048
TORCH_FWD_TILE_ELEMS = 2048 * 4096
# C++ backward (csrc/cpu_head.cpp ``softmax_bwd``): per-thread [BWD_ROWS, BWD_COLS] fp32 tiles; threads take vocab
# blocks; rows go in chunks whose per-thread d_hidden partials stay under BWD_PARTIAL_BYTES. Measured at N=4096,
# D=576, V=49152 on 2 shared cores (fwd + bwd, interleaved): 1024 x 1024 (4 MB) was about 3-5% faster than
# 512 x 1024 and 256 x 512 (the dh / dW GEMMs have K = cols / rows: larger K runs MKL closer to its peak,
# and the few element-wise passes cost under 2% of the tile's GEMMs even from L3).
BWD_ROWS = 1024
BWD_COLS = 1024
BWD_PARTIAL_BYTES = 64 * 2**20


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


def _transform_(z: torch.Tensor, logit_scale: float, softcap: float | None) -> torch.Tensor:
    """In place: z <- softcap(logit_scale * z)."""
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def target_logits(hidden, weight, targets, logit_scale=1.0, softcap=None, chunk_rows=None):
    """z_{i, t_i} for every row, as rowwise dots ``(h_i * W[t_i]).sum()`` in fp32: [N] fp32.

    One gather of target rows per token chunk instead of a per-tile search of the targets."""
    n = hidden.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    rows = chunk_rows or DEFAULT_CHUNK_ROWS
    for a in range(0, n, rows):
        b = min(a + rows, n)
        wt = weight[targets[a:b]].float()  # [C, D]
        torch.sum(wt.mul_(hidden[a:b]), -1, out=out[a:b])
    return _transform_(out, logit_scale, softcap)


def _fwd_blocks(rows: int, vocab: int, max_rows: int = FWD_ROWS, tile_elems: int = FWD_TILE_ELEMS) -> tuple[int, int]:
    """(row block, vocab block) of a forward's tiles of about ``tile_elems`` fp32 elements."""
    r = max(1, min(max_rows, rows))
    return r, max(1, min(vocab, tile_elems // r))


def lse_torch(hidden, weight, logit_scale=1.0, softcap=None):
    """logsumexp_v softcap(logit_scale * h W^T) per row, tile by tile in plain torch: [N] fp32.

    Tiles of [TORCH_FWD_ROWS, vocab block] fp32 are written by ``torch.mm(out=)``
    into one reused buffer; each tile's row max and sum of exp(z - max) go to [blocks, N] tables,
    merged at the end. No [N, V] logits and no per-tile allocation beyond [rows] vectors."""
    n, vocab = hidden.shape[0], weight.shape[0]
    h32 = hidden if hidden.dtype == torch.float32 else hidden.float()
    w32 = weight if weight.dtype == torch.float32 else weight.float()
    r_blk, v_blk = _fwd_blocks(n, vocab, TORCH_FWD_ROWS, TORCH_FWD_TILE_ELEMS)
    nb = -(-vocab // v_blk)
    buf = torch.empty(r_blk * v_blk, dtype=torch.float32, device=hidden.device)
    mx = torch.empty(nb, n, dtype=torch.float32, device=hidden.device)  # per-block row max
    se = torch.empty(nb, n, dtype=torch.float32, device=hidden.device)  # per-block sum exp(z - max)
    for a in range(0, n, r_blk):
        b = min(a + r_blk, n)
        h = h32[a:b]
        for j in range(nb):
            v0, v1 = j * v_blk, min((j + 1) * v_blk, vocab)
            z = buf[: (b - a) * (v1 - v0)].view(b - a, v1 - v0)  # [r, c], contiguous
            torch.mm(h, w32[v0:v1].T, out=z)
            _transform_(z, logit_scale, softcap)
            m = torch.amax(z, -1, out=mx[j, a:b])
            torch.sum(z.sub_(m[:, None]).exp_(), -1, out=se[j, a:b])
    m = mx.amax(0)  # [N]
    return m + se.mul_(mx.sub_(m).exp_()).sum(0).log_()


def chunked_linear_logprobs_fwd(hidden, weight, targets, logit_scale=1.0, softcap=None, chunk_rows=None):
    """Returns (logp [N] fp32, lse [N] fp32).

    fp32 inputs take the C++ kernel (``csrc/cpu_head.cpp``) when it is built, else ``lse_torch``."""
    tgt = targets.long()
    ext = _ext_for(hidden, weight)
    if ext is not None:
        r_blk, v_blk = _fwd_blocks(max(1, -(-hidden.shape[0] // torch.get_num_threads())), weight.shape[0])
        lse, zt = ext.lse_target_fwd(hidden.detach().contiguous(), weight.detach().contiguous(), tgt.contiguous(),
                                     float(logit_scale), float(softcap) if softcap is not None else -1.0,
                                     r_blk, v_blk)
    else:
        lse = lse_torch(hidden, weight, logit_scale, softcap)
        zt = target_logits(hidden, weight, tgt, logit_scale, softcap, chunk_rows)
    return zt - lse, lse


def _ext_for(hidden, weight):
    if not USE_EXT or hidden.device.type != "cpu" or hidden.dtype != torch.float32 or weight.dtype != torch.float32:
        return None
    return cpu_ext.get()


def _softmax_bwd_torch(hidden, weight, lse, coef, logit_scale, softcap, chunk_rows, need_hidden, need_weight):
    """The softmax term of the backward in plain torch (what ``softmax_bwd`` in csrc/cpu_head.cpp computes):
    dx = coef[:, None] * exp(z - lse[:, None]) * dz/dx, d_hidden = dx W, d_weight = dx^T h, both fp32.

    Tiles of [chunk rows, vocab block] (2048 x up to 32 MB) written by ``torch.mm(out=)`` into reused buffers
    and turned into dx in place; the gradient GEMMs accumulate with ``addmm_``."""
    n, vocab = hidden.shape[0], weight.shape[0]
    w32 = weight if weight.dtype == torch.float32 else weight.float()
    dh32 = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_hidden else None
    dw32 = torch.zeros_like(w32, dtype=torch.float32) if need_weight else None
    buf = dbuf = None
    for a, b, blocks in _tiles(n, vocab, chunk_rows):
        h32 = hidden[a:b] if hidden.dtype == torch.float32 else hidden[a:b].float()
        lse_r, coef_r = lse[a:b, None], coef[a:b, None]
        if buf is None:
            size = (b - a) * (blocks[0][1] - blocks[0][0])
            buf = torch.empty(size, dtype=torch.float32, device=hidden.device)
            dbuf = torch.empty_like(buf) if softcap is not None else None
        for v0, v1 in blocks:
            x = buf[: (b - a) * (v1 - v0)].view(b - a, v1 - v0)  # [C, Vb] fp32
            torch.mm(h32, w32[v0:v1].T, out=x)
            if softcap is not None:
                x.mul_(logit_scale / softcap).tanh_()  # th
                dd = torch.mul(x, x, out=dbuf[: x.numel()].view_as(x)).neg_().add_(1.0)  # 1 - th^2
                x.mul_(softcap).sub_(lse_r).exp_().mul_(dd).mul_(coef_r)
            else:
                if logit_scale != 1.0:
                    x.mul_(logit_scale)
                x.sub_(lse_r).exp_().mul_(coef_r)
            if need_hidden:
                dh32[a:b].addmm_(x, w32[v0:v1])
            if need_weight:
                dw32[v0:v1].addmm_(x.T, h32)
    return dh32, dw32


def _bwd_chunk_rows(d: int) -> int:
    """Rows per parallel region of the C++ backward: its d_hidden partials stay under BWD_PARTIAL_BYTES."""
    extra = max(1, torch.get_num_threads() - 1)
    return max(BWD_ROWS, BWD_PARTIAL_BYTES // (4 * max(d, 1) * extra))


def chunked_linear_logprobs_bwd(grad, hidden, weight, targets, lse, logit_scale=1.0, softcap=None,
                                chunk_rows=None, need_hidden=True, need_weight=True):
    """Returns (d_hidden [N, D] in hidden's dtype or None, d_weight [V, D] in weight's dtype or None).

    dz_iv = g_i (onehot(t_i)_v - p_iv) splits into the softmax term (C++ ``softmax_bwd`` for fp32 CPU inputs,
    else ``_softmax_bwd_torch``: the three GEMM-sized products, tile by tile) and the target term
    g_i s d_i at (i, t_i) (d_i = 1 - tanh^2 under soft-cap, else 1), added here with one gather and one
    ``index_add_``: O(N D), no per-tile search of the targets."""
    n = hidden.shape[0]
    g = grad.float()
    coef = g * (-float(logit_scale))  # [N]: d loss / d x of the softmax term, per row
    ext = _ext_for(hidden, weight)
    if ext is not None and (need_hidden or need_weight):
        dh32, dw32 = ext.softmax_bwd(hidden.detach().contiguous(), weight.detach().contiguous(), lse.float(), coef,
                                     float(logit_scale), float(softcap) if softcap is not None else -1.0,
                                     BWD_ROWS, BWD_COLS, int(chunk_rows or _bwd_chunk_rows(hidden.shape[1])),
                                     need_hidden, need_weight)
        dh32 = dh32 if need_hidden else None
        dw32 = dw32 if need_weight else None
    else:
        dh32, dw32 = _softmax_bwd_torch(hidden, weight, lse, coef, logit_scale, softcap, chunk_rows,
                                        need_hidden, need_weight)
    tgt = targets.long()
    gt = g * float(logit_scale)  # [N]: the target term's coefficient
    if softcap is not None:
        th = target_logits(hidden, weight, tgt, logit_scale, softcap, chunk_rows).div_(softcap)
        gt = gt * (1.0 - th * th)
    rows = chunk_rows or DEFAULT_CHUNK_ROWS
    for a in range(0, n, rows):  # bounded [rows, D] temporaries
        b = min(a + rows, n)
        if need_hidden:
            dh32[a:b].addcmul_(weight[tgt[a:b]].float(), gt[a:b, None])
        if need_weight:
            dw32.index_add_(0, tgt[a:b], hidden[a:b].float() * gt[a:b, None])
    dh = None if dh32 is None else dh32.to(hidden.dtype)
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

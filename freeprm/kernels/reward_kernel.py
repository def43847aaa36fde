"""Implicit-PRM token rewards in Triton (arXiv 2412.01981, eq. 3 per token).

Token rewards, elementwise over N = B*T tokens (m the mask, 0 or 1):
    r_t = beta * (lp_t - lpref_t) * m_t          (lpref = 0 when reference-free)
    dr/dlp_t = beta * m_t                        dr/dlpref_t = -beta * m_t
Masked tokens give exactly 0 (a select, not a product, so a NaN there does not leak).

Fused policy - reference rewards from hidden states, one launch reading both (h, W) pairs:
    lp_t    = z^pol_{t, y_t} - lse^pol_t,  z^pol = transform(h^pol_t W_pol^T)     (as in
    lpref_t = z^ref_{t, y_t} - lse^ref_t,  z^ref = transform(h^ref_t W_ref^T)      linear_logprob_kernel)
    r_t     = beta * (lp_t - lpref_t) * m_t
Each program owns a block of tokens and one vocab range, runs the online (max, sum exp) of
both models over that range and, with a single range, writes r_t directly; with several ranges
it writes a per-range logsumexp per model and a tiny second kernel combines them in a fixed order.
Token blocks whose mask is all 0 skip the vocab loop. Forward only (the scorer runs under
no_grad); with gradients on, the differentiable kernels are composed instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as tc
from .linear_logprob_kernel import triton_linear_logprobs
from .triton_common import cast_rn, lse_over_splits, range_lse, row_block_partial, safe_log, split_prologue

_ELEM_BLOCK = 1024


def _mask_arg(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Flat mask readable by the kernels (bool viewed as uint8); a dummy pointer when None."""
    if mask is None:
        return like
    mask = mask.reshape(-1).contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


# ----------------------------------------------------------------------------------------------
# token rewards from log-probs
# ----------------------------------------------------------------------------------------------


# r_t = beta (lp_t - lpref_t) m_t
@triton.jit
def _token_reward_fwd_kernel(
    LP,  # [N] log pi(y_t | y_<t), any float dtype
    LPREF,  # [N] log pi_ref(y_t | y_<t) (read when HAS_REF)
    MASK,  # [N] bool (as uint8) or 0/1 numbers: 1 = response token (read when HAS_MASK)
    R,  # [N] fp32 out: token rewards
    N, beta,
    HAS_REF: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    r = tl.load(LP + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_REF:
        r -= tl.load(LPREF + offs, mask=ok, other=0.0).to(tl.float32)
    r = beta * r
    if HAS_MASK:
        keep = tl.load(MASK + offs, mask=ok, other=0) != 0
        r = tl.where(keep, r, 0.0)
    tl.store(R + offs, r, mask=ok)


# dlp_t = beta m_t g_t ;  dlpref_t = -beta m_t g_t
@triton.jit
def _token_reward_bwd_kernel(
    G,  # [N] fp32 dL/dr
    MASK,  # [N] bool (as uint8) or 0/1 numbers (read when HAS_MASK)
    DLP,  # [N] out: dL/dlp = beta * m * g, in lp's dtype
    DLPREF,  # [N] out: dL/dlpref = -beta * m * g, in lpref's dtype (written when HAS_REF)
    N, beta,
    HAS_REF: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr, EMULATE_RN: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    d = beta * tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(MASK + offs, mask=ok, other=0) != 0
        d = tl.where(keep, d, 0.0)
    tl.store(DLP + offs, cast_rn(d, DLP.dtype.element_ty, EMULATE_RN), mask=ok)
    if HAS_REF:
        tl.store(DLPREF + offs, cast_rn(-d, DLPREF.dtype.element_ty, EMULATE_RN), mask=ok)


def token_reward_fwd(logp, logp_ref, mask, beta):
    """Launcher: float32 rewards with logp's shape."""
    lp = logp.reshape(-1).contiguous()
    lr = lp if logp_ref is None else logp_ref.reshape(-1).contiguous()
    n = lp.numel()
    r = torch.empty(n, dtype=torch.float32, device=lp.device)
    if n:
        grid = (triton.cdiv(n, _ELEM_BLOCK),)
        tc.launch(_token_reward_fwd_kernel, grid, (lp, lr, _mask_arg(mask, lp), r, n, float(beta)),
                  dict(HAS_REF=logp_ref is not None, HAS_MASK=mask is not None, BLOCK=_ELEM_BLOCK), num_warps=4)
    return r.view(logp.shape)


def token_reward_bwd(grad, logp, logp_ref, mask, beta, need_ref=True):
    g = grad.reshape(-1).float().contiguous()
    n = g.numel()
    dlp = torch.empty(logp.shape, dtype=logp.dtype, device=g.device)
    has_ref = logp_ref is not None and need_ref
    dlr = torch.empty(logp_ref.shape, dtype=logp_ref.dtype, device=g.device) if has_ref else None
    if n:
        grid = (triton.cdiv(n, _ELEM_BLOCK),)
        tc.launch(_token_reward_bwd_kernel, grid,
                  (g, _mask_arg(mask, g), dlp, dlp if dlr is None else dlr, n, float(beta)),
                  dict(HAS_REF=has_ref, HAS_MASK=mask is not None, BLOCK=_ELEM_BLOCK, EMULATE_RN=tc.interpreting(g)),
                  num_warps=4)
    return dlp, dlr


class TokenRewardFunction(torch.autograd.Function):
    """autograd glue for beta * (lp - lpref) * mask."""

    @staticmethod
    def forward(ctx, logp, logp_ref, mask, beta):
        ctx.save_for_backward(logp, logp_ref, mask)
        ctx.beta = beta
        return token_reward_fwd(logp, logp_ref, mask, beta)

    @staticmethod
    def backward(ctx, grad):
        logp, logp_ref, mask = ctx.saved_tensors
        dlp, dlr = token_reward_bwd(grad, logp, logp_ref, mask, ctx.beta, need_ref=ctx.needs_input_grad[1])
        return dlp, dlr, None, None


def triton_token_rewards(logp: torch.Tensor, logp_ref: torch.Tensor | None, mask: torch.Tensor | None,
                         beta: float) -> torch.Tensor:
    """float32 ``beta * (logp - logp_ref) * mask`` (same shape as logp); differentiable in logp, logp_ref."""
    needs = logp.requires_grad or (logp_ref is not None and logp_ref.requires_grad)
    if torch.is_grad_enabled() and needs:
        return TokenRewardFunction.apply(logp, logp_ref, mask, beta)
    return token_reward_fwd(logp, logp_ref, mask, beta)


# ----------------------------------------------------------------------------------------------
# fused policy - reference rewards from hidden states
# ----------------------------------------------------------------------------------------------


# r_t = beta ((z^pol_{t,y_t} - lse^pol_t) - (z^ref_{t,y_t} - lse^ref_t)) m_t   (forward only)
@triton.jit(do_not_specialize=["N", "SPLITS"])
def _policy_ref_reward_kernel(
    HP,  # [N, Dp] policy hidden states, row stride stride_hp
    WP,  # [V, Dp] policy LM head, row stride stride_wp
    HR,  # [N, Dr] reference hidden states, row stride stride_hr
    WR,  # [V, Dr] reference LM head, row stride stride_wr
    TGT,  # [N] int32/int64 target ids y_t in [0, V)
    MASK,  # [N] bool (as uint8) or 0/1 numbers (read when HAS_MASK)
    R,  # [N] fp32 out: rewards (written when not SPLIT)
    PART,  # [2, SPLITS, N] fp32 logsumexp of each vocab range, policy then reference (SPLIT)
    ZT,  # [2, N] fp32 target logits, written by the range holding the target (SPLIT)
    N, V, DP, DR, SPLITS, stride_hp, stride_wp, stride_hr, stride_wr, scale, softcap, beta,
    HAS_SOFTCAP: tl.constexpr, HAS_MASK: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    rows, row_ok, tgt, pid_s, v_lo, v_hi = split_prologue(TGT, N, V, SPLITS, BLOCK_N, BLOCK_V)
    if HAS_MASK:
        keep = (tl.load(MASK + rows, mask=row_ok, other=0) != 0) & row_ok
        any_keep = tl.max(keep.to(tl.int32), axis=0) > 0
        v_hi = tl.where(any_keep, v_hi, v_lo)  # fully masked block: empty vocab loop
    else:
        keep = row_ok
    mp, lp_, _sp, ztp = row_block_partial(HP, WP, rows, row_ok, tgt, v_lo, v_hi, DP, stride_hp, stride_wp, scale,
                                          softcap, HAS_SOFTCAP, False, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, DOT_PREC)
    mr, lr_, _sr, ztr = row_block_partial(HR, WR, rows, row_ok, tgt, v_lo, v_hi, DR, stride_hr, stride_wr, scale,
                                          softcap, HAS_SOFTCAP, False, BLOCK_N, BLOCK_V, BLOCK_D, UPCAST_DOT, DOT_PREC)
    if SPLIT:
        base = pid_s * N + rows
        tl.store(PART + base, range_lse(mp, lp_), mask=row_ok)  # -inf for an empty or skipped range
        tl.store(PART + SPLITS * N + base, range_lse(mr, lr_), mask=row_ok)
        holds = row_ok & (tgt >= v_lo) & (tgt < v_hi)
        tl.store(ZT + rows, ztp, mask=holds)
        tl.store(ZT + N + rows, ztr, mask=holds)
    else:
        # (zt_p - lse_p) - (zt_r - lse_r); rows of a skipped block have l = 0: keep them finite, then 0
        empty = lp_ == 0.0
        mp = tl.where(empty, 0.0, mp)
        mr = tl.where(empty, 0.0, mr)
        r = beta * ((ztp - (mp + safe_log(lp_))) - (ztr - (mr + safe_log(lr_))))
        tl.store(R + rows, tl.where(keep, r, 0.0), mask=row_ok)


# r_t = beta ((zt^pol_t - lse^pol_t) - (zt^ref_t - lse^ref_t)) m_t, lse = logsumexp over the vocab ranges
@triton.jit(do_not_specialize=["N", "SPLITS"])
def _policy_ref_combine_kernel(
    PART,  # [2, SPLITS, N] fp32 per-range logsumexp, policy then reference
    ZT,  # [2, N] fp32 target logits, policy then reference
    MASK,  # [N] bool (as uint8) or 0/1 numbers (read when HAS_MASK)
    R,  # [N] fp32 out: rewards
    N, SPLITS, beta,
    HAS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    lse_p = lse_over_splits(PART, offs, ok, N, SPLITS)
    lse_r = lse_over_splits(PART + SPLITS * N, offs, ok, N, SPLITS)
    zt_p = tl.load(ZT + offs, mask=ok, other=0.0)
    zt_r = tl.load(ZT + N + offs, mask=ok, other=0.0)
    r = beta * ((zt_p - lse_p) - (zt_r - lse_r))
    if HAS_MASK:
        r = tl.where(tl.load(MASK + offs, mask=ok, other=0) != 0, r, 0.0)
    tl.store(R + offs, r, mask=ok)


def policy_ref_reward_fwd(h_pol, w_pol, h_ref, w_ref, targets, beta, mask=None, logit_scale=1.0, softcap=None,
                          num_splits=None):
    """Launcher: float32 ``[N]`` rewards; one launch over both models (plus a tiny combine if split)."""
    hp, wp = tc.common_dtype(h_pol, w_pol)
    hr, wr = tc.common_dtype(h_ref, w_ref)
    targets = targets.contiguous()
    n, v = hp.shape[0], wp.shape[0]
    dev = hp.device
    r = torch.zeros(n, dtype=torch.float32, device=dev)
    if n == 0:
        return r
    interp = tc.interpreting(hp)
    dt = torch.float32 if torch.float32 in (hp.dtype, hr.dtype) else hp.dtype
    config = tc.pick_config(dt, interp)
    splits = int(num_splits or tc.num_splits(n, v, config, max(hp.element_size(), hr.element_size()), dev, interp))
    if splits > 1:
        part = torch.empty(2, splits, n, dtype=torch.float32, device=dev)
        zt = torch.zeros(2, n, dtype=torch.float32, device=dev)
    else:
        part = zt = r  # unused args
    m = _mask_arg(mask, r)
    args = (hp, wp, hr, wr, targets, m, r, part, zt, n, v, hp.shape[1], hr.shape[1], splits,
            hp.stride(0), wp.stride(0), hr.stride(0), wr.stride(0), float(logit_scale), float(softcap or 1.0),
            float(beta))
    consts = dict(HAS_SOFTCAP=softcap is not None, HAS_MASK=mask is not None, **tc.dot_flags(dt, interp))
    tc.split_vocab_launch(_policy_ref_reward_kernel, n, splits, args, consts, config)
    if splits > 1:  # tiny second pass over the per-range partials of both models
        tc.launch(_policy_ref_combine_kernel, (triton.cdiv(n, tc.COMBINE_BLOCK),),
                  (part, zt, m, r, n, splits, float(beta)), dict(HAS_MASK=mask is not None, BLOCK=tc.COMBINE_BLOCK), num_warps=4)
    return r


def triton_policy_ref_rewards(h_pol: torch.Tensor, w_pol: torch.Tensor, h_ref: torch.Tensor, w_ref: torch.Tensor,
                              targets: torch.Tensor, beta: float, mask: torch.Tensor | None = None, *,
                              logit_scale: float = 1.0, softcap: float | None = None,
                              num_splits: int | None = None) -> torch.Tensor:
    """float32 ``[N]``: ``beta * (linear_logprobs(h_pol, w_pol, t) - linear_logprobs(h_ref, w_ref, t)) * mask``.

    h_pol ``[N, Dp]``, w_pol ``[V, Dp]``, h_ref ``[N, Dr]``, w_ref ``[V, Dr]``, targets and mask ``[N]``;
    the same logit transform applies to both models. Without gradients (the scoring pass) this is
    the fused one-launch kernel; with gradients on, the differentiable kernels are composed.
    """
    grads = any(x.requires_grad for x in (h_pol, w_pol, h_ref, w_ref))
    if torch.is_grad_enabled() and grads:
        lp = triton_linear_logprobs(h_pol, w_pol, targets, logit_scale=logit_scale, softcap=softcap)
        lr = triton_linear_logprobs(h_ref, w_ref, targets, logit_scale=logit_scale, softcap=softcap)
        return triton_token_rewards(lp, lr, mask, beta)
    return policy_ref_reward_fwd(h_pol, w_pol, h_ref, w_ref, targets, beta, mask, logit_scale, softcap, num_splits)

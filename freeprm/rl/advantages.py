"""PRIME advantages: leave-one-out (RLOO) baselines on process and outcome rewards, returns, whitening.

PRIME (Cui et al. 2025, "Process Reinforcement through Implicit Rewards", arXiv 2502.01456) samples
``K = group_size`` responses per prompt and combines two reward sources, each with its own RLOO
baseline taken over the *other* ``K - 1`` responses of the same prompt. For response ``i`` of a group,
token ``t`` (response tokens only; ``n_i`` of them)::

    process:  p_i,t = r_i,t - 1/(K-1) * sum_{j != i} mean_s r_j,s          (mean over j's response tokens)
    outcome:  o_i   = y_i   - 1/(K-1) * sum_{j != i} y_j                    (placed on i's last token)
    total:    a_i,t = process_coef * p_i,t + outcome_coef * o_i * [t is i's last token]
    returns:  R_i,t = sum_{s >= t} gamma^(s - t) * a_i,s                     (s over response tokens)
    advantages = masked_whiten(R)  over all response tokens of the batch     (or R itself, whiten=False)

``masked_whiten(x) = (x - mean) / sqrt(var + 1e-8)`` with the mean and the unbiased (Bessel-corrected)
variance over the masked positions; masked-out positions are 0.

Differences from the verl PRIME recipe (``recipe/prime``), on purpose:
  * every response token keeps its reward: the recipe's ``prime_granularity="token"`` copies
    ``r[:, :n-1]`` and so drops the last token's process reward;
  * the process baseline is the paper's: the mean token reward of the other responses. The recipe
    rescales the token rewards by ``K / (K - 1)`` before subtracting the group sum, which adds
    ``(r_i,t - mean_s r_i,s) / (K - 1)`` to each token; for the outcome term (one value per response)
    both forms agree.
"""

from __future__ import annotations

import math

import torch


def _check(token_rewards, outcome, response_mask, group_size, gamma) -> None:
    if not isinstance(token_rewards, torch.Tensor) or token_rewards.dim() != 2:
        raise ValueError(f"token_rewards must be a [B, T] tensor, got "
                         f"{tuple(token_rewards.shape) if isinstance(token_rewards, torch.Tensor) else type(token_rewards).__name__}")
    if not token_rewards.is_floating_point():
        raise ValueError(f"token_rewards must be a float tensor, got {token_rewards.dtype}")
    if not isinstance(response_mask, torch.Tensor) or response_mask.shape != token_rewards.shape:
        raise ValueError(f"response_mask must be a [B, T] tensor shaped like token_rewards {tuple(token_rewards.shape)}")
    b = token_rewards.shape[0]
    if not isinstance(outcome, torch.Tensor) or outcome.shape != (b,):
        raise ValueError(f"outcome must be a [B]={b} tensor (one outcome reward per response)")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (leave-one-out needs another response), got {group_size!r}")
    if b % group_size:
        raise ValueError(f"group_size={group_size} does not divide the batch size B={b}; order the batch as B/K "
                         "consecutive groups of K responses to the same prompt")
    if not (isinstance(gamma, (int, float)) and 0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma must lie in [0, 1], got {gamma!r}")
    if bool((response_mask.bool().sum(-1) == 0).any()):
        raise ValueError("every row of response_mask needs at least one response token")
    if not bool(torch.isfinite(token_rewards[response_mask.bool()]).all()) or not bool(torch.isfinite(outcome.float()).all()):
        raise ValueError("token_rewards (at response tokens) and outcome must be finite")


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``mask`` (unbiased variance), 0 off the mask. ``[B, T]``."""
    m = mask.float()
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * m


def prime_advantages(
    token_rewards: torch.Tensor,
    outcome: torch.Tensor,
    response_mask: torch.Tensor,
    group_size: int,
    *,
    gamma: float = 1.0,
    process_coef: float = 5.0,
    outcome_coef: float = 5.0,
    whiten: bool = True,
    process_baseline: str = "paper",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PRIME advantages and returns (see the module docstring for the formula): two float32 ``[B, T]``.

    token_rewards: float ``[B, T]`` dense process rewards (e.g. ``ImplicitPRM.token_rewards``), read only at
    ``response_mask``; outcome: ``[B]`` outcome rewards (verifier labels); response_mask: ``[B, T]``, True at
    response tokens, any padding side. Rows are ``B / group_size`` consecutive groups of ``group_size``
    responses to one prompt. ``process_coef = 0`` gives RLOO on outcomes only.
    ``process_baseline="paper"`` (default) subtracts the other responses' mean token reward;
    ``"verl"`` reproduces verl's PRIME recipe: ``r * K/(K-1) - sum_j mean_s r[j, s] / (K-1)``
    (sum over the whole group), which adds ``(r - mean_s r[i, s]) / (K-1)`` per token.

    Equivalent plain torch (gamma = 1)::

        m = response_mask.float(); mu = (r * m).sum(1) / m.sum(1)                        # [B]
        loo = lambda v: (v.view(-1, K).sum(1, keepdim=True) - v.view(-1, K)).flatten() / (K - 1)
        last = one_hot(index of each row's last response token)                          # [B, T]
        a = process_coef * (r - loo(mu)[:, None]) * m + outcome_coef * (y - loo(y))[:, None] * last
        returns = a.flip(1).cumsum(1).flip(1) * m
        advantages = masked_whiten(returns, m)
    """
    _check(token_rewards, outcome, response_mask, group_size, gamma)
    if process_baseline not in ("paper", "verl"):
        raise ValueError(f"process_baseline must be 'paper' or 'verl', got {process_baseline!r}")
    k = group_size
    m = response_mask.bool()
    mf = m.float()
    r = torch.where(m, token_rewards.float(), torch.zeros((), device=token_rewards.device))
    y = outcome.to(device=r.device, dtype=torch.float32)

    def leave_one_out(v: torch.Tensor) -> torch.Tensor:  # [B] -> mean of the other K-1 members of each group
        g = v.view(-1, k)
        return ((g.sum(1, keepdim=True) - g) / (k - 1)).reshape(-1)

    mu = r.sum(1) / mf.sum(1)  # [B] mean token reward per response
    if process_baseline == "paper":
        process = (r - leave_one_out(mu)[:, None]) * mf  # [B, T]
    else:  # verl recipe: rescale by K/(K-1), subtract the whole group's sum of means / (K-1)
        group_sum = mu.view(-1, k).sum(1, keepdim=True).expand(-1, k).reshape(-1)
        process = (r * (k / (k - 1)) - group_sum[:, None] / (k - 1)) * mf
    t_idx = torch.arange(m.shape[1], device=m.device)
    last = torch.where(m, t_idx, -1).amax(1)  # [B] index of each row's last response token
    is_last = (t_idx[None, :] == last[:, None]).float()
    total = process_coef * process + outcome_coef * (y - leave_one_out(y))[:, None] * is_last  # [B, T]

    if gamma == 1.0:
        returns = total.flip(1).cumsum(1).flip(1)
    else:  # discount counts response tokens only: masked positions pass the running return through
        returns = torch.zeros_like(total)
        running = torch.zeros(total.shape[0], device=total.device)
        for t in range(total.shape[1] - 1, -1, -1):
            running = torch.where(m[:, t], total[:, t] + gamma * running, running)
            returns[:, t] = running
    returns = returns * mf
    advantages = masked_whiten(returns, m) if whiten else returns.clone()
    if not math.isfinite(float(advantages.abs().max())):
        raise ValueError("advantages are not finite; check the rewards' scale")
    return advantages, returns

"""The pieces of ``ImplicitPRM.update`` (PRIME's online step): the loss from the trainer's registry, pairs, clipping.

The losses are ``freeprm.trainer.losses.REGISTRY``'s, over response rewards
``R_b = beta * sum_t (log pi - log pi_ref)[b, t]``; the online update accepts every registered loss
that needs no extra sequences (``ce``, ``dpo``, ``nca``; KTO needs mismatched prompt/response pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..trainer import losses


@dataclass(frozen=True)
class OnlineLossOptions:
    """The settings a registered loss reads (``LossSpec.fn(inputs, options)``); CE unbalanced online."""

    ce_balance: str = "none"
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0


ONLINE_LOSSES = tuple(name for name, spec in losses.REGISTRY.items() if not spec.needs_mismatched)


def online_loss_spec(name: str) -> losses.LossSpec:
    """The registered loss ``name``, if the online update can feed it; ``ValueError`` naming the choices otherwise."""
    if name not in ONLINE_LOSSES:
        raise ValueError(f"loss must be one of {ONLINE_LOSSES}, got {name!r}")
    return losses.get_loss(name)


def pair_indices(y: torch.Tensor, groups: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` row indices: every ``(i, j)`` with ``y_i > y_j`` in one group (None: one group)."""
    g = groups if groups is not None else torch.zeros_like(y, dtype=torch.long)
    return ((y[:, None] > y[None, :]) & (g[:, None] == g[None, :])).nonzero(as_tuple=True)


def online_loss(spec: losses.LossSpec, rewards: torch.Tensor, y: torch.Tensor,
                groups: torch.Tensor | None) -> torch.Tensor | None:
    """The registered loss over one mini-batch's rewards ``[mb]``; None when a pair loss finds no pair."""
    if spec.pairs:
        ci, ri = pair_indices(y, groups)
        if len(ci) == 0:
            return None
        x = losses.LossInputs(rewards[ci], rejected=rewards[ri])
    else:
        x = losses.LossInputs(rewards, labels=y, groups=groups)
    return spec.fn(x, OnlineLossOptions())


def clip_gradients(params: list[torch.Tensor], grad_clip: float | None) -> float:
    """The pre-clip gradient norm of ``params`` (0 with no gradients); clipped to ``grad_clip`` unless None."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if grad_clip is None:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    return float(torch.nn.utils.clip_grad_norm_(params, grad_clip))

"""Implicit-PRM training losses over response rewards, never over models.

A response reward is the beta-scaled log-likelihood ratio summed over the response tokens
(arXiv 2412.01981, eq. 2)::

    r(x, y) = beta * sum_t [log pi_theta(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]

``response_rewards`` builds it from per-token log-probs; ``logp_ref=None`` is the
reference-free variant (pi_ref uniform, i.e. no reference term). Every loss below takes such
rewards (float ``[B]`` tensors), returns a mean-reduced scalar, and raises ``ValueError`` with
what to fix for malformed input. Gradients flow into the rewards only (labels, weights and the
KTO reference point are constants).

Losses (l = log, s = sigmoid):
  * CE   ``-[y l s(r) + (1 - y) l s(-r)]``  (paper eq. 5), with the paper's dataset-wise and
         instruction-wise balanced variants expressed as per-example weights;
  * DPO  ``-l s(r_c - r_r)``  (Rafailov et al. 2023);
  * NCA  ``-l s(r_c) - 0.5 l s(-r_c) - 0.5 l s(-r_r)``  (Chen et al. 2024, NCA for pairs);
  * KTO  ``w_D (1 - s(r - z0))`` if y = 1, ``w_U (1 - s(z0 - r))`` if y = 0  (Ethayarajh et al. 2024).

``REGISTRY`` maps each loss name to a ``LossSpec``: the function over ``LossInputs`` and the data
it needs (pairs or labeled responses, 0/1 labels, mismatched sequences, balancing). The trainer
and the data pipeline read these instead of branching on names; a new loss is one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import check_beta

CE_BALANCE = ("none", "dataset", "instruction")


# ---------------------------------------------------------------------------------------- checks
def _check_vector(name: str, t: torch.Tensor, *, allow_empty: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B] (one value per response), got shape {tuple(t.shape)}; "
                         "sum token rewards over the response first (see response_rewards)")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name} is empty: pass at least one response")


def _check_rewards(name: str, r: torch.Tensor) -> None:
    _check_vector(name, r)
    if not r.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {r.dtype}")
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"{name} holds NaN or Inf; check the log-probs (masked padding?) and beta")


def _check_labels(labels: torch.Tensor, rewards: torch.Tensor, *, binary: bool) -> torch.Tensor:
    _check_vector("labels", labels)
    if labels.shape != rewards.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal rewards shape {tuple(rewards.shape)}")
    y = labels.to(device=rewards.device, dtype=torch.float32)
    if not bool(torch.isfinite(y).all()) or bool(((y < 0) | (y > 1)).any()):
        raise ValueError("labels must lie in [0, 1] (1 = correct response, 0 = incorrect)")
    if binary and bool(((y != 0) & (y != 1)).any()):
        raise ValueError("labels must be exactly 0 or 1 here; round soft labels or use balance='none'")
    return y


def _check_pair(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    _check_rewards("chosen", chosen)
    _check_rewards("rejected", rejected)
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must have one "
                         "reward per pair each, in the same order")


# --------------------------------------------------------------------------------------- rewards
def response_rewards(
    logp: torch.Tensor,
    logp_ref: torch.Tensor | None,
    mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """``r[b] = beta * sum_t (logp[b, t] - logp_ref[b, t]) * mask[b, t]``: float32 ``[B]``.

    logp, logp_ref, mask: ``[B, T]`` (mask True on the response tokens). ``logp_ref=None`` is
    reference-free (pi_ref uniform: the reference term is dropped).
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T] per-token log-probs, got shape {tuple(logp.shape)}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal logp shape {tuple(logp.shape)}")
    if logp_ref is not None and logp_ref.shape != logp.shape:
        raise ValueError(f"logp_ref shape {tuple(logp_ref.shape)} must equal logp shape {tuple(logp.shape)}")
    beta = check_beta(beta)
    diff = logp.float() if logp_ref is None else logp.float() - logp_ref.float()
    return beta * (diff * mask.float()).sum(-1)  # [B]


# -------------------------------------------------------------------------------------------- CE
def ce_weights(
    labels: torch.Tensor,
    *,
    balance: str = "none",
    groups: torch.Tensor | None = None,
    positive_fraction: float | None = None,
) -> torch.Tensor:
    """Per-example weights ``w`` ``[B]`` for the CE loss ``mean(w * l)``; ``sum(w) == B`` (in expectation over
    batches when ``positive_fraction`` is given).

    * ``"none"``: ``w = 1``.
    * ``"dataset"`` (dataset-wise balance): correct and incorrect responses carry equal total
      weight, ``w_i = 1 / (2 p)`` if ``y_i = 1`` and ``1 / (2 (1 - p))`` if ``y_i = 0``, with ``p``
      the fraction of correct responses. ``positive_fraction`` gives ``p`` over the whole data
      set (unbiased over mini-batches); by default ``p`` is the batch's. A batch holding one
      class only gets ``w = 1``.
    * ``"instruction"`` (instruction-wise balance): every prompt (``groups``, int ``[B]``) weighs
      the same, and inside a prompt its correct and its incorrect responses weigh the same:
      ``w_i = B / (G * C_g * n_{g, y_i})`` with ``G`` prompts in the batch, ``C_g`` classes present
      in prompt ``g`` (1 or 2) and ``n_{g, y}`` its responses of class ``y``.
    """
    if balance not in CE_BALANCE:
        raise ValueError(f"balance must be one of {CE_BALANCE}, got {balance!r}")
    b = labels.shape[0]
    if balance == "none":
        return torch.ones(b, dtype=torch.float32, device=labels.device)
    pos = labels == 1
    if balance == "dataset":
        if positive_fraction is not None:
            p = float(positive_fraction)
            if not 0 < p < 1:
                raise ValueError(f"positive_fraction must lie strictly in (0, 1), got {positive_fraction}")
        else:
            n_pos = int(pos.sum())
            if n_pos in (0, b):
                return torch.ones(b, dtype=torch.float32, device=labels.device)
            p = n_pos / b
        return torch.where(pos, 1.0 / (2 * p), 1.0 / (2 * (1 - p))).float()
    if groups is None:
        raise ValueError("balance='instruction' needs groups: an int tensor [B] with one id per prompt")
    _check_vector("groups", groups)
    if groups.shape != labels.shape:
        raise ValueError(f"groups shape {tuple(groups.shape)} must equal labels shape {tuple(labels.shape)}")
    if groups.is_floating_point():
        raise ValueError("groups must be an integer tensor of prompt ids")
    _, g = torch.unique(groups.to(labels.device), return_inverse=True)  # [B] in [0, G)
    n_groups = int(g.max()) + 1
    key = g * 2 + pos.long()  # (group, class) cell
    n_cell = torch.bincount(key, minlength=2 * n_groups).float()  # [2G]
    classes = (n_cell.view(n_groups, 2) > 0).sum(-1).float()  # [G]
    return (b / (n_groups * classes[g] * n_cell[key])).float()


def ce_loss(
    rewards: torch.Tensor,
    labels: torch.Tensor,
    *,
    balance: str = "none",
    groups: torch.Tensor | None = None,
    positive_fraction: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of the implicit ORM (arXiv 2412.01981, eq. 5), mean-reduced.

    ``loss = mean_i w_i * -[y_i log s(r_i) + (1 - y_i) log s(-r_i)]``, ``s`` the sigmoid and
    ``w`` from :func:`ce_weights` (``balance`` = ``"none"`` | ``"dataset"`` | ``"instruction"``).

    rewards: float ``[B]`` response rewards; labels: ``[B]`` in ``[0, 1]`` (exactly 0/1 when
    balanced); groups: int ``[B]`` prompt ids (instruction-wise only). Returns a float32 scalar.
    """
    _check_rewards("rewards", rewards)
    y = _check_labels(labels, rewards, binary=balance != "none")
    w = ce_weights(y, balance=balance, groups=groups, positive_fraction=positive_fraction)
    r = rewards.float()
    per = -(y * F.logsigmoid(r) + (1 - y) * F.logsigmoid(-r))  # [B]
    return (w * per).mean()


# ----------------------------------------------------------------------------------- pair losses
def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): ``mean(-log s(r_c - r_r))``.

    chosen, rejected: float ``[B]`` rewards of the preferred (correct) and the dispreferred
    (incorrect) response of each pair. Returns a float32 scalar.
    """
    _check_pair(chosen, rejected)
    return (-F.logsigmoid(chosen.float() - rejected.float())).mean()


def nca_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """NCA for pairs (Chen et al. 2024, "Noise Contrastive Alignment"), mean-reduced.

    ``loss = mean(-log s(r_c) - 0.5 log s(-r_c) - 0.5 log s(-r_r))``.
    chosen, rejected: float ``[B]``. Returns a float32 scalar.
    """
    _check_pair(chosen, rejected)
    rc, rr = chosen.float(), rejected.float()
    return (-F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)).mean()


# ------------------------------------------------------------------------------------------- KTO
def kto_ref_point(mismatched_rewards: torch.Tensor) -> torch.Tensor:
    """KTO's reference point ``z0 = max(0, mean(r(x_i, y_j)))`` over mismatched pairs ``i != j``, detached.

    mismatched_rewards: float ``[M]`` rewards of responses paired with another item's prompt
    (an estimate of ``beta * KL(pi_theta || pi_ref)``). Returns a float32 scalar without grad.
    """
    _check_rewards("mismatched_rewards", mismatched_rewards)
    return mismatched_rewards.detach().float().mean().clamp(min=0)


def kto_loss(
    rewards: torch.Tensor,
    labels: torch.Tensor,
    ref_point: torch.Tensor | float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024) over response rewards, mean-reduced.

    ``l_i = w_D (1 - s(r_i - z0))`` if ``y_i = 1``, ``w_U (1 - s(z0 - r_i))`` if ``y_i = 0``;
    ``loss = mean_i l_i``. ``z0 = ref_point`` is a constant (see :func:`kto_ref_point`; no
    gradient flows into it). rewards: float ``[B]``; labels: 0/1 ``[B]``. Float32 scalar.
    """
    _check_rewards("rewards", rewards)
    y = _check_labels(labels, rewards, binary=True)
    if not (desirable_weight >= 0 and undesirable_weight >= 0):
        raise ValueError(f"desirable_weight and undesirable_weight must be >= 0, got "
                         f"{desirable_weight}, {undesirable_weight}")
    z0 = torch.as_tensor(ref_point, dtype=torch.float32, device=rewards.device).detach()
    if z0.numel() != 1 or not bool(torch.isfinite(z0)):
        raise ValueError(f"ref_point must be one finite number, got {ref_point!r}")
    r = rewards.float()
    per = torch.where(y == 1, desirable_weight * (1 - torch.sigmoid(r - z0)),
                      undesirable_weight * (1 - torch.sigmoid(z0 - r)))
    return per.mean()


# -------------------------------------------------------------------------------------- registry
@dataclass
class LossInputs:
    """What a registered loss reads, all float32 ``[B]`` on one device except the integer ``groups``.

    rewards: the differentiable rewards of the items' first sequences (the chosen ones for pairs);
    rejected: pairs only, the rejected responses' rewards; labels: labeled items, in ``[0, 1]``;
    groups: labeled items, prompt ids; mismatched: losses with ``needs_mismatched``, the rewards of
    the items' (prompt, another prompt's response) sequences, without grad; positive_fraction:
    the data set's fraction of correct responses (dataset-wise CE balance), or None.
    """

    rewards: torch.Tensor
    rejected: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    mismatched: torch.Tensor | None = None
    positive_fraction: float | None = None


@dataclass(frozen=True)
class LossSpec:
    """A training loss and the data it needs.

    fn(inputs, options) -> scalar: ``options`` is any object with the loss's settings as attributes
    (``TrainConfig``: ``ce_balance``, ``kto_desirable_weight``, ...). pairs: items are
    (chosen, rejected) pairs, else labeled responses; binary_labels: labels must be exactly 0/1;
    needs_mismatched: items carry a second (prompt, other prompt's response) sequence, scored
    without grad into ``inputs.mismatched``; balanced: the loss honours ``ce_balance`` (item order
    grouped by prompt under instruction-wise balance, the data set's positive fraction under
    dataset-wise balance).
    """

    fn: Callable[[LossInputs, Any], torch.Tensor]
    pairs: bool = False
    binary_labels: bool = False
    needs_mismatched: bool = False
    balanced: bool = False


def _ce(x: LossInputs, opt) -> torch.Tensor:
    return ce_loss(x.rewards, x.labels, balance=opt.ce_balance, groups=x.groups, positive_fraction=x.positive_fraction)


def _kto(x: LossInputs, opt) -> torch.Tensor:
    return kto_loss(x.rewards, x.labels, kto_ref_point(x.mismatched), opt.kto_desirable_weight,
                    opt.kto_undesirable_weight)


REGISTRY: dict[str, LossSpec] = {
    "ce": LossSpec(_ce, balanced=True),
    "dpo": LossSpec(lambda x, opt: dpo_loss(x.rewards, x.rejected), pairs=True),
    "nca": LossSpec(lambda x, opt: nca_loss(x.rewards, x.rejected), pairs=True),
    "kto": LossSpec(_kto, binary_labels=True, needs_mismatched=True),
}
LOSSES = tuple(REGISTRY)
PAIR_LOSSES = tuple(name for name, spec in REGISTRY.items() if spec.pairs)


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name`` (one of ``LOSSES``)."""
    if name not in REGISTRY:
        raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")
    return REGISTRY[name]

"""The reference ``pi_ref`` of an ``ImplicitPRM``: which kind it is and where its log-probs come from.

Kinds (``ImplicitPRM(reference=...)``):

* ``"frozen"`` (PRIME's default): a frozen copy of the initial model, owned by the PRM;
* ``"policy"``: no model here; the caller passes ``ref_logprobs`` (e.g. the RL policy's old log-probs);
* ``"model"``: another model (object, ``(model, tokenizer)`` pair or spec), frozen;
* ``"none"``: reference-free, ``log pi_ref = 0`` (``reference=None``: its deprecated spelling, docs/config.md).
"""

from __future__ import annotations

import copy

import torch

from ..config import is_no_reference
from ..engine.loading import load_model

REFERENCE_KINDS = ("frozen", "policy", "model", "none")


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with every parameter's ``requires_grad`` off (in place)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_reference(reference, model: torch.nn.Module, *, dtype, device) -> tuple[str, torch.nn.Module | None]:
    """``(kind, reference model or None)`` for an ``ImplicitPRM(reference=...)`` argument (see the module doc)."""
    if isinstance(reference, str) and reference in ("frozen", "policy"):
        return reference, (frozen(copy.deepcopy(model)) if reference == "frozen" else None)
    if reference is None or is_no_reference(reference):
        return "none", None
    ref = reference if isinstance(reference, torch.nn.Module) else load_model(reference, dtype=dtype, device=device)[0]
    return "model", frozen(ref.to(device))


def given_ref_logprobs(kind: str, ref_logprobs, input_ids: torch.Tensor, response_mask: torch.Tensor,
                       device) -> torch.Tensor:
    """Check caller-given ``log pi_ref`` ``[B, T]`` and return it as fp32 on ``device``, 0 off the response."""
    if kind == "none":
        raise ValueError("ref_logprobs given but this PRM is reference-free (reference='none')")
    if not isinstance(ref_logprobs, torch.Tensor) or ref_logprobs.shape != input_ids.shape:
        raise ValueError(f"ref_logprobs must be a [B, T] tensor shaped like input_ids {tuple(input_ids.shape)}")
    return ref_logprobs.to(device=device, dtype=torch.float32) * response_mask

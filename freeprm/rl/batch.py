"""Token tensors of an RL batch: ``encode_batch`` builds them from text, the checks ``ImplicitPRM`` runs on them."""

from __future__ import annotations

import torch

from ..engine.tokenization import encode


def check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> None:
    """``ValueError`` unless the three are ``[B, T]`` tensors of one shape with a valid response mask."""
    for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("response_mask", response_mask)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be [B, T], got shape {tuple(t.shape)}")
    if not (input_ids.shape == attention_mask.shape == response_mask.shape):
        raise ValueError(f"input_ids, attention_mask and response_mask must share one [B, T] shape; got "
                         f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(response_mask.shape)}")
    if input_ids.shape[0] == 0:
        raise ValueError("the batch is empty")
    if input_ids.is_floating_point():
        raise ValueError("input_ids must be integer token ids")
    rm = response_mask.bool()
    if bool(rm[:, 0].any()):
        raise ValueError("response_mask[:, 0] must be False: the first token has no context to score it; "
                         "put the prompt (at least one token) before the response")
    if bool((rm & ~attention_mask.bool()).any()):
        raise ValueError("response_mask marks padding positions (attention_mask == 0)")
    if bool((rm.sum(-1) == 0).any()):
        raise ValueError("every row needs at least one response token (response_mask all False in a row)")


def check_outcome(outcome, b: int) -> torch.Tensor:
    """Outcome labels as float32 ``[B]`` in ``[0, 1]``; ``ValueError`` otherwise."""
    if not isinstance(outcome, torch.Tensor):
        outcome = torch.as_tensor(outcome)
    if outcome.shape != (b,):
        raise ValueError(f"outcome must be [B]={b} (one label per response), got shape {tuple(outcome.shape)}")
    y = outcome.float()
    if not bool(torch.isfinite(y).all()) or bool(((y < 0) | (y > 1)).any()):
        raise ValueError("outcome must lie in [0, 1] (1 = the verifier accepts the response, 0 = it rejects it)")
    return y


def encode_batch(tokenizer, prompts: list[str], responses: list[str], *, padding_side: str = "right",
                 prompt_format: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, response_mask)``, each ``[B, T]``, for (prompt, response) text pairs.

    Tokenized as the engine's ``Scorer`` does (``freeprm.engine.tokenization.encode``: the prompt through the
    chat template when the tokenizer has one, the response tokenized on its own), so ``token_rewards`` on
    these tensors equals ``score`` on the same texts.
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many prompts as responses (at least one); got {len(prompts)} and {len(responses)}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    encs = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        try:
            encs.append(encode(tokenizer, p, r, prompt_format))
        except ValueError as e:
            raise ValueError(f"pair {i}: {e}") from None
    t = max(len(e.input_ids) for e in encs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(encs), t), pad, dtype=torch.long)
    am = torch.zeros((len(encs), t), dtype=torch.long)
    rm = torch.zeros((len(encs), t), dtype=torch.bool)
    for b, e in enumerate(encs):
        n = len(e.input_ids)
        o = t - n if padding_side == "left" else 0
        ids[b, o:o + n] = torch.tensor(e.input_ids)
        am[b, o:o + n] = 1
        rm[b, o + e.response_start:o + n] = True
    return ids, am, rm

"""Shared-prompt prefill: run a prompt once and score many responses to it from its KV cache.

Best-of-N candidates share their prompt. Instead of running ``prompt + response_g`` for each of the
``G`` candidates (``G * (P + R)`` tokens through the base model), the prompt runs once with the KV
cache on, the cache is repeated over the candidates, and only the responses run (``P + G * R``
tokens), at positions ``P, P + 1, ...`` that continue after the prompt. The hidden state that
predicts response token 0 is the prompt's last one; token ``j > 0`` is predicted by the response's
own hidden state ``j - 1``. Equivalent plain torch, per candidate ``g``::

    hs = base(torch.tensor([prompt + resp[g]])).last_hidden_state[0]       # [P + R_g, D]
    rows_g = hs[P - 1 : P + R_g - 1]                                        # [R_g, D]

Supported where the base model takes ``past_key_values``/``cache`` and returns a cache whose layers
are full-attention ``DynamicCache`` layers (Llama, Qwen, Mistral without a sliding window, ...).
Elsewhere ``SharedPromptUnsupported`` is raised before any result is produced, and the scorer falls
back to running each sequence whole.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch

from .batching import length_batches, pad_batch


class SharedPromptUnsupported(RuntimeError):
    """The model or its cache cannot reuse a prompt's KV cache; score the sequences whole instead."""


def _cache_kwarg(base: torch.nn.Module) -> str:
    params = inspect.signature(base.forward).parameters
    if "cache" in params:  # transformers >= 5 names it ``cache``
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise SharedPromptUnsupported(f"{type(base).__name__}.forward takes no KV cache")


def _check_cache(cache) -> None:
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise SharedPromptUnsupported(f"the model returned no repeatable KV cache ({type(cache).__name__})")
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise SharedPromptUnsupported("the KV cache does not expose its layers")
    for layer in layers:
        if getattr(layer, "is_sliding", False) or type(layer).__name__ not in ("DynamicLayer",):
            raise SharedPromptUnsupported(f"cache layer {type(layer).__name__} is not a full-attention dynamic layer")


def shared_prompt_hidden(
    base: torch.nn.Module,
    prompt: Sequence[int],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    max_batch_tokens: int,
) -> list[torch.Tensor]:
    """Per response ``g``: the final hidden states ``[len(responses[g]), D]`` that predict its tokens.

    ``base`` is the base (hidden-state) model of a causal LM (``split_lm(model)[0]``). The prompt runs
    once; the responses run in chunks of at most ``max_batch_tokens`` padded tokens (counting the
    prompt, whose cache each row attends to), each chunk over a copy of the prompt cache repeated
    over its rows. Raises ``SharedPromptUnsupported`` (before any result) when the cache cannot be reused.
    """
    if not len(prompt):
        raise ValueError("shared_prompt_hidden needs a non-empty prompt")
    key = _cache_kwarg(base)
    device = next(base.parameters()).device
    n_prompt = len(prompt)
    p_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    out = base(input_ids=p_ids, attention_mask=torch.ones_like(p_ids),
               position_ids=torch.arange(n_prompt, device=device)[None], use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    _check_cache(cache)
    h_last = out.last_hidden_state[0, -1:]  # [1, D]: predicts response token 0
    result: list[torch.Tensor | None] = [None] * len(responses)
    for idx in length_batches([n_prompt + len(r) for r in responses], max_batch_tokens):
        pb = pad_batch([responses[i] for i in idx], pad_id, side="right", device=device)
        g, t = pb.input_ids.shape
        chunk_cache = copy.deepcopy(cache)
        chunk_cache.batch_repeat_interleave(g)
        am = torch.cat([torch.ones((g, n_prompt), dtype=torch.long, device=device), pb.attention_mask], 1)
        pos = (n_prompt + torch.arange(t, device=device))[None].expand(g, t)
        hs = base(input_ids=pb.input_ids, attention_mask=am, position_ids=pos, use_cache=True,
                  **{key: chunk_cache}).last_hidden_state  # [g, t, D]
        for row, i in enumerate(idx):
            n = pb.lengths[row]
            result[i] = torch.cat([h_last, hs[row, :n - 1]], 0)  # [n, D]
    return result  # type: ignore[return-value]

"""Shared-prompt prefill: run a prompt once and score many responses to it from its KV cache.

Best-of-N candidates share their prompt. Instead of running ``prompt + response_g`` for each of the
``G`` candidates (``G * (P + R)`` tokens through the base model), the prompt runs once with the KV
cache on, the cache is repeated over the candidates, and only the responses run (``P + G * R``
tokens), at positions ``P, P + 1, ...`` that continue after the prompt. The hidden state that
predicts response token 0 is the prompt's last one; token ``j > 0`` is predicted by the response's
own hidden state ``j - 1``. Equivalent plain torch, per candidate ``g``::

    hs = base(torch.tensor([prompt + resp[g]])).last_hidden_state[0]       # [P + R_g, D]
    rows_g = hs[P - 1 : P + R_g - 1]                                        # [R_g, D]

Two ways to attend to the prompt (``attention=``):

- ``"cascade"`` (CPU default): the responses run without a cache; each attention layer splits its
  softmax into the prompt part and the response part and merges them by their log-sum-exps::

      o_p, lse_p = attn(q, K_prompt, V_prompt)            # all G*R queries against ONE copy of the prompt
      o_s, lse_s = attn(q, K_resp, V_resp, causal=True)    # each response against itself
      o = o_s + sigmoid(lse_p - lse_s) * (o_p - o_s)       # == softmax over [prompt, response] keys

  The prompt's keys are never repeated over candidates (no ``G x`` cache copies, no padding mask): they
  are broadcast over the responses, with grouped-query heads folded into the query length. Each response
  is its own batch entry, so responses with an equal prefix get bitwise equal rewards for it (ties stay
  exact). It needs an attention op that returns the log-sum-exp (CPU flash attention).
- ``"repeat"`` (elsewhere): the prompt's ``DynamicCache`` is repeated over the candidates of a chunk
  and the model attends through it with a padding mask.

Supported where the base model takes ``past_key_values``/``cache`` and returns a cache whose layers
are full-attention ``DynamicCache`` layers (Llama, Qwen, Mistral without a sliding window, ...), and
(for ``"cascade"``) calls its attention through ``transformers``' ``AttentionInterface`` without
softcapping. Elsewhere ``SharedPromptUnsupported`` is raised before any result is produced, and the
scorer falls back to running each sequence whole.
"""

from __future__ import annotations

import contextlib
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


CASCADE_ATTENTION = "freeprm_shared_prefix"  # name registered in transformers' AttentionInterface
_PREFIX_KWARG = "freeprm_prefix_kv"  # forward kwarg carrying the prompt's per-layer (keys, values)


def _cascade_available(device: torch.device) -> bool:
    """The cascade path needs an attention op returning the log-sum-exp: the CPU flash-attention op."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """``(softmax(q k^T * scale [+ causal mask]) v, logsumexp)``: out ``[B, H, L, d]``, lse ``[B, H, L]`` (fp32)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def cascade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` function for responses that continue a shared prompt (see the module docstring).

    query ``[G, H, R, d]`` and key/value ``[G, Hkv, R, d]`` are the responses' own (rotated) projections;
    the prompt's keys/values ``[1, Hkv, P, d]`` for this layer come in ``kwargs[_PREFIX_KWARG]``. Returns
    ``([G, R, H, d], None)`` like the ``sdpa`` function. Plain-torch equivalent, per response ``g``::

        k_all = cat([K_prompt[0], key[g]], -2); v_all = cat([V_prompt[0], value[g]], -2)   # [Hkv, P+R, d]
        out[g] = softmax(q[g] k_all^T * scaling + causal_mask_after_prompt) v_all               # per head
    """
    prefix = kwargs.get(_PREFIX_KWARG)
    if prefix is None:
        raise SharedPromptUnsupported("cascade attention called without the prompt's keys and values")
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise SharedPromptUnsupported("cascade attention does not do sliding windows or softcapping")
    if attention_mask is not None:
        raise SharedPromptUnsupported("cascade attention got an attention mask; the model builds its own masks")
    kp, vp = prefix[module.layer_idx]  # [1, Hkv, P, d]
    g, h, r, d = query.shape
    hkv = key.shape[1]
    if h % hkv or kp.shape[1] != hkv or kp.shape[-1] != d:
        raise SharedPromptUnsupported(f"unexpected attention shapes q {tuple(query.shape)}, prompt k {tuple(kp.shape)}")
    rep = h // hkv
    scale = float(scaling) if scaling is not None else d ** -0.5
    # prompt part: each response's queries against the ONE copy of the prompt's keys (broadcast over responses,
    # not copied); the heads that share a key head are folded into the query length: [G, Hkv*rep, R, d] ->
    # [G, Hkv, rep*R, d]. One batch entry per response, so equal responses get bitwise equal rows (exact ties)
    kp, vp = kp.to(query.dtype), vp.to(query.dtype)
    qf = query.reshape(g, hkv, rep * r, d)
    o_p, lse_p = _attend(qf, kp.expand(g, -1, -1, -1), vp.expand(g, -1, -1, -1), scale, False)
    o_p, lse_p = o_p.reshape(g, h, r, d), lse_p.reshape(g, h, r)
    # response part: causal attention of each response to itself (right padding sits after every real token)
    if rep > 1:
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    o_s, lse_s = _attend(query, key, value, scale, True)
    # share of the softmax mass on the prompt keys. In fp64: torch's vectorised and scalar (loop-tail) sigmoid
    # differ in the last fp32 bit, and which elements fall in the tail depends on their place in the tensor, so
    # equal rows of two responses could get different weights; rounded from fp64 they agree
    w = torch.sigmoid((lse_p - lse_s).double()).float().unsqueeze(-1)
    out = torch.lerp(o_s.float(), o_p.float(), w).to(query.dtype)  # [G, H, R, d]
    return out.transpose(1, 2).contiguous(), None


def _register_cascade() -> None:
    from transformers import AttentionInterface

    if CASCADE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(CASCADE_ATTENTION, cascade_attention)


@contextlib.contextmanager
def _attention_implementation(config, name: str):
    """Temporarily switch a model config's attention implementation (restored even on error)."""
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def shared_prompt_hidden(
    base: torch.nn.Module,
    prompt: Sequence[int],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    max_batch_tokens: int,
    attention: str = "auto",
) -> list[torch.Tensor]:
    """Per response ``g``: the final hidden states ``[len(responses[g]), D]`` that predict its tokens.

    ``base`` is the base (hidden-state) model of a causal LM (``split_lm(model)[0]``). The prompt runs
    once; the responses run in chunks of at most ``max_batch_tokens`` padded tokens. ``attention``:
    ``"cascade"`` (the prompt's keys shared by all responses, merged by log-sum-exp), ``"repeat"`` (the
    prompt's KV cache repeated over the rows of a chunk; the prompt's tokens count in each row's budget)
    or ``"auto"`` (cascade where its attention op exists: CPU). Raises ``SharedPromptUnsupported``
    (before any result) when the cache cannot be reused.
    """
    if not len(prompt):
        raise ValueError("shared_prompt_hidden needs a non-empty prompt")
    if attention not in ("auto", "cascade", "repeat"):
        raise ValueError(f"attention must be 'auto', 'cascade' or 'repeat', got {attention!r}")
    key = _cache_kwarg(base)
    device = next(base.parameters()).device
    if attention == "auto":
        attention = "cascade" if _cascade_available(device) else "repeat"
    elif attention == "cascade" and not _cascade_available(device):
        raise ValueError(f"attention='cascade' needs the CPU flash-attention op; on {device.type} use 'repeat' or 'auto'")
    n_prompt = len(prompt)
    p_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    out = base(input_ids=p_ids, attention_mask=torch.ones_like(p_ids),
               position_ids=torch.arange(n_prompt, device=device)[None], use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    _check_cache(cache)
    h_last = out.last_hidden_state[0, -1:]  # [1, D]: predicts response token 0
    result: list[torch.Tensor | None] = [None] * len(responses)
    if attention == "cascade":
        _register_cascade()
        prefix = [(layer.keys, layer.values) for layer in cache.layers]  # per layer [1, Hkv, P, d]
        lengths = [len(r) for r in responses]
    else:
        lengths = [n_prompt + len(r) for r in responses]
    for idx in length_batches(lengths, max_batch_tokens):
        pb = pad_batch([responses[i] for i in idx], pad_id, side="right", device=device)
        g, t = pb.input_ids.shape
        pos = (n_prompt + torch.arange(t, device=device))[None].expand(g, t)
        if attention == "cascade":
            with _attention_implementation(base.config, CASCADE_ATTENTION):
                hs = base(input_ids=pb.input_ids, position_ids=pos, use_cache=False,
                          **{_PREFIX_KWARG: prefix}).last_hidden_state  # [g, t, D]
        else:
            chunk_cache = copy.deepcopy(cache)
            chunk_cache.batch_repeat_interleave(g)
            am = torch.cat([torch.ones((g, n_prompt), dtype=torch.long, device=device), pb.attention_mask], 1)
            hs = base(input_ids=pb.input_ids, attention_mask=am, position_ids=pos, use_cache=True,
                      **{key: chunk_cache}).last_hidden_state  # [g, t, D]
        for row, i in enumerate(idx):
            n = pb.lengths[row]
            result[i] = torch.cat([h_last, hs[row, :n - 1]], 0)  # [n, D]
    return result  # type: ignore[return-value]

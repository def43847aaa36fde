"""Per-token log-probabilities of a causal LM without ``[tokens x vocab]`` logits.

The base model runs for hidden states; the LM head is applied only at the rows whose next
token is a target, through ``freeprm.kernels.linear_logprobs`` (Triton on CUDA, chunked
torch on CPU), with fp32 logsumexp and gather. Logit scaling and soft-capping from the
model config are honoured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import linear_logprobs


@dataclass(frozen=True)
class LMHead:
    """What turns a final hidden state into logits: ``z = softcap(logit_scale * h @ weight.T)``."""

    weight: torch.Tensor  # [V, D]
    logit_scale: float = 1.0
    softcap: float | None = None


def split_lm(model: torch.nn.Module) -> tuple[torch.nn.Module, LMHead]:
    """The base (hidden-state) model and the LM head of a Hugging Face causal LM."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} is not a causal LM with a separate base model and LM head")
    if getattr(head, "bias", None) is not None:
        raise ValueError("LM heads with a bias are not supported")
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
    return base, LMHead(head.weight, scale, float(softcap) if softcap else None)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (left or right padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(model_or_base: torch.nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states ``[B, T, D]`` of the base model.

    When no row has padding the mask is not passed: the model then takes its plain causal path (on CPU,
    SDPA's ``is_causal`` kernel instead of a materialised ``[B, 1, T, T]`` mask), same values. Checked only
    for a mask on the CPU: on a GPU the check would be a device sync per forward, and the mask is passed."""
    if attention_mask.device.type == "cpu" and bool(attention_mask.bool().all()):
        out = model_or_base(input_ids=input_ids, use_cache=False)
    else:
        out = model_or_base(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """``log p(input_ids[b, t] | input_ids[b, :t])`` at ``target_mask`` positions, 0 elsewhere: fp32 ``[B, T]``.

    Equivalent plain torch (but never building ``[B, T, V]``)::

        logits = model(input_ids, attention_mask=attention_mask).logits.float()       # [B, T, V]
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        out = torch.zeros_like(input_ids, dtype=torch.float32)
        out[:, 1:] = lp * target_mask[:, 1:]

    input_ids, attention_mask, target_mask: ``[B, T]`` (padding left or right). ``target_mask[:, 0]``
    must be False (the first token has no context). Differentiable w.r.t. the model parameters.
    """
    rows, head, (b_idx, t_idx) = target_hidden(model, input_ids, attention_mask, target_mask)
    lp = linear_logprobs(rows, head.weight, input_ids[b_idx, t_idx], logit_scale=head.logit_scale,
                         softcap=head.softcap, impl=impl)  # [N] fp32
    return scatter_rows(lp, b_idx, t_idx, input_ids.shape)


def target_hidden(model, input_ids, attention_mask, target_mask):
    """Hidden states that predict the target tokens: ``(rows [N, D], LMHead, (b_idx, t_idx))``.

    Row ``n`` is the final hidden state at ``(b_idx[n], t_idx[n] - 1)``; its target is ``input_ids[b_idx[n], t_idx[n]]``.
    The caller guarantees ``target_mask[:, 0]`` is False and ``target_mask`` is only on real tokens (not checked here).
    """
    if input_ids.shape != attention_mask.shape or input_ids.shape != target_mask.shape:
        raise ValueError(f"input_ids, attention_mask and target_mask must share one [B, T] shape; got "
                         f"{tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, {tuple(target_mask.shape)}")
    # shape checks only: value checks (no target at column 0 or on padding) would sync the GPU on every call;
    # they run once at the boundary (``Scorer.token_rewards``); batches built by ``pad_batch`` satisfy them
    target_mask = target_mask.bool()
    base, head = split_lm(model)
    hs = hidden_states(base, input_ids, attention_mask)  # [B, T, D]
    b_idx, t_idx = target_mask.nonzero(as_tuple=True)  # targets at t, hidden at t-1
    return hs[b_idx, t_idx - 1], head, (b_idx, t_idx)


def scatter_rows(values: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor, shape) -> torch.Tensor:
    """``[N]`` values back into a zero ``[B, T]`` float32 tensor (differentiable)."""
    out = torch.zeros(shape, dtype=torch.float32, device=values.device)
    return out.index_put((b_idx, t_idx), values)


def full_logits_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         target_mask: torch.Tensor) -> torch.Tensor:
    """The naive path: ``[B, T, V]`` logits, fp32 log_softmax, gather; fp32 ``[B, T]``, 0 off ``target_mask``.

    What ``sequence_logprobs`` computes without building the logits; kept as the baseline of benchmarks
    (``ImplicitPRM(full_logits=True)``, ``bench/bench_engine.py``) and the oracle of the tests. Plain torch::

        lp = log_softmax(model(input_ids).logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]
        out[:, 1:] = lp * target_mask[:, 1:]

    It reads the model's own ``.logits``, so any logit scale / soft-cap is the model's.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out[:, 1:] = lp * target_mask[:, 1:]
    return out

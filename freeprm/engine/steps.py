"""Step segmentation of a response and the token -> step map.

A response is split into steps by a delimiter (default ``"\\n\\n"``), by a regex, or given as
explicit steps. Each step is a character span of the response. The rule that maps characters
(and then tokens) to steps:

* Step ``k`` owns the characters from its own start up to the start of step ``k+1``: the
  delimiter (and any whitespace) after a step belongs to that step; characters before the
  first step belong to step 0.
* Pieces that are empty or whitespace-only (``"a\\n\\n\\n\\nb"``, a trailing delimiter) are not
  steps; their characters join the step before them.
* A token belongs to the step that owns its **last** character (``end - 1`` in its offset
  mapping). So a token that straddles a boundary counts in the later step, except a token
  ending in a delimiter, which stays with the step the delimiter closes. A token with an empty
  span (a special token) joins the step of the token before it (step 0 if it is first).
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Sequence

import torch

from ..config import DEFAULT_STEP_DELIMITER


def split_steps(
    response: str,
    *,
    step_delimiter: str | None = DEFAULT_STEP_DELIMITER,
    step_pattern: str | re.Pattern | None = None,
    steps: Sequence[str] | None = None,
) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the steps of ``response``, in order.

    With ``steps`` given, each step must occur in ``response`` in order, separated only by
    whitespace or the delimiter; otherwise ``ValueError``. With ``step_pattern`` (a regex), the
    response is split at its matches; otherwise at ``step_delimiter``.
    """
    if not response or not response.strip():
        raise ValueError("empty response: there is nothing to score")
    if steps is not None:
        return _locate_steps(response, steps, step_delimiter)
    if step_pattern is not None:
        pattern = re.compile(step_pattern) if isinstance(step_pattern, str) else step_pattern
        cuts = [(m.start(), m.end()) for m in pattern.finditer(response) if m.end() > m.start()]
    elif step_delimiter:
        cuts, i = [], response.find(step_delimiter)
        while i >= 0:
            cuts.append((i, i + len(step_delimiter)))
            i = response.find(step_delimiter, i + len(step_delimiter))
    else:
        cuts = []
    spans, prev = [], 0
    for a, b in cuts + [(len(response), len(response))]:
        if response[prev:a].strip():
            spans.append((prev, a))
        prev = b
    return spans


def _gap_ok(gap: str, delimiter: str | None) -> bool:
    if delimiter:
        gap = gap.replace(delimiter, "")
    return not gap.strip()


def _locate_steps(response: str, steps: Sequence[str], delimiter: str | None) -> list[tuple[int, int]]:
    if isinstance(steps, str) or not len(steps):
        raise ValueError("steps must be a non-empty list of strings")
    spans, cursor = [], 0
    for k, step in enumerate(steps):
        if not isinstance(step, str):
            raise ValueError(f"step {k} is {type(step).__name__}, not a string")
        if not step.strip():
            raise ValueError(f"step {k} is empty; remove empty steps")
        pos = response.find(step, cursor)
        if pos < 0 or not _gap_ok(response[cursor:pos], delimiter):
            raise ValueError(
                f"step {k} ({step[:40]!r}) is not the next part of the response text; steps must be the "
                "response split in order, separated only by whitespace or the delimiter")
        spans.append((pos, pos + len(step)))
        cursor = pos + len(step)
    if not _gap_ok(response[cursor:], delimiter):
        raise ValueError(f"the response continues after the last step ({response[cursor:cursor + 40]!r}); "
                         "add it as a step")
    return spans


def token_steps(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Step index of each token, from its ``(start, end)`` character offsets in the response."""
    starts = [s for s, _ in spans]
    out, prev = [], 0
    for s, e in offsets:
        if e > s:
            prev = max(0, bisect.bisect_right(starts, e - 1) - 1)
        out.append(prev)
    return out


# ------------------------------------------------------------------ step rewards on token tensors
GRANULARITIES = ("token", "step")  # dense token rewards, or each step's summed reward on its last token


def decoded_offsets(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of token ids ``ids`` and each token's ``(start, end)`` characters in it.

    For tokens that were sampled (an RL rollout), not tokenized from text. Three ways, first that applies:

    1. re-tokenizing the text gives ``ids`` back (the common case with a fast tokenizer): its offset mapping,
       i.e. exactly the spans the engine uses when it tokenizes text itself (``Scorer.score``);
    2. the per-token decodes concatenate to the text (byte-level BPE, no character split across tokens):
       each token spans its own piece;
    3. otherwise each token ends where the decoded prefix stops agreeing with the text (monotone), so a
       token inside a character split across tokens gets an empty span (and the step of the token before).
    """
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ids = list(ids)
    text = tokenizer.decode(ids, **kw)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == ids:
            return text, [tuple(o) for o in enc["offset_mapping"]]
    pieces = [tokenizer.decode([t], **kw) for t in ids]
    ends: list[int] = []
    if "".join(pieces) == text:
        e = 0
        for piece in pieces:
            e += len(piece)
            ends.append(e)
    else:
        e = 0
        for k in range(len(ids)):
            e = max(e, len(os.path.commonprefix([tokenizer.decode(ids[:k + 1], **kw), text])))
            ends.append(e)
    return text, [(ends[k - 1] if k else 0, e) for k, e in enumerate(ends)]


def _layout(rewards: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per step that owns a token, in order: its summed reward and the index of its last token."""
    n_steps = int(steps.max()) + 1 if steps.numel() else 0
    sums = torch.zeros(n_steps, dtype=rewards.dtype, device=rewards.device).index_add_(0, steps, rewards)
    last = torch.full((n_steps,), -1, dtype=torch.long, device=rewards.device).scatter_reduce_(
        0, steps, torch.arange(len(steps), device=rewards.device), "amax")
    has = last >= 0
    return sums[has], last[has]


def sum_on_last_token(rewards: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``[n] -> [n]``: each step's summed reward on the step's last token, 0 on its other tokens.

    rewards: float ``[n]``; steps: long ``[n]``, the step index of each token (``token_steps``). Plain torch::

        out = zeros(n); for k in set(steps): out[last index of k] = rewards[steps == k].sum()
    """
    sums, last = _layout(rewards, steps)
    out = torch.zeros_like(rewards)
    out[last] = sums
    return out


def decoded_token_steps(ids: Sequence[int], tokenizer, *, step_delimiter: str | None = DEFAULT_STEP_DELIMITER,
                        step_pattern: str | re.Pattern | None = None) -> list[int]:
    """Step index of each of the token ids ``ids`` (a response), from its decoded text (``decoded_offsets``),
    split by ``split_steps`` (a whitespace-only response is one step) and this module's token rule."""
    text, offsets = decoded_offsets(tokenizer, ids)
    if text.strip():
        spans = split_steps(text, step_delimiter=step_delimiter, step_pattern=step_pattern)
    else:
        spans = [(0, len(text))]
    return token_steps(offsets, spans)


def step_sums(rewards: torch.Tensor, ids: Sequence[int], tokenizer, *, step_delimiter: str | None = DEFAULT_STEP_DELIMITER,
              step_pattern: str | re.Pattern | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One response's token rewards ``[n]`` -> ``(sums [K], last [K])``: each step's summed reward and the index
    of its last token, for the ``K`` steps of the decoded response that own a token, in order."""
    if tokenizer is None:
        raise ValueError("step rewards need the tokenizer of the token ids (to find the steps in the text)")
    steps = decoded_token_steps(ids, tokenizer, step_delimiter=step_delimiter, step_pattern=step_pattern)
    return _layout(rewards, torch.tensor(steps, dtype=torch.long, device=rewards.device))


def step_rewards_on_last_token(
    rewards: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    tokenizer,
    *,
    step_delimiter: str | None = DEFAULT_STEP_DELIMITER,
    step_pattern: str | re.Pattern | None = None,
) -> torch.Tensor:
    """Token rewards ``[B, T]`` -> step rewards ``[B, T]``: each step's sum on its last token, 0 elsewhere.

    Row ``b``'s response tokens (``response_mask[b]``, any padding side) are decoded (``decoded_offsets``),
    the text is split into steps (``split_steps``; a whitespace-only response is one step) and each token is
    assigned to a step by this module's rule (the step owning its last character). Plain torch per row::

        pos = response_mask[b].nonzero()[:, 0]; steps = token_steps(offsets, split_steps(text))
        out[b, pos] = sum_on_last_token(rewards[b, pos], steps)

    The result is 0 off ``response_mask``; on the same tokens it places the same sums as ``Scorer.score``'s
    ``step_rewards``. Used by ``ImplicitPRM(granularity="step")`` and the verl reward manager.
    """
    if rewards.shape != input_ids.shape or rewards.shape != response_mask.shape or rewards.dim() != 2:
        raise ValueError(f"rewards, input_ids and response_mask must share one [B, T] shape; got "
                         f"{tuple(rewards.shape)}, {tuple(input_ids.shape)}, {tuple(response_mask.shape)}")
    if tokenizer is None:
        raise ValueError("step rewards need the tokenizer of the token ids (to find the steps in the text)")
    out = torch.zeros_like(rewards)
    ids_cpu, rm_cpu = input_ids.cpu(), response_mask.cpu().bool()
    for b in range(rewards.shape[0]):
        pos = rm_cpu[b].nonzero().flatten()
        if not len(pos):
            continue
        pos = pos.to(rewards.device)
        sums, last = step_sums(rewards[b, pos], ids_cpu[b, pos.cpu()].tolist(), tokenizer,
                               step_delimiter=step_delimiter, step_pattern=step_pattern)
        out[b, pos[last]] = sums
    return out

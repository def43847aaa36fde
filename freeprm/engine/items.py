"""Item validation and preparation: ``{"prompt", "response" | "steps", ...}`` -> ``PreparedItem`` (no model work).

``prepare_item`` checks an item, splits its steps and tokenizes it; every failure is a ``ValueError``
naming the item's index, raised before any model runs, so a bad item loses nothing. Checks, in order:

* the shape of the item (a dict; ``prompt`` a string; ``response`` a string or ``steps`` a list of strings);
* **length before tokenizing**: ``len(prompt) + len(response)`` must be at most
  ``MAX_CHARS_PER_TOKEN * max_length`` characters (32 per token: tokenizers average 3-5 characters per
  token on text and code, so only inputs that cannot fit are rejected, without the seconds and GBs
  that tokenizing megabytes costs); the exact token count is checked after tokenizing;
* the steps: a response that splits into **zero steps** (e.g. a ``step_pattern`` that matches all of it)
  is an error; so is a **step that owns no token** (a token straddles the step entirely, e.g. explicit
  steps cut inside a word): its reward would silently be 0, so the item is refused and the message says
  which step; join it with its neighbour or cut at a token boundary;
* token ids within the model's vocabulary.

A ``response`` string loses trailing EOS / pad token texts first (``tokenization.strip_end_markers``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..config import DEFAULT_STEP_DELIMITER
from .steps import split_steps, token_steps
from .tokenization import encode, strip_end_markers

MAX_CHARS_PER_TOKEN = 32


@dataclass
class PreparedItem:
    """A validated, tokenized item: what ``Scorer.score_prepared`` runs. Built by ``Scorer.prepare``."""

    index: int  # position in the input (used in error messages and result order)
    input_ids: list[int]  # prompt + response token ids
    response_start: int  # index in input_ids of the first response token
    token_steps: list[int]  # per response token: its step index
    steps: list[str]  # text of each step
    spans: list[tuple[int, int]]  # (start, end) characters of each step in the response
    meta: dict  # the item's other keys, passed through to the result

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt's token ids (``input_ids[:response_start]``)."""
        return self.input_ids[:self.response_start]

    @property
    def num_response_tokens(self) -> int:
        return len(self.input_ids) - self.response_start


def prepare_item(
    item: Mapping,
    index: int,
    *,
    tokenizer,
    max_length: int,
    vocab_size: int,
    step_delimiter: str | None = DEFAULT_STEP_DELIMITER,
    step_pattern: str | re.Pattern | None = None,
    prompt_format: str = "auto",
) -> PreparedItem:
    """Validate one item, split its steps and tokenize it (see the module docstring for the checks)."""
    if not isinstance(item, Mapping):
        raise ValueError(f"item {index}: expected a dict with 'prompt' and 'response' or 'steps', got {type(item).__name__}")
    prompt, response, steps = item.get("prompt"), item.get("response"), item.get("steps")
    if not isinstance(prompt, str):
        raise ValueError(f"item {index}: 'prompt' must be a string")
    if response is None and steps is None:
        raise ValueError(f"item {index}: give 'response' (a string) or 'steps' (a list of strings)")
    if steps is not None and (isinstance(steps, str) or not isinstance(steps, Sequence)):
        raise ValueError(f"item {index}: 'steps' must be a list of strings")
    if isinstance(response, str):
        response = strip_end_markers(response, tokenizer)  # a trailing EOS/pad text is not scored (tokenization.py)
    if response is None:
        if not all(isinstance(s, str) for s in steps):
            raise ValueError(f"item {index}: 'steps' must be a list of strings")
        response = (step_delimiter or "").join(steps)
    if not isinstance(response, str):
        raise ValueError(f"item {index}: 'response' must be a string")
    n_chars, max_chars = len(prompt) + len(response), MAX_CHARS_PER_TOKEN * max_length
    if n_chars > max_chars:
        raise ValueError(f"item {index}: {n_chars} characters cannot fit in max_length={max_length} tokens "
                         f"(limit {max_chars} characters, {MAX_CHARS_PER_TOKEN} per token); shorten the prompt/response")
    try:
        spans = split_steps(response, step_delimiter=step_delimiter, step_pattern=step_pattern, steps=steps)
    except ValueError as e:
        raise ValueError(f"item {index}: {e}") from None
    if not spans:
        raise ValueError(f"item {index}: the response splits into no steps (every piece between step delimiters/"
                         "pattern matches is empty); check step_delimiter / step_pattern")
    try:
        enc = encode(tokenizer, prompt, response, prompt_format)
    except ValueError as e:
        raise ValueError(f"item {index}: {e}") from None
    if len(enc.input_ids) > max_length:
        raise ValueError(f"item {index}: {len(enc.input_ids)} tokens exceed max_length={max_length}; "
                         "shorten the prompt/response or pass a larger max_length")
    if max(enc.input_ids) >= vocab_size:
        raise ValueError(f"item {index}: token id {max(enc.input_ids)} >= the model's vocabulary {vocab_size}; "
                         "the tokenizer does not match the model")
    tsteps = token_steps(enc.offsets, spans)
    owned = set(tsteps)
    empty = [k for k in range(len(spans)) if k not in owned]
    if empty:
        k = empty[0]
        a, b = spans[k]
        raise ValueError(f"item {index}: step {k} ({response[a:b][:40]!r}) owns no token (a token straddles it, so its "
                         "reward would be 0); merge it with a neighbouring step or split at a token boundary")
    meta = {k: v for k, v in item.items() if k not in ("prompt", "response", "steps")}
    return PreparedItem(index, enc.input_ids, enc.response_start, tsteps, [response[a:b] for a, b in spans], spans, meta)

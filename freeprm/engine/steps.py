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
import re
from collections.abc import Sequence


def split_steps(
    response: str,
    *,
    step_delimiter: str | None = "\n\n",
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

"""TRL adapter: an implicit PRM as a ``GRPOTrainer`` reward function.

``GRPOTrainer(reward_funcs=[reward_function(scorer)], ...)``. TRL calls a reward function as
``f(prompts=..., completions=..., completion_ids=..., **columns)`` with one entry per completion (each
prompt repeated ``num_generations`` times) and the dataset's other columns as lists in ``columns``;
it expects one float per completion, or None where the function does not apply (TRL then ignores that
reward for that row). Written against TRL 0.2x's calling convention (checked with the installed
version in ``tests/integrations/test_trl.py``, which runs ``GRPOTrainer``).

What is scored: the completion **text**, re-tokenized by the reward model's own tokenizer
(``completion_ids`` are not used: the PRM's tokenizer need not be the policy's). Each completion gets
``aggregate`` of its step rewards (default ``"min"``, the paper's best-of-N score; ``"sum"`` = the
response's total implicit reward).

Formats:
* plain: ``prompts[i]`` and ``completions[i]`` are strings;
* conversational: ``completions[i]`` is a list of ``{"role", "content"}`` messages (the assistant's
  turn; the contents of several messages are concatenated) and ``prompts[i]`` a list of messages.
  The prompt messages are folded into the one user turn that the scorer formats (``prompt_format``):
  their contents joined by a blank line, so a system prompt becomes the head of the user turn. A prompt
  holding an assistant turn (multi-turn) raises ``ValueError``: the scorer's format is single-turn.

A trailing EOS / pad token text (TRL configured to keep special tokens) is not scored: the scorer drops
it (``freeprm/engine/tokenization.py``, "End markers"), as ``freeprm serve`` does.

None rewards: an empty or whitespace-only completion (no steps to score; an EOS text alone counts as empty), and, with ``label_column``,
every row whose label is missing or None.

``label_column``: the name of a dataset column (TRL passes it in ``columns``). Rows whose value is None
get a None reward, so one trainer can mix datasets and apply the PRM only to the rows that carry the
column (TRL sums the rewards of the functions that apply); the value is also passed to the scorer as
item metadata under that name (``ScoreResult.meta``). A ``label_column`` that TRL does not pass at all
raises ``ValueError`` naming the columns it did pass (a typo would otherwise silently disable the PRM).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from freeprm.engine.tokenization import strip_end_markers
from freeprm.integrations._common import check_reward_model, finite_or_none, score_items

# keyword arguments TRL adds besides the dataset columns (trainer state, logging hooks, environments)
_TRL_EXTRA_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")


def reward_function(prm_or_scorer, *, aggregate: str = "min", label_column: str | None = None,
                    name: str | None = None) -> Callable[..., list[float | None]]:
    """A TRL reward function scoring completions with ``prm_or_scorer`` (a Scorer or an ImplicitPRM).

    Returns a plain function ``f(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]``
    whose ``__name__`` is ``name`` (default ``"freeprm_<aggregate>"``; TRL logs rewards under it). For each
    completion it returns ``prm_or_scorer.score([{"prompt": p, "response": c}], aggregate=aggregate)[0].score``
    (all rows scored in one call), None where the completion is empty or (with ``label_column``) its label
    is None. See the module docstring for the formats.
    """
    check_reward_model(prm_or_scorer)
    if not isinstance(aggregate, str):
        raise ValueError(f"aggregate must be a string such as 'min' or 'sum', got {aggregate!r}")
    if label_column is not None and not isinstance(label_column, str):
        raise ValueError(f"label_column must be a column name (str) or None, got {label_column!r}")
    prm = prm_or_scorer
    tok = getattr(prm, "tokenizer", None)

    def freeprm_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts and {len(completions)} completions; TRL passes one prompt "
                             "per completion")
        labels = None
        if label_column is not None:
            if label_column not in kwargs:
                cols = sorted(k for k in kwargs if k not in _TRL_EXTRA_KWARGS)
                raise ValueError(f"label_column={label_column!r} is not among the columns TRL passed ({cols}); "
                                 "check the dataset's column names")
            labels = list(kwargs[label_column])
            if len(labels) != len(completions):
                raise ValueError(f"column {label_column!r} has {len(labels)} values for {len(completions)} completions")
        out: list[float | None] = [None] * len(completions)
        items, rows = [], []
        for i, (p, c) in enumerate(zip(prompts, completions)):
            if labels is not None and labels[i] is None:
                continue
            response = _completion_text(c, i)
            if not _strip_end(response, tok).strip():
                continue
            item = {"prompt": _prompt_text(p, i), "response": response}
            if labels is not None:
                item[label_column] = labels[i]
            items.append(item)
            rows.append(i)
        for i, r in zip(rows, score_items(prm, items, aggregate)):
            out[i] = finite_or_none(r.score)
        return out

    freeprm_reward.__name__ = freeprm_reward.__qualname__ = name or f"freeprm_{aggregate}"
    return freeprm_reward


def _strip_end(text: str, tok) -> str:
    return strip_end_markers(text, tok) if tok is not None else text


def _is_messages(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and all(isinstance(m, Mapping) for m in x)


def _content(m: Mapping, i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, Sequence) and all(isinstance(p, Mapping) for p in c):  # [{"type": "text", "text": ...}]
        return "".join(p.get("text", "") for p in c if p.get("type", "text") == "text")
    raise ValueError(f"row {i}: message content must be a string or a list of text parts, got {type(c).__name__}")


def _completion_text(c, i: int) -> str:
    if isinstance(c, str):
        return c
    if _is_messages(c):
        return "".join(_content(m, i) for m in c)
    raise ValueError(f"row {i}: a completion must be a string or a list of {{'role', 'content'}} messages, "
                     f"got {type(c).__name__}")


def _prompt_text(p, i: int) -> str:
    if isinstance(p, str):
        return p
    if _is_messages(p):
        if any(m.get("role") == "assistant" for m in p):
            raise ValueError(f"row {i}: the prompt holds an assistant turn; freeprm scores single-turn prompts "
                             "(system and user messages)")
        return "\n\n".join(_content(m, i) for m in p)
    raise ValueError(f"row {i}: a prompt must be a string or a list of {{'role', 'content'}} messages, "
                     f"got {type(p).__name__}")

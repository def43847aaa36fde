"""Training data: JSONL rows -> examples -> token sequences -> padded batches.

Row kinds (one JSON object per line; blank lines are skipped):
  * labeled: ``{"prompt": str, "response": str, "label": 0|1|true|false|float in [0, 1]}`` (CE, KTO);
  * pair:    ``{"prompt": str, "chosen": str, "rejected": str}`` (DPO, NCA).

Pair losses read pair rows as they are and pair labeled rows automatically, per prompt: each
correct response with an incorrect one (a seeded shuffle, then zip; leftovers unused), as the
paper does. Labeled losses read pair rows as one correct and one incorrect response. Any bad
row raises ``ValueError("<path>:<line>: ...")`` saying what is wrong with it.

Tokenization is ``freeprm.engine.tokenization.encode``, the scorer's, so training and scoring see
the same token ids.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.batching import pad_batch
from ..engine.tokenization import encode
from ..io import load_jsonl
from .losses import get_loss


@dataclass(frozen=True)
class Labeled:
    prompt: str
    response: str
    label: float  # 1 correct, 0 incorrect (soft labels allowed for CE)
    line: int  # 1-based line in the source file (0 = built in memory)


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str  # the correct / preferred response
    rejected: str
    line: int


@dataclass(frozen=True)
class Seq:
    """One tokenized prompt + response: ``input_ids[response_start:]`` are the scored tokens."""

    input_ids: tuple[int, ...]
    response_start: int

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.response_start


@dataclass(frozen=True)
class TrainItem:
    """One unit of the loss: ``seqs`` = (response,) for CE, (response, mismatched) for KTO, (chosen, rejected) for pairs."""

    seqs: tuple[Seq, ...]
    label: float
    group: int  # prompt id (instruction-wise balancing)


# ------------------------------------------------------------------------------------ reading
def _parse_label(value, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1:
        return float(value)
    raise ValueError(f"{where}: 'label' must be 0, 1, true, false or a number in [0, 1], got {value!r}")


def _text(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if key != "prompt" and not value.strip():
        raise ValueError(f"{where}: {key!r} is empty; drop the row or give the response text")
    return value


def parse_row(row, where: str) -> Labeled | Pair:
    """One decoded JSON row -> ``Labeled`` or ``Pair`` (``where`` = "path:line" for errors)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each line must be a JSON object, got {type(row).__name__}")
    line = int(where.rsplit(":", 1)[-1]) if where.rsplit(":", 1)[-1].isdigit() else 0
    if "prompt" not in row:
        raise ValueError(f"{where}: missing 'prompt' (rows are {{prompt, response, label}} or {{prompt, chosen, rejected}})")
    prompt = _text(row, "prompt", where)
    if "chosen" in row or "rejected" in row:
        for k in ("chosen", "rejected"):
            if k not in row:
                raise ValueError(f"{where}: a pair row needs both 'chosen' and 'rejected'; {k!r} is missing")
        return Pair(prompt, _text(row, "chosen", where), _text(row, "rejected", where), line)
    if "response" not in row or "label" not in row:
        missing = [k for k in ("response", "label") if k not in row]
        raise ValueError(f"{where}: missing {', '.join(map(repr, missing))} (rows are {{prompt, response, label}} "
                         "or {prompt, chosen, rejected})")
    return Labeled(prompt, _text(row, "response", where), _parse_label(row["label"], where), line)


def read_jsonl(path: str | Path) -> list[Labeled | Pair]:
    """All rows of a JSONL file as examples (``freeprm.io`` reader, strict): ``ValueError("path:line: ...")``
    on the first bad line or row, so training never starts on a partly read file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    out = [parse_row(row, f"{path}:{i}") for i, row in load_jsonl(path, on_error="raise")]
    if not out:
        raise ValueError(f"{path} holds no rows")
    return out


def as_labeled(examples: Sequence[Labeled | Pair]) -> list[Labeled]:
    """Pairs become one correct (label 1) and one incorrect (label 0) response."""
    out = []
    for ex in examples:
        if isinstance(ex, Pair):
            out += [Labeled(ex.prompt, ex.chosen, 1.0, ex.line), Labeled(ex.prompt, ex.rejected, 0.0, ex.line)]
        else:
            out.append(ex)
    return out


def pair_labeled(examples: Sequence[Labeled], *, seed: int = 0) -> list[Pair]:
    """Per prompt, each correct response with an incorrect one (seeded shuffle, zip; ``min(P, N)`` pairs).

    Labels must be 0 or 1; prompts with only one class give no pair.
    """
    by_prompt: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for ex in examples:
        if ex.label not in (0.0, 1.0):
            raise ValueError(f"line {ex.line}: automatic pairing needs labels 0 or 1, got {ex.label}")
        by_prompt[ex.prompt][0 if ex.label == 1.0 else 1].append(ex)
    rng = random.Random(seed)
    pairs = []
    for prompt, (pos, neg) in by_prompt.items():
        pos, neg = list(pos), list(neg)
        rng.shuffle(pos)
        rng.shuffle(neg)
        pairs += [Pair(prompt, p.response, n.response, p.line) for p, n in zip(pos, neg)]
    return pairs


def load_examples(path: str | Path, loss: str, *, seed: int = 0) -> list[Labeled] | list[Pair]:
    """Examples of ``path`` in the form ``loss`` needs (``Pair`` for pair losses, dpo/nca; ``Labeled`` else)."""
    spec = get_loss(loss)
    rows = read_jsonl(path)
    if not spec.pairs:
        out = as_labeled(rows)
        if spec.binary_labels and any(ex.label not in (0.0, 1.0) for ex in out):
            bad = next(ex for ex in out if ex.label not in (0.0, 1.0))
            raise ValueError(f"{path}:{bad.line}: {loss.upper()} needs labels 0 or 1, got {bad.label}")
        return out
    pairs = [r for r in rows if isinstance(r, Pair)]
    pairs += pair_labeled([r for r in rows if isinstance(r, Labeled)], seed=seed)
    if not pairs:
        raise ValueError(f"{path}: no pairs for {loss}: give {{prompt, chosen, rejected}} rows, or labeled rows "
                         "with both a correct and an incorrect response for some prompt")
    return pairs


# ------------------------------------------------------------------------------------ tokenizing
def encode_seq(tokenizer, prompt: str, response: str, *, max_length: int, prompt_format: str = "auto",
               where: str = "") -> tuple[Seq, bool]:
    """Tokenize like the scorer; cut the response's tail past ``max_length``. Returns (seq, truncated)."""
    enc = encode(tokenizer, prompt, response, prompt_format)
    ids, rs = enc.input_ids, enc.response_start
    if rs + 1 > max_length:
        raise ValueError(f"{where}: the prompt alone is {rs} tokens, which leaves no room for the response under "
                         f"max_length={max_length}; raise max_length or shorten the prompt")
    truncated = len(ids) > max_length
    return Seq(tuple(ids[:max_length]), rs), truncated


def build_items(tokenizer, examples: Sequence[Labeled] | Sequence[Pair], loss: str, *, max_length: int = 1024,
                prompt_format: str = "auto", seed: int = 0) -> tuple[list[TrainItem], int]:
    """Tokenized training items for ``loss``; also returns how many sequences were truncated.

    Items of a loss that needs mismatched sequences (KTO) carry a second one: this item's prompt
    with the response of another prompt's item (fixed by ``seed``), used only to estimate the
    reference point z0.
    """
    groups: dict[str, int] = {}
    items, n_trunc = [], 0

    def enc(prompt, response, line):
        nonlocal n_trunc
        s, t = encode_seq(tokenizer, prompt, response, max_length=max_length, prompt_format=prompt_format,
                          where=f"line {line}")
        n_trunc += t
        return s

    for ex in examples:
        g = groups.setdefault(ex.prompt, len(groups))
        if isinstance(ex, Pair):
            items.append(TrainItem((enc(ex.prompt, ex.chosen, ex.line), enc(ex.prompt, ex.rejected, ex.line)), 1.0, g))
        else:
            items.append(TrainItem((enc(ex.prompt, ex.response, ex.line),), ex.label, g))
    if get_loss(loss).needs_mismatched:
        if len(groups) < 2:
            raise ValueError(f"{loss.upper()} needs at least two distinct prompts (its reference point uses mismatched "
                             "prompt/response pairs)")
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        for pos, i in enumerate(order):
            ex = examples[i]
            k = 1
            while examples[order[(pos + k) % len(order)]].prompt == ex.prompt:
                k += 1
            other = examples[order[(pos + k) % len(order)]]
            items[i] = TrainItem(items[i].seqs + (enc(ex.prompt, other.response, ex.line),), items[i].label, items[i].group)
    return items, n_trunc


# ------------------------------------------------------------------------------------ batching
@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long
    target_mask: torch.Tensor  # [B, T] bool: the response tokens
    ref_logps: torch.Tensor | None  # [B, T] fp32 reference log-probs at target positions, 0 elsewhere


def collate(seqs: Sequence[Seq], pad_id: int, ref: Sequence[torch.Tensor] | None = None,
            device: str | torch.device = "cpu") -> Batch:
    """Right-pad sequences into a batch (``engine.batching.pad_batch``); ``ref[i]`` holds seq i's
    ``[n_response]`` reference log-probs."""
    p = pad_batch([s.input_ids for s in seqs], pad_id, side="right", target_starts=[s.response_start for s in seqs])
    ref_lp = None
    if ref is not None:
        ref_lp = torch.zeros(p.input_ids.shape, dtype=torch.float32)
        for i, s in enumerate(seqs):
            if ref[i].shape != (s.n_response,):
                raise ValueError(f"reference log-probs for sequence {i} have shape {tuple(ref[i].shape)}, expected "
                                 f"({s.n_response},); the reference cache is stale: delete it")
            ref_lp[i, s.response_start:len(s.input_ids)] = ref[i]
    return Batch(p.input_ids.to(device), p.attention_mask.to(device), p.target_mask.to(device),
                 None if ref_lp is None else ref_lp.to(device))

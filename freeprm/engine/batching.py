"""Batching and padding of token-id sequences: one module for the scorer, the trainer, generation and benchmarks.

* ``pad_id_of(tokenizer)``: the id used for padding: the tokenizer's pad token, else its EOS token, else 0.
  Padding positions carry ``attention_mask == 0``, so the id itself never changes a result.
* ``pad_batch(seqs, pad_id, side=...)``: ragged token-id lists -> ``PaddedBatch`` (``input_ids``,
  ``attention_mask``, ``target_mask`` and each row's offset), padded on the left or the right.
* ``length_batches(lengths, max_batch_tokens)``: indices grouped longest-first so that each batch's
  padded size (rows x longest row) stays within a token budget.

Equivalent plain torch for ``pad_batch(seqs, pad, target_starts=s, side="right")``::

    T = max(map(len, seqs))
    input_ids = torch.full((B, T), pad); attention_mask = torch.zeros(B, T, dtype=torch.long)
    target_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, x in enumerate(seqs):
        input_ids[b, :len(x)] = torch.tensor(x); attention_mask[b, :len(x)] = 1
        target_mask[b, s[b]:len(x)] = True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

PADDING_SIDES = ("left", "right")


def pad_id_of(tokenizer) -> int:
    """The padding id of ``tokenizer``: ``pad_token_id``, else ``eos_token_id``, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


@dataclass
class PaddedBatch:
    """A padded ``[B, T]`` batch. Row ``b``'s tokens sit at ``offsets[b] : offsets[b] + lengths[b]``."""

    input_ids: torch.Tensor  # [B, T] long, pad_id at padding
    attention_mask: torch.Tensor  # [B, T] long, 1 at real tokens
    target_mask: torch.Tensor  # [B, T] bool, True at target tokens (from target_starts/target_ends)
    offsets: list[int]  # per row: index of its first real token (0 with right padding)
    lengths: list[int]  # per row: number of real tokens

    def to(self, device: str | torch.device) -> PaddedBatch:
        """The same batch with its tensors on ``device``."""
        return PaddedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device),
                           self.offsets, self.lengths)

    def row_slice(self, b: int, start: int = 0, end: int | None = None) -> slice:
        """Columns of row ``b``'s tokens ``start:end`` (indices into the unpadded sequence)."""
        end = self.lengths[b] if end is None else end
        return slice(self.offsets[b] + start, self.offsets[b] + end)

    def unpad(self, values: torch.Tensor, b: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """``values[b]`` (a ``[B, T, ...]`` tensor aligned with this batch) at row ``b``'s tokens ``start:end``."""
        return values[b, self.row_slice(b, start, end)]


def pad_batch(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    *,
    side: str = "right",
    target_starts: Sequence[int] | None = None,
    target_ends: Sequence[int] | None = None,
    length: int | None = None,
    device: str | torch.device | None = None,
) -> PaddedBatch:
    """Pad ragged token-id lists into one ``[B, T]`` batch (``T = length`` or the longest row).

    ``target_mask[b]`` is True on row ``b``'s tokens ``target_starts[b] : target_ends[b]`` (indices into the
    unpadded sequence; ``target_ends`` defaults to each row's length, ``target_starts`` to "no targets").
    ``side``: where the padding goes (``"left"`` keeps every row's last token in the last column).
    """
    if side not in PADDING_SIDES:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not len(seqs):
        raise ValueError("pad_batch needs at least one sequence")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise ValueError(f"sequence {lengths.index(0)} is empty; every row needs at least one token")
    t = max(lengths) if length is None else int(length)
    if t < max(lengths):
        raise ValueError(f"length={t} is shorter than the longest sequence ({max(lengths)} tokens)")
    for name, v in (("target_starts", target_starts), ("target_ends", target_ends)):
        if v is not None and len(v) != len(seqs):
            raise ValueError(f"{name} has {len(v)} entries for {len(seqs)} sequences")
    b = len(seqs)
    ids = torch.full((b, t), int(pad_id), dtype=torch.long)
    am = torch.zeros((b, t), dtype=torch.long)
    tm = torch.zeros((b, t), dtype=torch.bool)
    offsets = []
    for i, s in enumerate(seqs):
        n = lengths[i]
        o = t - n if side == "left" else 0
        ids[i, o:o + n] = torch.as_tensor(s, dtype=torch.long)
        am[i, o:o + n] = 1
        if target_starts is not None:
            a, e = int(target_starts[i]), n if target_ends is None else int(target_ends[i])
            if not 0 <= a <= e <= n:
                raise ValueError(f"sequence {i}: target span {a}:{e} is outside its {n} tokens")
            tm[i, o + a:o + e] = True
        offsets.append(o)
    batch = PaddedBatch(ids, am, tm, offsets, lengths)
    return batch if device is None else batch.to(device)


def length_batches(lengths: Sequence[int], max_batch_tokens: int, *, max_batch_size: int | None = None) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches, longest first.

    A batch holds rows of similar length (sorted, so little padding) and at most ``max_batch_tokens``
    padded tokens (rows x its longest row); a row longer than the budget gets a batch of its own.
    Ties keep input order, so the grouping is deterministic.
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        full = max_batch_size is not None and len(cur) >= max_batch_size
        if cur and ((len(cur) + 1) * lengths[cur[0]] > max_batch_tokens or full):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@dataclass
class PackedBatch:
    """Several sequences per row ("varlen" packing), each with position ids from 0 and no attention across them.

    Sequence ``i`` sits in row ``rows[i]`` at columns ``starts[i] : starts[i] + lengths[i]``.
    """

    input_ids: torch.Tensor  # [R, T] long, pad_id after the last sequence of a row
    position_ids: torch.Tensor  # [R, T] long, restarting at 0 for each sequence (0 at padding)
    segment_ids: torch.Tensor  # [R, T] long: which sequence of the row a token belongs to, -1 at padding
    target_mask: torch.Tensor  # [R, T] bool
    rows: list[int]
    starts: list[int]
    lengths: list[int]

    def attention_mask_4d(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Additive ``[R, 1, T, T]`` mask: 0 where query ``q`` may see key ``k`` (same sequence, ``k <= q``), else the
        dtype's minimum. A padding query sees only itself (so no row of the softmax is empty)."""
        seg = self.segment_ids
        t = seg.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
        allowed = (seg[:, :, None] == seg[:, None, :]) & causal & (seg[:, :, None] >= 0)
        allowed |= torch.eye(t, dtype=torch.bool, device=seg.device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def to(self, device: str | torch.device) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.segment_ids.to(device),
                           self.target_mask.to(device), self.rows, self.starts, self.lengths)

    def unpack(self, values: torch.Tensor, i: int, start: int = 0, end: int | None = None) -> torch.Tensor:
        """``values`` (``[R, T, ...]``, aligned with this batch) at sequence ``i``'s tokens ``start:end``."""
        end = self.lengths[i] if end is None else end
        return values[self.rows[i], self.starts[i] + start:self.starts[i] + end]


def pack_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """First-fit-decreasing bins: indices of sequences per row, each row's total length <= ``row_length``."""
    if lengths and max(lengths) > row_length:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit in rows of {row_length}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, f in enumerate(free):
            if lengths[i] <= f:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_length - lengths[i])
    return rows


def pack_batch(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    *,
    row_length: int | None = None,
    target_starts: Sequence[int] | None = None,
    device: str | torch.device | None = None,
) -> PackedBatch:
    """Pack sequences into rows of ``row_length`` tokens (default: the longest sequence) by first-fit decreasing.

    Run the model with ``position_ids=batch.position_ids`` and ``attention_mask=batch.attention_mask_4d(dtype)``:
    each sequence then sees exactly what it would alone (block-diagonal causal attention, positions from 0).
    """
    if not len(seqs):
        raise ValueError("pack_batch needs at least one sequence")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise ValueError(f"sequence {lengths.index(0)} is empty; every sequence needs at least one token")
    t = max(lengths) if row_length is None else int(row_length)
    bins = pack_rows(lengths, t)
    ids = torch.full((len(bins), t), int(pad_id), dtype=torch.long)
    pos = torch.zeros((len(bins), t), dtype=torch.long)
    seg = torch.full((len(bins), t), -1, dtype=torch.long)
    tm = torch.zeros((len(bins), t), dtype=torch.bool)
    rows, starts = [0] * len(seqs), [0] * len(seqs)
    for r, members in enumerate(bins):
        col = 0
        for k, i in enumerate(members):
            n = lengths[i]
            ids[r, col:col + n] = torch.as_tensor(seqs[i], dtype=torch.long)
            pos[r, col:col + n] = torch.arange(n)
            seg[r, col:col + n] = k
            if target_starts is not None:
                a = int(target_starts[i])
                if not 0 <= a <= n:
                    raise ValueError(f"sequence {i}: target start {a} is outside its {n} tokens")
                tm[r, col + a:col + n] = True
            rows[i], starts[i] = r, col
            col += n
    batch = PackedBatch(ids, pos, seg, tm, rows, starts, lengths)
    return batch if device is None else batch.to(device)

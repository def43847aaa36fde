"""Per-candidate KV caches of one causal LM, run in batches: the state behind incremental scoring and step generation.

A candidate's cache is a ``KVState``: an immutable tuple of *segments* (one per ``forward`` that extended it; a
segment holds, per layer, the keys and values ``[Hkv, L_s, d]`` of its tokens) plus the final hidden state of its
last token (which predicts the next token). Forking a candidate shares the state object (and so every segment):
children cost no memory until they are extended, and siblings keep sharing their common prefix for good.
Dropping a candidate is dropping its reference.

Candidates of any lengths (and of different prompts) run together: ``CachedLM.open(states)`` copies their
segments into one left-padded ``DynamicCache`` (``[B, Hkv, L_max, d]`` per layer, padding masked) and
``Batch.forward(ids, valid)`` runs new tokens for all rows at once, at positions that continue each row's own
sequence (``L_b, L_b + 1, ...``: padding never shifts a position). ``valid[b]`` marks row ``b``'s real new
tokens and must be a prefix of the columns run so far in this batch (a row that stops stays stopped).
``Batch.states()`` returns each row's new ``KVState`` (its old segments plus one new segment of its real
tokens). Equivalent plain torch for one row (what the tests compare against)::

    hs = base(torch.tensor([all_ids_so_far + new_ids])).last_hidden_state[0, -len(new_ids):]   # [n, D]

Supported where the base model takes a ``DynamicCache`` whose layers are all full-attention ``DynamicLayer``
(Llama, Qwen2, Mistral without a sliding window, SmolLM2, ...); elsewhere ``ValueError`` before any result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..engine.logprobs import LMHead, split_lm
from ..engine.prefill import SharedPromptUnsupported, _cache_kwarg, _check_cache

Segment = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (keys [Hkv, L_s, d], values [Hkv, L_s, d])


@dataclass(frozen=True)
class KVState:
    """One candidate's cache for one model: shared freely between candidates (it is never modified)."""

    segments: tuple[Segment, ...]
    length: int  # tokens in the cache (sum of the segments' lengths)
    last_hidden: torch.Tensor  # [D] final (normed) hidden state of the last token: predicts the next one

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for seg in self.segments for kv in seg for t in kv)


class CachedLM:
    """A causal LM whose candidates keep KV caches (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, pad_id: int = 0) -> None:
        self.model = model
        self.base, self.head = split_lm(model)
        try:
            self.cache_kwarg = _cache_kwarg(self.base)
        except SharedPromptUnsupported as e:
            raise ValueError(f"incremental scoring/generation needs a KV cache: {e}") from None
        self.pad_id = int(pad_id)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._checked = False

    @property
    def lm_head(self) -> LMHead:
        return self.head

    def open(self, states: Sequence[KVState | None]) -> Batch:
        """A batch over ``states`` (None: an empty cache, e.g. for a prompt's first forward)."""
        return Batch(self, list(states))

    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[KVState]:
        """Run prompts (token ids, each non-empty) from empty caches; one state per prompt."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt has no tokens; every prompt needs at least one token of context")
        batch = self.open([None] * len(prompts))
        t = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), t), self.pad_id, dtype=torch.long)
        valid = torch.zeros((len(prompts), t), dtype=torch.bool)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = torch.tensor(list(p), dtype=torch.long)
            valid[b, :len(p)] = True
        batch.forward(ids, valid)
        return batch.states()

    def _check(self, cache) -> None:
        if self._checked:
            return
        try:
            _check_cache(cache)
        except SharedPromptUnsupported as e:
            raise ValueError(f"{type(self.model).__name__}: incremental scoring needs full-attention dynamic KV "
                             f"caches ({e}); score whole texts with Scorer.score instead") from None
        self._checked = True


class Batch:
    """Rows of candidates run together through one ``DynamicCache`` (see the module docstring)."""

    def __init__(self, lm: CachedLM, states: list[KVState | None]) -> None:
        from transformers import DynamicCache

        self.lm, self.old = lm, states
        dev = lm.device
        b = len(states)
        self.past_len = [0 if s is None else s.length for s in states]  # L_b
        lmax = max(self.past_len, default=0)
        self.lmax = lmax
        self.mask = torch.zeros((b, lmax), dtype=torch.long, device=dev)  # [B, L_max]: left padding
        for i, n in enumerate(self.past_len):
            if n:
                self.mask[i, lmax - n:] = 1
        self.cache = DynamicCache()
        if lmax:
            ref = next(s for s in states if s is not None)
            n_layers = len(ref.segments[0])
            data = []
            for layer in range(n_layers):
                k0, v0 = ref.segments[0][layer]
                keys = torch.zeros((b, k0.shape[0], lmax, k0.shape[-1]), dtype=k0.dtype, device=dev)
                values = torch.zeros((b, v0.shape[0], lmax, v0.shape[-1]), dtype=v0.dtype, device=dev)
                for i, s in enumerate(states):
                    if s is None:
                        continue
                    pos = lmax - s.length
                    for seg in s.segments:
                        k, v = seg[layer]
                        n = k.shape[1]
                        keys[i, :, pos:pos + n] = k
                        values[i, :, pos:pos + n] = v
                        pos += n
                data.append((keys, values))
            self.cache = DynamicCache(data)
        self.n_new = [0] * b  # real new tokens per row so far
        self.new_cols = 0
        self.last_hidden = [None if s is None else s.last_hidden for s in states]

    def forward(self, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` ``[B, T]`` (``valid`` ``[B, T]`` bool: real tokens, a prefix per row of everything run in this
        batch); returns the final hidden states ``[B, T, D]`` (garbage at invalid positions)."""
        lm = self.lm
        b, t = ids.shape
        valid = valid.to(torch.bool)
        for i in range(b):
            nv = int(valid[i].sum())
            if nv and (self.n_new[i] != self.new_cols or not bool(valid[i, :nv].all())):
                raise ValueError(f"row {i}: real tokens must form a prefix of the new columns (a row that stopped "
                                 "cannot continue in the same batch)")
        dev = lm.device
        pos = torch.tensor([[self.past_len[i] + self.n_new[i] + j for j in range(t)] for i in range(b)],
                           dtype=torch.long, device=dev)
        self.mask = torch.cat([self.mask, valid.to(device=dev, dtype=torch.long)], 1)
        out = lm.base(input_ids=ids.to(dev), attention_mask=self.mask, position_ids=pos, use_cache=True,
                      **{lm.cache_kwarg: self.cache})
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        lm._check(cache)
        self.cache = cache
        hs = out.last_hidden_state  # [B, T, D]
        for i in range(b):
            nv = int(valid[i].sum())
            if nv:
                self.last_hidden[i] = hs[i, nv - 1]
            self.n_new[i] += nv
        self.new_cols += t
        return hs

    def states(self) -> list[KVState]:
        """Each row's state after the forwards: its old segments plus one segment of its real new tokens."""
        out = []
        layers = self.cache.layers
        for i, old in enumerate(self.old):
            n = self.n_new[i]
            segs = () if old is None else old.segments
            length = 0 if old is None else old.length
            if n:
                a = self.lmax
                seg = tuple((lay.keys[i, :, a:a + n].clone(), lay.values[i, :, a:a + n].clone()) for lay in layers)
                segs, length = segs + (seg,), length + n
            if self.last_hidden[i] is None:
                raise ValueError(f"row {i} has no tokens: nothing was run for it")
            out.append(KVState(segs, length, self.last_hidden[i].detach().clone()))
        return out

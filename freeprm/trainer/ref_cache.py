"""Reference log-prob cache: per-token ``log pi_ref`` of every training sequence, computed once.

The implicit reward ``beta * log(pi_theta / pi_ref)`` needs the reference model's log-probs of
every response token, and they never change during training. They are computed once (a no-grad
forward over the data) and stored as safetensors::

    <cache_dir>/ref-<key>.safetensors
        key       = sha256(model fingerprint, tokenizer fingerprint)[:20]
        tensors   = { sequence key: float32 [n_response_tokens] }
        sequence key = sha1(int64 token ids, response_start)[:24]
        metadata  = {"model": model fingerprint, "tokenizer": tokenizer fingerprint, "format": "freeprm-ref-1"}

* model fingerprint: sha256 over the config (without ``_name_or_path``) and every parameter
  tensor's name, dtype, shape and bytes, so the same weights loaded from any path share the
  cache and any change to the weights (or their dtype) gives a new file;
* tokenizer fingerprint: sha256 of the serialized fast tokenizer, its special tokens and chat
  template;
* sequence key: the exact token ids and where the response starts.

A training run looks up all its sequences; only the missing ones are computed (a changed model
or tokenizer misses everything, a changed data set only its new sequences), and the file is
rewritten atomically with old and new entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..engine import sequence_logprobs
from ..engine.batching import length_batches
from .data import Seq, collate

FORMAT = "freeprm-ref-1"


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the config and all parameters/buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    cfg.pop("_name_or_path", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the serialized tokenizer, its special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def sequence_key(seq: Seq) -> str:
    h = hashlib.sha1(torch.tensor(seq.input_ids, dtype=torch.int64).numpy().tobytes())
    h.update(f"|{seq.response_start}".encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def compute_ref_logprobs(model, seqs: Sequence[Seq], *, pad_id: int = 0, max_batch_tokens: int = 4096,
                         impl: str = "auto", progress: bool = False) -> list[torch.Tensor]:
    """Per-token reference log-probs (fp32 ``[n_response]`` each, on the CPU) of ``seqs``, batched by length."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[torch.Tensor | None] = [None] * len(seqs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seqs), desc="reference log-probs", unit="seq")
    for idx in length_batches([len(s.input_ids) for s in seqs], max_batch_tokens):  # longest first
        batch = collate([seqs[j] for j in idx], pad_id, device=device)
        lp = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.target_mask, impl=impl)  # [B, T]
        for b, j in enumerate(idx):
            s = seqs[j]
            out[j] = lp[b, s.response_start:len(s.input_ids)].float().cpu().clone()
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return out  # type: ignore[return-value]


class ReferenceCache:
    """The safetensors file of one (reference model, tokenizer) pair; see the module docstring."""

    def __init__(self, cache_dir: str | os.PathLike, model_fp: str, tokenizer_fp: str):
        self.model_fp, self.tokenizer_fp = model_fp, tokenizer_fp
        self.key = hashlib.sha256(f"{model_fp}|{tokenizer_fp}".encode()).hexdigest()[:20]
        self.path = Path(cache_dir) / f"ref-{self.key}.safetensors"
        self.computed = 0  # sequences computed by the last ``get`` (0: a full hit, no reference forward)

    @classmethod
    def for_model(cls, cache_dir, model, tokenizer) -> ReferenceCache:
        return cls(cache_dir, model_fingerprint(model), tokenizer_fingerprint(tokenizer))

    def load(self) -> dict[str, torch.Tensor]:
        if not self.path.is_file():
            return {}
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT or meta.get("model") != self.model_fp or meta.get("tokenizer") != self.tokenizer_fp:
            return {}  # a different key under a colliding name, or an old format: recompute
        return load_file(str(self.path))

    def save(self, entries: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ref-", suffix=".tmp")
        os.close(fd)
        try:
            meta = {"format": FORMAT, "model": self.model_fp, "tokenizer": self.tokenizer_fp}
            save_file({k: v.contiguous() for k, v in entries.items()}, tmp, metadata=meta)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def lookup(self, seqs: Sequence[Seq]) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]:
        entries = self.load()
        return [entries.get(sequence_key(s)) for s in seqs], entries

    def get(self, seqs: Sequence[Seq], model=None, *, pad_id: int = 0, max_batch_tokens: int = 4096,
            impl: str = "auto", progress: bool = False) -> list[torch.Tensor]:
        """Reference log-probs of ``seqs``; computes (with ``model``) and stores only the missing ones.

        ``model`` may be a callable returning the model, so it is loaded only on a miss.
        """
        found, entries = self.lookup(seqs)
        missing = sorted({i for i, v in enumerate(found) if v is None or v.shape != (seqs[i].n_response,)})
        uniq: dict[str, int] = {}
        for i in missing:
            uniq.setdefault(sequence_key(seqs[i]), i)
        self.computed = len(uniq)
        if uniq:
            if model is None:
                raise ValueError(f"{len(uniq)} sequences are not in the reference cache {self.path} and no reference "
                                 "model was given to compute them")
            m = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
            keys = list(uniq)
            fresh = compute_ref_logprobs(m, [seqs[uniq[k]] for k in keys], pad_id=pad_id,
                                         max_batch_tokens=max_batch_tokens, impl=impl, progress=progress)
            entries.update(dict(zip(keys, fresh)))
            self.save(entries)
            for i in missing:
                found[i] = entries[sequence_key(seqs[i])]
        return found  # type: ignore[return-value]

"""What identifies a model's weights: the content digests behind the ``rerank`` fingerprint and the
``bon`` scores-cache tag, so that weights changed in place under the same path are never mistaken
for the old ones.

* a local directory (or an alias / ``.gguf`` file, resolved to its cached directory): its resolved
  path plus, for each weight, config and tokenizer file, a sha256 of the file's size, first and
  last MiB (fast on multi-GB weights, and any re-save changes the size or the header);
* a hub id: the id as given (no local files to digest; pin a revision, or download it to a directory);
* an in-memory ``(model, tokenizer)`` pair: a sha256 of every parameter and buffer (name, shape,
  dtype, bytes) and of the vocabulary and chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

HASH_BYTES = 1 << 20
_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's size, first and last MiB (fast on multi-GB weights; catches any re-save)."""
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(HASH_BYTES))
        if size > 2 * HASH_BYTES:
            f.seek(size - HASH_BYTES)
            h.update(f.read(HASH_BYTES))
        else:
            h.update(f.read())
    return h.hexdigest()


def params_identity(model, tokenizer) -> dict:
    """``{"params_sha256", "tokenizer_sha256"}`` of an in-memory model and its tokenizer (hashed in place, no
    copy); only ``params_sha256`` when ``tokenizer`` is None."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())
    if tokenizer is None:
        return {"params_sha256": h.hexdigest()}
    v = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    v.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return {"params_sha256": h.hexdigest(), "tokenizer_sha256": v.hexdigest()}


def model_identity(spec) -> dict | None:
    """What identifies a model (see the module doc): ``{"path", "files": {name: digest}}``, ``{"hub_id"}``,
    ``params_identity`` for a ``(model, tokenizer)`` pair, or None for no model."""
    if spec is None:
        return None
    if isinstance(spec, tuple):
        model, tok = spec
        return params_identity(model, tok)
    from .engine.loading import resolve_spec

    resolved = resolve_spec(spec)
    p = Path(resolved)
    if not p.is_dir():
        return {"hub_id": str(resolved)}
    names = sorted(f.name for f in p.iterdir() if f.is_file() and f.suffix in _FILE_SUFFIXES)
    return {"path": str(p.resolve()), "files": {n: file_digest(p / n) for n in names}}


def identity_digest(identity: dict | None) -> str:
    """One short hex digest (16 characters) of an identity (a ``model_identity`` value or a
    ``ScoringConfig.identity()``): the sha256 of it as sorted JSON, the same in every process."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

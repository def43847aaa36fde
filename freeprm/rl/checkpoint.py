"""``ImplicitPRM.save_pretrained`` / ``from_pretrained``: a PRM as a Hugging Face directory plus its metadata.

Layout: the model (safetensors) and tokenizer, ``freeprm_prm.json`` (``freeprm.prm_meta``: the scoring config
with beta, the reference and its content digest, the step delimiter; the online settings and version under
``implicit_prm``), ``optimizer.pt`` (AdamW state, read back with ``weights_only=True``) and, for a frozen
reference, the reference model in ``reference/``. The directory is a policy the engine's ``Scorer`` loads with
the same beta and reference (it reads the same file). Directories of the first format
(``freeprm-implicit-prm-1``) keep loading.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import NO_REFERENCE, UNSET, ScoringConfig, merge_config
from ..engine.loading import load_model
from ..prm_meta import (
    META_FILE,
    REFERENCE_DIR,
    check_reference_digest,
    content_digest,
    fill_config,
    meta_dict,
    read_meta,
    write_meta,
)
from .reference import frozen

OPTIMIZER_FILE = "optimizer.pt"
_ONLINE = ("granularity", "lr", "grad_clip", "mini_batch_size", "loss", "weight_decay")


def prm_settings(prm) -> dict:
    """``prm``'s online settings, reference kind and version (the ``implicit_prm`` part of its metadata)."""
    return {**{k: getattr(prm, k) for k in _ONLINE}, "reference_kind": prm.reference_kind, "version": prm.version}


def _reference_record(prm, path: Path) -> tuple[str | None, str | None]:
    """``(scoring.reference, reference_digest)`` of a PRM saved at ``path``."""
    kind = prm.reference_kind
    if kind == "none":
        return NO_REFERENCE, None
    if kind == "frozen":
        return REFERENCE_DIR, content_digest(str(path / REFERENCE_DIR))
    if kind == "model":
        spec = getattr(prm, "reference_spec", None)
        if spec is not None:
            return spec, content_digest(spec)
        return None, content_digest(prm.reference)
    return None, None  # "policy": the caller's log-probs, nothing to record


def save_pretrained(prm, path: str | os.PathLike) -> str:
    """Write ``prm`` to the directory ``path`` (see the module docstring); returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    prm.model.save_pretrained(path, safe_serialization=True)
    if prm.tokenizer is not None:
        prm.tokenizer.save_pretrained(path)
    if prm.reference_kind == "frozen":
        prm.reference.save_pretrained(path / REFERENCE_DIR, safe_serialization=True)
        if prm.tokenizer is not None:
            prm.tokenizer.save_pretrained(path / REFERENCE_DIR)
    torch.save(prm.optimizer.state_dict(), path / OPTIMIZER_FILE)
    ref, digest = _reference_record(prm, path)
    c = prm.scoring_config  # recorded as used (fields left at their defaults are written as those defaults)
    scoring = ScoringConfig(beta=prm.beta, reference=ref, step_delimiter=prm.step_delimiter,
                            step_pattern=c.pattern_text, aggregate=c.aggregate, prompt_format=c.prompt_format,
                            max_length=c.max_length)
    training = {"trainer": "ImplicitPRM", "loss": prm.loss, "data_sha256": None, "updates": prm.version}
    write_meta(path, meta_dict(scoring, reference_digest=digest, training=training, implicit_prm=prm_settings(prm)))
    return str(path)


def from_pretrained(cls, path: str | os.PathLike, reference="saved", *, config: ScoringConfig | None = None,
                    force_reference: bool = False, **kwargs):
    """Load a ``save_pretrained`` directory as ``cls`` (``ImplicitPRM``); see ``ImplicitPRM.from_pretrained``."""
    path = Path(path)
    meta = read_meta(path)
    if meta is None:
        raise ValueError(f"{path} has no {META_FILE}; is it an ImplicitPRM.save_pretrained directory?")
    online = meta.implicit_prm or {}
    settings = {k: online[k] for k in _ONLINE if k in online}
    # keywords win over config; the scoring fields given in neither come from the recorded ScoringConfig
    scoring = {k: kwargs.pop(k, UNSET) for k in ("beta", "step_delimiter", "dtype")}
    cfg = fill_config(merge_config(config, **scoring), meta, _stacklevel=5)
    settings.update(kwargs)
    if isinstance(reference, str) and reference == "saved" and cfg.reference is not None:
        reference = cfg.reference  # a reference the config gives counts as given here
    rec = meta.scoring.reference
    default_kind = "frozen" if rec == REFERENCE_DIR else "none" if rec in (NO_REFERENCE, None) else "model"
    kind = online.get("reference_kind", default_kind)  # written by freeprm train (no implicit_prm): its reference
    frozen_ref = None
    if isinstance(reference, str) and reference == "saved":
        if kind == "model" and meta.scoring.reference is None:
            raise ValueError(f"{meta.file}: this PRM was saved with a separate in-memory reference model; pass "
                             "reference=<that model>")
        if kind in ("frozen", "model"):
            frozen_ref = meta.reference_spec()  # ValueError naming the file when it is missing
            check_reference_digest(meta, frozen_ref, force_reference=force_reference, given=False)
            reference = "none"
        else:
            reference = "none" if kind == "none" else kind
    elif reference not in (None, "none", "policy", "frozen"):
        check_reference_digest(meta, reference, force_reference=force_reference)
    prm = cls(str(path), reference, config=cfg, **settings)
    if frozen_ref is not None:
        prm.reference = frozen(load_model(frozen_ref, dtype=next(prm.model.parameters()).dtype, device=prm.device)[0])
        prm.reference_kind = kind
        if kind == "model":
            prm.reference_spec = frozen_ref
        prm.scoring_config = prm.scoring_config.replace(reference=prm.reference_spec)  # a spec, or unset (frozen)
    opt_file = path / OPTIMIZER_FILE
    if opt_file.is_file():
        prm.optimizer.load_state_dict(torch.load(opt_file, map_location=prm.device, weights_only=True))
    prm.version = int(online.get("version", 0))
    return prm

"""``ImplicitPRM.save_pretrained`` / ``from_pretrained``: a PRM as a Hugging Face directory plus its settings.

Layout: the model (safetensors) and tokenizer, ``freeprm_prm.json`` (settings and version),
``optimizer.pt`` (AdamW state, read back with ``weights_only=True``) and, for a frozen reference,
the reference model in ``reference/``. The directory is a policy the engine's ``Scorer`` loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..engine.loading import load_model
from .reference import frozen

CONFIG_FILE = "freeprm_prm.json"
OPTIMIZER_FILE = "optimizer.pt"
REFERENCE_DIR = "reference"
FORMAT = "freeprm-implicit-prm-1"
_SETTINGS = ("beta", "granularity", "step_delimiter", "lr", "grad_clip", "mini_batch_size", "loss", "weight_decay")


def prm_settings(prm) -> dict:
    """What ``save_pretrained`` records of ``prm``: its settings, reference kind and version."""
    return {"format": FORMAT, **{k: getattr(prm, k) for k in _SETTINGS}, "reference": prm.reference_kind,
            "version": prm.version}


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
    (path / CONFIG_FILE).write_text(json.dumps(prm_settings(prm), indent=2))
    return str(path)


def from_pretrained(cls, path: str | os.PathLike, reference="saved", **kwargs):
    """Load a ``save_pretrained`` directory as ``cls`` (``ImplicitPRM``); see ``ImplicitPRM.from_pretrained``."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ValueError(f"{path} has no {CONFIG_FILE}; is it an ImplicitPRM.save_pretrained directory?")
    cfg = json.loads(cfg_file.read_text())
    settings = {k: cfg[k] for k in _SETTINGS if k in cfg}
    settings.update(kwargs)
    frozen_ref = None
    if isinstance(reference, str) and reference == "saved":
        kind = cfg.get("reference", "none")
        if kind == "model":
            raise ValueError("this PRM was saved with a separate reference model; pass reference=<that model>")
        if kind == "frozen":
            frozen_ref = str(path / REFERENCE_DIR)
            reference = None
        else:
            reference = None if kind == "none" else kind
    prm = cls(str(path), reference, **settings)
    if frozen_ref is not None:
        prm.reference = frozen(load_model(frozen_ref, dtype=next(prm.model.parameters()).dtype, device=prm.device)[0])
        prm.reference_kind = "frozen"
    opt_file = path / OPTIMIZER_FILE
    if opt_file.is_file():
        prm.optimizer.load_state_dict(torch.load(opt_file, map_location=prm.device, weights_only=True))
    prm.version = int(cfg.get("version", 0))
    return prm

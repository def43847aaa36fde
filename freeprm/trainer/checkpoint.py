"""Checkpoint I/O: ``checkpoint-<step>/`` directories, the trainer state, RNG states, metrics rewind.

A checkpoint is the policy as a Hugging Face directory (``save_pretrained`` safetensors +
tokenizer, loadable by ``load_model``), ``trainer_state.json`` (format, step, data position,
config, reference fingerprints) and ``optimizer.pt`` (optimizer, scheduler and RNG states),
written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

STATE_FORMAT = "freeprm-trainer-1"
_STATE_KEYS = ("step", "epoch", "pos", "total_steps", "n_items", "config")  # what resuming reads


def rng_state() -> dict:
    s = random.getstate()
    st = {"python": [s[0], list(s[1]), s[2]], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_model(model, tokenizer, path: str | os.PathLike, prm_meta: dict | None = None) -> None:
    """The policy as a Hugging Face directory (safetensors + tokenizer) that ``load_model`` loads, with its
    ``freeprm_prm.json`` (``freeprm.prm_meta``) when ``prm_meta`` is given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if prm_meta is not None:
        from ..prm_meta import write_meta

        write_meta(path, prm_meta)


def save_checkpoint(path: str | os.PathLike, model, tokenizer, state: dict, optimizer, scheduler,
                    prm_meta: dict | None = None) -> None:
    """Model + tokenizer (+ ``freeprm_prm.json``) + ``trainer_state.json`` (``state`` plus the format) +
    ``optimizer.pt``, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_model(model, tokenizer, tmp, prm_meta)
    (tmp / "trainer_state.json").write_text(json.dumps({"format": STATE_FORMAT, **state}, indent=2))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state()}, tmp / "optimizer.pt")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def load_optimizer_state(path: str | os.PathLike, device) -> dict:
    """``optimizer.pt`` of a checkpoint: ``{"optimizer", "scheduler", "rng"}``."""
    return torch.load(Path(path) / "optimizer.pt", map_location=device, weights_only=True)


def _checkpoints(out: str | os.PathLike) -> list[Path]:
    """``checkpoint-<step>`` directories of ``out``, by step."""
    return sorted(Path(out).glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[-1]))


def prune_checkpoints(out: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` latest checkpoints in ``out``."""
    for p in _checkpoints(out)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def read_state(path: str | os.PathLike) -> dict:
    """``trainer_state.json`` of a checkpoint; ``ValueError`` if ``path`` is not one of this format."""
    p = Path(path) / "trainer_state.json"
    if not p.is_file():
        raise ValueError(f"{path} is not a trainer checkpoint (no trainer_state.json)")
    fix = (f"delete {path} to resume from the checkpoint before it (--resume auto takes the latest one left), "
           "or start over in a new --out")
    try:
        state = json.loads(p.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:  # a truncated or corrupt file (a kill or a full disk mid-write)
        raise ValueError(f"{p} is damaged ({str(e).splitlines()[0]}), so this checkpoint cannot be resumed; {fix}") \
            from None
    if not isinstance(state, dict):
        raise ValueError(f"{p} is damaged (not a JSON object), so this checkpoint cannot be resumed; {fix}")
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{p} has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing or not isinstance(state["config"], dict):
        raise ValueError(f"{p} is damaged (missing or mistyped {', '.join(missing) or 'config'}), so this checkpoint "
                         f"cannot be resumed; {fix}")
    return state


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The checkpoint of ``out`` with the highest step (one with a ``trainer_state.json``), or None."""
    ckpts = [p for p in _checkpoints(out) if (p / "trainer_state.json").is_file()]
    return ckpts[-1] if ckpts else None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past the checkpoint being resumed (steps that will be redone).

    Read through ``freeprm.io``: a cut last line (a kill during a write) is dropped with a
    warning naming the file and line; a corrupt line before it is a ``ValueError`` naming them.
    """
    if not path.is_file():
        return
    from ..io import load_jsonl, mark_nonfinite, write_jsonl_atomic

    rows = load_jsonl(path, on_error="raise", allow_truncated_tail=True, allow_nan=True)  # NaN: files of older versions
    write_jsonl_atomic(path, [mark_nonfinite(r) for _, r in rows if r.get("step", 0) <= step])

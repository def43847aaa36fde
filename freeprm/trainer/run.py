"""``train()``: one training run from specs: load, read and tokenize the data, reference log-probs, optimize.

See the package docstring (``freeprm/trainer/__init__.py``) for the whole picture; this module wires
``data.py``, ``ref_cache.py``, ``loop.Trainer`` and ``checkpoint.py`` together, including resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import dtype_name, is_no_reference
from ..engine import load_model
from ..engine.batching import pad_id_of
from ..engine.loading import cache_dir
from ..io import check_output_dir
from . import losses
from .checkpoint import latest_checkpoint, read_state, truncate_metrics
from .config import TrainConfig, check_resume_config
from .data import Labeled, Pair, as_labeled, build_items, load_examples, pair_labeled
from .loop import Trainer
from .ref_cache import ReferenceCache


@dataclass
class TrainResult:
    final_dir: Path | None
    steps: int
    metrics: list[dict]
    ref_cache: Path | None
    ref_computed: int  # reference sequences computed (0: every one came from the cache)
    truncated: int

def train(
    policy,
    data: str | os.PathLike | Sequence[Labeled] | Sequence[Pair],
    out: str | os.PathLike,
    *,
    config: TrainConfig | None = None,
    reference=None,
    resume: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    until_step: int | None = None,
) -> TrainResult:
    """Train ``policy`` (a spec for ``load_model`` or a ``(model, tokenizer)`` pair) on ``data``; see the module docstring.

    reference (``pi_ref``, docs/config.md): ``None`` = the initial policy (the paper's setup); a spec or
    ``(model, tokenizer)`` otherwise; ``"none"`` = no reference (the same as ``config.reference_free``; a model is
    ignored with ``config.reference_free``). dtype: of the trained weights; ``"auto"`` (default) = float32 (the
    optimizer keeps fp32 weights; ``config.bf16`` sets bf16 autocast). resume: ``"auto"`` (latest checkpoint in
    ``out``, or a fresh start if none) or a checkpoint directory. ``until_step`` stops early and
    saves a checkpoint there (for interrupted runs and tests); the run's schedule is unchanged.
    """
    config = config or TrainConfig()
    if is_no_reference(reference):
        config, reference = dataclasses.replace(config, reference_free=True), None
    if isinstance(dtype, str) and dtype_name(dtype) == "auto":
        dtype = "float32"
    config.validate()
    out = check_output_dir(out, create=True)  # a file, /dev/null, a FIFO: refused with a message
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = latest_checkpoint(out) if resume == "auto" else (Path(resume) if resume else None)
    state = None
    if ckpt is not None:
        state = read_state(ckpt)
        check_resume_config(state["config"], config)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    spec_name = policy if isinstance(policy, (str, os.PathLike)) else type(policy[0]).__name__
    model, tokenizer = load_model(str(ckpt) if ckpt is not None else policy, dtype=dtype, device=device,
                                  trust_remote_code=trust_remote_code)
    if isinstance(policy, tuple) and ckpt is None:
        model.to(device)
    examples = load_examples(data, config.loss, seed=config.seed) if isinstance(data, (str, os.PathLike)) else list(data)
    if not isinstance(data, (str, os.PathLike)):
        if losses.get_loss(config.loss).pairs and examples and isinstance(examples[0], Labeled):
            examples = pair_labeled(examples, seed=config.seed)
        elif not losses.get_loss(config.loss).pairs:
            examples = as_labeled(examples)
    items, n_trunc = build_items(tokenizer, examples, config.loss, max_length=config.max_length,
                                 prompt_format=config.prompt_format, seed=config.seed)
    if n_trunc:
        print(f"freeprm train: {n_trunc} sequences were cut to max_length={config.max_length} tokens")

    ref_logps, cache, meta = None, None, {"policy": str(spec_name)}
    if not config.reference_free:
        seqs = [s for it in items for s in it.seqs]
        root = Path(config.ref_cache_dir) if config.ref_cache_dir else cache_dir() / "refcache"
        if state is not None:  # the reference of the original run, by its fingerprints
            cache = ReferenceCache(root, state["ref_model_fp"], state["ref_tokenizer_fp"])
            ref_src = state.get("reference")
            loader = None
            if ref_src is not None:
                loader = (lambda: load_model(ref_src, dtype=dtype, device=device, trust_remote_code=trust_remote_code)[0])
            elif isinstance(policy, (str, os.PathLike)):
                loader = (lambda: load_model(policy, dtype=dtype, device=device, trust_remote_code=trust_remote_code)[0])
        elif reference is None:  # the initial policy: fingerprint it now, compute misses with it before any update
            cache = ReferenceCache.for_model(root, model, tokenizer)
            loader, ref_src = model, None
        else:
            ref_model, ref_tok = load_model(reference, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            if ref_tok.get_vocab() != tokenizer.get_vocab():
                raise ValueError("the reference and the policy tokenizers differ; use the same tokenizer for both")
            cache = ReferenceCache.for_model(root, ref_model, ref_tok)
            loader = ref_model
            ref_src = str(reference) if isinstance(reference, (str, os.PathLike)) else None
        flat = cache.get(seqs, loader, pad_id=pad_id_of(tokenizer), max_batch_tokens=config.ref_batch_tokens, impl=config.impl,
                         progress=config.progress)
        ref_logps, k = [], 0
        for it in items:
            ref_logps.append(tuple(flat[k:k + len(it.seqs)]))
            k += len(it.seqs)
        meta.update(ref_model_fp=cache.model_fp, ref_tokenizer_fp=cache.tokenizer_fp, reference=ref_src,
                    ref_cache=str(cache.path))
    prm_meta = _prm_meta(config, policy, reference, model, tokenizer, data, state, meta)
    trainer = Trainer(model, tokenizer, items, config, ref_logps=ref_logps, out_dir=out, meta=meta, prm_meta=prm_meta)
    if ckpt is not None:
        trainer.load_state(ckpt)
        truncate_metrics(out / "metrics.jsonl", trainer.step)
    else:
        (out / "metrics.jsonl").write_text("")
    (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    rows = trainer.train(until_step)
    final = None
    if trainer.step >= trainer.total_steps:
        final = out / "final"
        trainer.save_model(final)
    else:
        trainer.save_checkpoint(out / f"checkpoint-{trainer.step}")
        trainer._prune_checkpoints()
    return TrainResult(final, trainer.step, rows, cache.path if cache else None, cache.computed if cache else 0, n_trunc)


def _portable_spec(spec) -> str | None:
    """A model spec as recorded in ``freeprm_prm.json``: a local path made absolute, an alias or hub id as given,
    None for an in-memory model."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else str(spec)


def _prm_meta(config: TrainConfig, policy, reference, model, tokenizer, data, state: dict | None, meta: dict) -> dict:
    """``freeprm_prm.json`` of this run's saved models: the scoring config it trained (beta, reference and its
    content digest, prompt format), the loss and the training data's digest. On resume, the reference digest is the
    one the run recorded first (the policy has been updated since)."""
    from ..config import NO_REFERENCE, ScoringConfig
    from ..prm_meta import content_digest, data_digest, meta_dict

    if config.reference_free:
        ref_spec, digest = NO_REFERENCE, None
    else:
        src = policy if reference is None else reference
        ref_spec = _portable_spec(src)
        if state is not None and "reference_digest" in state:
            digest = state["reference_digest"]
        elif ref_spec is not None:
            digest = content_digest(ref_spec)
        else:  # an in-memory model: its parameters (the initial policy: before any update)
            digest = content_digest(src if reference is not None else (model, tokenizer))
    meta["reference_digest"] = digest
    scoring = ScoringConfig(beta=config.beta, reference=ref_spec, prompt_format=config.prompt_format)
    training = {"trainer": "freeprm train", "loss": config.loss, "data_sha256": data_digest(data),
                "policy": _portable_spec(policy), "train_config": config.to_dict()}
    return meta_dict(scoring, reference_digest=digest, training=training)

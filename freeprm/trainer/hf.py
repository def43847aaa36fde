"""freeprm's implicit-PRM losses and reference log-prob cache inside Hugging Face ``transformers.Trainer``.

For runs that outgrow one device: ``transformers.Trainer`` (through ``accelerate``) brings DDP, FSDP and
DeepSpeed; freeprm brings the losses over response rewards (``losses.REGISTRY``: CE, DPO, NCA, KTO) and the
reference log-probs, computed once and cached (``ref_cache.ReferenceCache``), so no reference model is
held during training::

    from freeprm.trainer.hf import ImplicitPRMTrainer, prm_dataset
    with args.main_process_first():                  # rank 0 fills the reference cache, the others read it
        ds = prm_dataset(model, tokenizer, "train.jsonl", loss="ce", cache_dir="refcache")
    trainer = ImplicitPRMTrainer(model=model, args=args, train_dataset=ds, loss="ce", beta=0.05)
    trainer.train()                                  # accelerate launch / torchrun: one process per device

What ``compute_loss`` computes for a batch (plain torch)::

    lp = log_softmax(model(input_ids).logits[:, :-1], -1).gather(...)   # [B, T] at the response tokens
    r = beta * ((lp - ref_logps) * target_mask).sum(-1)                 # [B]   (ref_logps from the cache)
    loss = REGISTRY[loss].fn(LossInputs(r, ...))                        # CE / DPO / NCA / KTO

Log-probs: with a model that is not wrapped (one process), freeprm's chunked LM head
(``engine.sequence_logprobs``: no ``[tokens x vocab]`` logits); under a distributed wrapper (DDP, FSDP,
DeepSpeed) the wrapped model's own forward (full logits), because the wrapper must see the forward to
synchronise gradients or gather shards. ``logprobs="full" | "chunked"`` forces one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer

from ..config import DEFAULT_TRAIN_BETA
from ..engine import sequence_logprobs
from ..engine.batching import pad_id_of
from ..engine.logprobs import full_logits_logprobs
from . import losses
from .data import TrainItem, as_labeled, build_items, collate, load_examples, pair_labeled
from .ref_cache import ReferenceCache

LOGPROBS = ("auto", "chunked", "full")


class PRMDataset(torch.utils.data.Dataset):
    """Tokenized ``TrainItem``s with their cached reference log-probs (None when reference-free)."""

    def __init__(self, items: Sequence[TrainItem], ref_logps: Sequence[tuple[torch.Tensor, ...]] | None = None):
        if ref_logps is not None and len(ref_logps) != len(items):
            raise ValueError(f"ref_logps has {len(ref_logps)} entries for {len(items)} items")
        self.items, self.ref_logps = list(items), None if ref_logps is None else list(ref_logps)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"item": self.items[i], "ref": None if self.ref_logps is None else self.ref_logps[i]}


def prm_dataset(model, tokenizer, data, *, loss: str = "ce", reference=None, reference_free: bool = False,
                cache_dir: str | os.PathLike = "refcache", max_length: int = 1024, prompt_format: str = "auto",
                seed: int = 0, max_batch_tokens: int = 4096) -> PRMDataset:
    """Read and tokenize ``data`` (a JSONL path or ``Labeled`` / ``Pair`` examples) for ``loss``, with the
    reference log-probs from the cache under ``cache_dir`` (misses computed with ``reference``, a model, or
    with ``model`` itself, the initial policy, when None; call this before any update). Under several
    processes wrap it in ``TrainingArguments.main_process_first()`` so one process computes the misses."""
    spec = losses.get_loss(loss)
    if isinstance(data, (str, os.PathLike)):
        examples = load_examples(data, loss, seed=seed)
    else:
        examples = list(data)
        examples = pair_labeled(examples, seed=seed) if spec.pairs and not hasattr(examples[0], "chosen") \
            else (examples if spec.pairs else as_labeled(examples))
    items, _ = build_items(tokenizer, examples, loss, max_length=max_length, prompt_format=prompt_format, seed=seed)
    if reference_free:
        return PRMDataset(items)
    ref_model = reference if reference is not None else model
    cache = ReferenceCache.for_model(Path(cache_dir), ref_model, tokenizer)
    seqs = [s for it in items for s in it.seqs]
    flat = cache.get(seqs, ref_model, pad_id=pad_id_of(tokenizer), max_batch_tokens=max_batch_tokens)
    refs, k = [], 0
    for it in items:
        refs.append(tuple(flat[k:k + len(it.seqs)]))
        k += len(it.seqs)
    return PRMDataset(items, refs)


@dataclass
class PRMCollator:
    """``PRMDataset`` rows -> one right-padded batch: first sequences (the chosen ones for pairs), then the
    second ones (rejected, or KTO's mismatched), with labels and prompt groups."""

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict:
        items = [r["item"] for r in rows]
        n_seqs = len(items[0].seqs)
        seqs = [it.seqs[k] for k in range(n_seqs) for it in items]
        refs = None if rows[0]["ref"] is None else [r["ref"][k] for k in range(n_seqs) for r in rows]
        b = collate(seqs, self.pad_id, refs)
        out = {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "target_mask": b.target_mask,
               "labels": torch.tensor([it.label for it in items], dtype=torch.float32),
               "groups": torch.tensor([it.group for it in items], dtype=torch.long)}
        if b.ref_logps is not None:
            out["ref_logps"] = b.ref_logps
        return out


class ImplicitPRMTrainer(Trainer):
    """``transformers.Trainer`` whose loss is freeprm's implicit-PRM loss (see the module docstring).

    loss: a name of ``losses.REGISTRY``; beta: reward scale; ce_balance, kto_desirable_weight,
    kto_undesirable_weight: as in ``TrainConfig``; logprobs: ``"auto" | "chunked" | "full"``. The data
    collator defaults to ``PRMCollator`` (give ``train_dataset`` a ``PRMDataset``); columns are kept.
    Dataset-wise CE balance uses each batch's positive fraction (the whole data set's is not known here).
    reference: the reference's spec (a path, alias or hub id; ``"none"`` when reference-free), e.g. the policy
    spec the model was loaded from: every saved model then carries ``freeprm_prm.json`` (beta, this reference
    and its content digest, the loss; ``freeprm.prm_meta``), so ``Scorer(dir)`` scores it as trained. Without
    it, saved directories are plain models (give beta and reference when scoring them).
    """

    def __init__(self, *args, loss: str = "ce", beta: float = DEFAULT_TRAIN_BETA, ce_balance: str = "none",
                 kto_desirable_weight: float = 1.0, kto_undesirable_weight: float = 1.0, logprobs: str = "auto",
                 reference: str | os.PathLike | None = None, prompt_format: str = "auto", **kwargs):
        if not (isinstance(beta, (int, float)) and beta > 0):
            raise ValueError(f"beta must be > 0, got {beta!r}")
        if logprobs not in LOGPROBS:
            raise ValueError(f"logprobs must be one of {LOGPROBS}, got {logprobs!r}")
        if ce_balance not in losses.CE_BALANCE:
            raise ValueError(f"ce_balance must be one of {losses.CE_BALANCE}, got {ce_balance!r}")
        self.prm_loss, self.spec = loss, losses.get_loss(loss)
        self.beta, self.ce_balance, self.logprobs = float(beta), ce_balance, logprobs
        self.kto_desirable_weight, self.kto_undesirable_weight = kto_desirable_weight, kto_undesirable_weight
        tok = kwargs.get("processing_class") or kwargs.get("tokenizer")
        if kwargs.get("data_collator") is None:
            if tok is None:
                raise ValueError("pass processing_class=tokenizer (for the padding id) or your own data_collator")
            kwargs["data_collator"] = PRMCollator(pad_id_of(tok))
        self.prm_meta = None if reference is None else _meta(loss, beta, reference, prompt_format)
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False  # the collator reads "item" / "ref"
        self.model_accepts_loss_kwargs = False  # the loss is a per-micro-batch mean: Trainer divides it by the GA steps

    def _token_logprobs(self, model, input_ids, attention_mask, target_mask) -> torch.Tensor:
        wrapped = self.accelerator.unwrap_model(model) is not model
        if self.logprobs == "full" or (self.logprobs == "auto" and wrapped):
            return full_logits_logprobs(model, input_ids, attention_mask, target_mask)
        return sequence_logprobs(self.accelerator.unwrap_model(model), input_ids, attention_mask, target_mask)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        ids, am, tm = inputs["input_ids"], inputs["attention_mask"], inputs["target_mask"].bool()
        ref = inputs.get("ref_logps")
        labels, groups = inputs["labels"], inputs["groups"]
        n = labels.shape[0]
        if self.spec.needs_mismatched:  # KTO: the mismatched sequences' rewards only set z0, without grad
            with torch.no_grad():
                lp_m = self._token_logprobs(model, ids[n:], am[n:], tm[n:])
            mismatched = losses.response_rewards(lp_m, None if ref is None else ref[n:], tm[n:], self.beta)
            ids, am, tm, ref = ids[:n], am[:n], tm[:n], None if ref is None else ref[:n]
        lp = self._token_logprobs(model, ids, am, tm)  # [B or 2B, T]
        r = losses.response_rewards(lp, ref, tm, self.beta)
        if self.spec.pairs:
            x = losses.LossInputs(r[:n], rejected=r[n:])
        else:
            x = losses.LossInputs(r, labels=labels, groups=groups)
            if self.spec.needs_mismatched:
                x.mismatched = mismatched
        loss = self.spec.fn(x, self)
        return (loss, {"rewards": r.detach()}) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.prm_meta is not None and self.args.should_save:
            from ..prm_meta import write_meta

            write_meta(output_dir if output_dir is not None else self.args.output_dir,
                       {**self.prm_meta, "training": {**self.prm_meta["training"], "steps": self.state.global_step}})


def _meta(loss: str, beta: float, reference, prompt_format: str) -> dict:
    """``freeprm_prm.json`` of the saved models (``freeprm.prm_meta.meta_dict``), the digest taken now."""
    from ..config import ScoringConfig, is_no_reference
    from ..prm_meta import content_digest, meta_dict

    ref = str(reference)
    if not is_no_reference(ref) and Path(ref).expanduser().exists():
        ref = str(Path(ref).expanduser().resolve())
    digest = None if is_no_reference(ref) else content_digest(ref)
    scoring = ScoringConfig(beta=beta, reference=ref, prompt_format=prompt_format)
    return meta_dict(scoring, reference_digest=digest, training={"trainer": "transformers.Trainer", "loss": loss})

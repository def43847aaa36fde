"""The optimization loop: ``Trainer`` over tokenized items with cached reference log-probs.

AdamW, the schedule of ``schedule.py``, gradient accumulation, gradient-norm clipping, optional
gradient checkpointing and bf16 autocast on CUDA; the loss from ``losses.REGISTRY``; policy
log-probs from ``freeprm.engine.sequence_logprobs`` (LM head only at response tokens); one metrics
row per optimizer step; checkpoints through ``checkpoint.py``.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine import sequence_logprobs
from ..engine.batching import pad_id_of
from ..io import dumps_line, mark_nonfinite
from . import checkpoint, losses
from .config import TrainConfig
from .data import TrainItem, collate
from .schedule import make_scheduler


def freeze_all_but_last_layers(model: torch.nn.Module, n: int) -> int:
    """Leave only the last ``n`` decoder layers and the final norm trainable; returns the trainable parameter count.

    Embeddings and the LM head are frozen. Backward then stops below the first trainable layer.
    """
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"train_last_layers needs a decoder with base.layers (a ModuleList); {type(model).__name__} "
                         "has none: train every parameter (train_last_layers=None)")
    if n > len(layers):
        raise ValueError(f"train_last_layers={n} but the model has {len(layers)} layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - n:]:
        layer.requires_grad_(True)
    if getattr(base, "norm", None) is not None:
        base.norm.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class StepMetrics:
    loss: float = 0.0
    correct: list = field(default_factory=list)  # rewards of correct / chosen responses
    incorrect: list = field(default_factory=list)
    pair_wins: int = 0
    pairs: int = 0
    tokens: int = 0
    z0: list = field(default_factory=list)


class Trainer:
    """The optimization loop over tokenized items; ``train()`` below builds one from specs.

    model: a causal LM (trained in place); items: ``TrainItem`` list; ref_logps: per item a
    tuple of fp32 ``[n_response]`` tensors aligned with ``item.seqs`` (None when reference-free).
    meta: extra ``trainer_state.json`` fields; prm_meta: the ``freeprm_prm.json`` written beside every saved
    model (``freeprm.prm_meta.meta_dict``; its ``training.steps`` is set at each save).
    """

    def __init__(self, model, tokenizer, items: Sequence[TrainItem], config: TrainConfig, *,
                 ref_logps: Sequence[tuple[torch.Tensor, ...]] | None = None, out_dir: str | os.PathLike | None = None,
                 meta: dict | None = None, prm_meta: dict | None = None):
        config.validate()
        if not items:
            raise ValueError("no training items")
        if ref_logps is None and not config.reference_free:
            raise ValueError("ref_logps is required unless config.reference_free=True")
        if ref_logps is not None and len(ref_logps) != len(items):
            raise ValueError(f"ref_logps has {len(ref_logps)} entries for {len(items)} items")
        self.model, self.tokenizer, self.items, self.config = model, tokenizer, list(items), config
        self.ref = None if config.reference_free else list(ref_logps)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.meta = dict(meta or {})
        self.prm_meta = prm_meta  # freeprm_prm.json of every saved model (freeprm.prm_meta.meta_dict), or None
        self.device = next(model.parameters()).device
        self.pad_id = pad_id_of(tokenizer)
        if config.train_last_layers is not None:
            freeze_all_but_last_layers(model, config.train_last_layers)
        if config.grad_checkpointing:  # recompute each layer's activations in backward
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        use_bf16 = config.bf16 == "true" or (config.bf16 == "auto" and self.device.type == "cuda"
                                             and torch.cuda.is_bf16_supported())
        if use_bf16 and self.device.type != "cuda":
            raise ValueError("bf16=true needs a CUDA device; on CPU use bf16='false' (or 'auto')")
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
        self.loss = losses.get_loss(config.loss)
        labels = [it.label for it in self.items]
        self.positive_fraction = None
        if self.loss.balanced and config.ce_balance == "dataset":
            p = sum(1 for y in labels if y == 1) / len(labels)
            self.positive_fraction = p if 0 < p < 1 else None
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                                           weight_decay=config.weight_decay)
        self.global_batch = config.batch_size * config.grad_accum
        self.steps_per_epoch = math.ceil(len(self.items) / self.global_batch)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        warmup = config.warmup_steps or int(config.warmup_ratio * self.total_steps)
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, warmup, config.schedule, config.min_lr_ratio)
        self.step, self.epoch, self.pos = 0, 0, 0
        self._order_epoch, self._order = -1, None
        random.seed(config.seed)
        torch.manual_seed(config.seed)

    # ------------------------------------------------------------------------------------ data
    def epoch_order(self, epoch: int) -> list[int]:
        """The seeded item order of ``epoch``; prompts stay together under instruction-wise balance."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        if self.loss.balanced and self.config.ce_balance == "instruction":
            by_group: dict[int, list[int]] = {}
            for i in torch.randperm(len(self.items), generator=g).tolist():
                by_group.setdefault(self.items[i].group, []).append(i)
            groups = list(by_group)
            return [i for k in torch.randperm(len(groups), generator=g).tolist() for i in by_group[groups[k]]]
        return torch.randperm(len(self.items), generator=g).tolist()

    def _next_indices(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
        idx = self._order[self.pos:self.pos + self.global_batch]
        self.pos += len(idx)
        if self.pos >= len(self._order):
            self.epoch, self.pos = self.epoch + 1, 0
        return idx

    # --------------------------------------------------------------------------------- forward
    def rewards(self, seqs, refs) -> tuple[torch.Tensor, int]:
        """Response rewards ``[len(seqs)]`` (differentiable) and the number of response tokens."""
        batch = collate(seqs, self.pad_id, refs, device=self.device)
        with self.autocast():
            lp = sequence_logprobs(self.model, batch.input_ids, batch.attention_mask, batch.target_mask,
                                   impl=self.config.impl)  # [B, T] fp32
        r = losses.response_rewards(lp, batch.ref_logps, batch.target_mask, self.config.beta)  # [B]
        return r, int(batch.target_mask.sum())

    def _refs(self, idx: Sequence[int], k: int):
        return None if self.ref is None else [self.ref[i][k] for i in idx]

    def micro_loss(self, idx: Sequence[int], m: StepMetrics) -> torch.Tensor:
        """Loss of one micro-batch of items (mean over its items); updates ``m``.

        The registered loss (``losses.REGISTRY[config.loss]``) says what to feed it: the chosen
        and rejected rewards of pairs (one forward over both), or labeled rewards with prompt
        groups, plus, when it needs them, the no-grad rewards of the mismatched sequences.
        """
        items, spec = [self.items[i] for i in idx], self.loss
        if spec.pairs:
            seqs = [it.seqs[0] for it in items] + [it.seqs[1] for it in items]
            refs = None if self.ref is None else self._refs(idx, 0) + self._refs(idx, 1)
            r, m_tok = self.rewards(seqs, refs)
            x = losses.LossInputs(r[:len(items)], rejected=r[len(items):])
        else:
            r, m_tok = self.rewards([it.seqs[0] for it in items], self._refs(idx, 0))
            x = losses.LossInputs(r, labels=torch.tensor([it.label for it in items], dtype=torch.float32, device=r.device),
                                  groups=torch.tensor([it.group for it in items], device=r.device),
                                  positive_fraction=self.positive_fraction)
            if spec.needs_mismatched:  # (prompt, another prompt's response): no grad
                with torch.no_grad():
                    x.mismatched, _ = self.rewards([it.seqs[1] for it in items], self._refs(idx, 1))
        loss = spec.fn(x, self.config)
        if x.rejected is not None:
            m.correct += x.rewards.detach().tolist()
            m.incorrect += x.rejected.detach().tolist()
            m.pair_wins += int((x.rewards > x.rejected).sum())
            m.pairs += len(items)
        else:
            if x.mismatched is not None:
                m.z0.append(float(losses.kto_ref_point(x.mismatched)))
            for rv, yv in zip(r.detach().tolist(), x.labels.tolist()):
                (m.correct if yv >= 0.5 else m.incorrect).append(rv)
        m.tokens += m_tok
        return loss

    def train_step(self) -> dict:
        """One optimizer step over the next global batch; returns its metrics row."""
        t0 = time.perf_counter()
        self.model.train()
        idx = self._next_indices()
        m = StepMetrics()
        for a in range(0, len(idx), self.config.batch_size):
            mb = idx[a:a + self.config.batch_size]
            loss = self.micro_loss(mb, m)
            (loss * (len(mb) / len(idx))).backward()
            m.loss += float(loss.detach()) * len(mb) / len(idx)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.config.max_grad_norm > 0:
            gn = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        else:
            gn = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return self._row(m, gn, lr, len(idx), time.perf_counter() - t0)

    def _row(self, m: StepMetrics, grad_norm: float, lr: float, n: int, secs: float) -> dict:
        mean = (lambda v: sum(v) / len(v) if v else None)
        signs = [r > 0 for r in m.correct] + [r <= 0 for r in m.incorrect]
        rc, ri = mean(m.correct), mean(m.incorrect)
        row = {"step": self.step, "epoch": round(self.epoch + self.pos / len(self.items), 4), "lr": lr,
               "loss": m.loss, "grad_norm": grad_norm, "reward_correct": rc, "reward_incorrect": ri,
               "margin": None if rc is None or ri is None else rc - ri,
               "accuracy": sum(signs) / len(signs), "items": n, "tokens": m.tokens,
               "seconds": round(secs, 4), "tokens_per_s": round(m.tokens / secs, 1) if secs > 0 else None}
        if m.pairs:
            row["pair_accuracy"] = m.pair_wins / m.pairs
        if m.z0:
            row["kto_z0"] = mean(m.z0)
        return row

    def train(self, until_step: int | None = None) -> list[dict]:
        """Run optimizer steps up to ``until_step`` (default: the end); returns the metrics rows."""
        end = min(until_step or self.total_steps, self.total_steps)
        rows, bar = [], None
        if self.config.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"train {self.config.loss}", unit="step")
        # standard JSON (freeprm.io): a NaN/Inf value is written as null and named in the row's "nonfinite"
        log = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") if self.out_dir is not None else None
        try:
            while self.step < end:
                row = self.train_step()
                rows.append(row)
                if log is not None and (self.step % self.config.log_every == 0 or self.step == end):
                    log.write(dumps_line(mark_nonfinite(row)))
                    log.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.2f}")
                if (self.out_dir is not None and self.config.save_every and self.step % self.config.save_every == 0
                        and self.step < self.total_steps):
                    self.save_checkpoint(self.out_dir / f"checkpoint-{self.step}")
                    self._prune_checkpoints()
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()
        return rows

    # ----------------------------------------------------------------------------- checkpoints
    def save_model(self, path: str | os.PathLike) -> None:
        """The policy as a Hugging Face directory (safetensors + tokenizer) that ``load_model`` loads."""
        checkpoint.save_model(self.model, self.tokenizer, path, self._prm_meta())

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Model + tokenizer + ``trainer_state.json`` + ``optimizer.pt``, written to a temp dir then renamed."""
        state = {"step": self.step, "epoch": self.epoch, "pos": self.pos, "total_steps": self.total_steps,
                 "n_items": len(self.items), "config": self.config.to_dict(), **self.meta}
        checkpoint.save_checkpoint(path, self.model, self.tokenizer, state, self.optimizer, self.scheduler,
                                   self._prm_meta())

    def _prm_meta(self) -> dict | None:
        if self.prm_meta is None:
            return None
        return {**self.prm_meta, "training": {**self.prm_meta["training"], "steps": self.step}}

    def _prune_checkpoints(self) -> None:
        checkpoint.prune_checkpoints(self.out_dir, self.config.keep_checkpoints)

    def load_state(self, path: str | os.PathLike) -> None:
        """Restore optimizer, scheduler, RNG and data position from a checkpoint (weights: load them first)."""
        state = checkpoint.read_state(path)
        if state["n_items"] != len(self.items):
            raise ValueError(f"the checkpoint was trained on {state['n_items']} items, this data has {len(self.items)}; "
                             "resume with the same data")
        blob = checkpoint.load_optimizer_state(path, self.device)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        checkpoint.set_rng_state(blob["rng"])
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.total_steps = state["total_steps"]

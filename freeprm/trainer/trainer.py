"""Train an implicit PRM: an ORM on response-level labels with ``r = beta * log(pi_theta / pi_ref)``.

``train(policy, data, out, config=TrainConfig(...))`` is the whole run: load the policy, read
and tokenize the data (``data.py``), fetch the reference log-probs from the cache
(``ref_cache.py``; the reference defaults to the initial policy, as in the paper, and is then
computed by the policy itself before its first update), then optimize:

* AdamW, linear warmup then cosine / linear / constant schedule, gradient accumulation,
  gradient-norm clipping, optional gradient checkpointing, bf16 autocast on CUDA, seeds;
* policy log-probs from ``freeprm.engine.sequence_logprobs`` (LM head only at response tokens,
  never ``[tokens x vocab]`` logits), reference log-probs from the cache: no reference forward;
* one JSON line of metrics per optimizer step in ``<out>/metrics.jsonl`` and a tqdm bar;
* checkpoints ``<out>/checkpoint-<step>/`` (``save_pretrained`` safetensors + tokenizer +
  trainer state) and the final model in ``<out>/final/``, each loadable by ``load_model``.

Resume (``resume="auto"`` or a checkpoint path) restores weights, optimizer, scheduler, RNG
states and the data position (epoch + offset into that epoch's seeded permutation), so N steps,
save, resume, N more steps give the same weights as 2N uninterrupted steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..engine import load_model, sequence_logprobs
from ..engine.loading import cache_dir
from . import losses
from .data import Labeled, Pair, TrainItem, build_items, collate, load_examples
from .ref_cache import ReferenceCache

SCHEDULES = ("cosine", "linear", "constant")
STATE_FORMAT = "freeprm-trainer-1"
# config fields that may differ on resume (they do not change the optimization)
_RESUME_FREE = {"save_every", "keep_checkpoints", "log_every", "progress", "ref_cache_dir", "ref_batch_tokens"}


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in each checkpoint)."""

    loss: str = "ce"  # ce | dpo | nca | kto
    beta: float = 0.05  # reward scale: r = beta * log(pi / pi_ref)
    reference_free: bool = False  # pi_ref uniform: r = beta * log pi
    ce_balance: str = "none"  # none | dataset | instruction
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 0  # linear warmup; if 0, warmup_ratio * total steps
    warmup_ratio: float = 0.0
    schedule: str = "cosine"  # after warmup: cosine | linear | constant, down to min_lr_ratio * lr
    min_lr_ratio: float = 0.0
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 4  # items (responses, or pairs) per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0 = no clipping
    grad_checkpointing: bool = False
    train_last_layers: int | None = None  # train only the last N decoder layers + final norm (None = every parameter)
    bf16: str = "auto"  # auto (bf16 autocast on CUDA when supported) | true | false
    seed: int = 0
    max_length: int = 1024  # tokens per prompt + response (the response tail is cut)
    prompt_format: str = "auto"
    impl: str = "auto"  # sequence_logprobs implementation
    save_every: int = 0  # optimizer steps between checkpoints (0 = only the final model)
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True
    ref_cache_dir: str | None = None  # default: $FREEPRM_CACHE/refcache
    ref_batch_tokens: int = 4096

    def validate(self) -> None:
        if self.loss not in losses.LOSSES:
            raise ValueError(f"loss must be one of {losses.LOSSES}, got {self.loss!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.ce_balance not in losses.CE_BALANCE:
            raise ValueError(f"ce_balance must be one of {losses.CE_BALANCE}, got {self.ce_balance!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.bf16 not in ("auto", "true", "false"):
            raise ValueError(f"bf16 must be auto, true or false, got {self.bf16!r}")
        for name in ("batch_size", "grad_accum", "epochs", "max_length", "keep_checkpoints", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_last_layers is not None and self.train_last_layers < 1:
            raise ValueError(f"train_last_layers must be >= 1 or None, got {self.train_last_layers}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("lr must be > 0, weight_decay and max_grad_norm >= 0")
        if not 0 <= self.warmup_ratio < 1 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup_ratio must lie in [0, 1), warmup_steps >= 0, min_lr_ratio in [0, 1]")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "adam_betas" in kw:
            kw["adam_betas"] = tuple(kw["adam_betas"])
        return cls(**kw)


def lr_lambda(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1 - frac
    return min_ratio + (1 - min_ratio) * decay


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


def _rng_state() -> dict:
    s = random.getstate()
    st = {"python": [s[0], list(s[1]), s[2]], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


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
    """

    def __init__(self, model, tokenizer, items: Sequence[TrainItem], config: TrainConfig, *,
                 ref_logps: Sequence[tuple[torch.Tensor, ...]] | None = None, out_dir: str | os.PathLike | None = None,
                 meta: dict | None = None):
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
        self.device = next(model.parameters()).device
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
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
        labels = [it.label for it in self.items]
        self.positive_fraction = None
        if config.loss == "ce" and config.ce_balance == "dataset":
            p = sum(1 for y in labels if y == 1) / len(labels)
            self.positive_fraction = p if 0 < p < 1 else None
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.adam_betas), eps=config.adam_eps,
                                           weight_decay=config.weight_decay)
        self.global_batch = config.batch_size * config.grad_accum
        self.steps_per_epoch = math.ceil(len(self.items) / self.global_batch)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        warmup = config.warmup_steps or int(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, self.total_steps, warmup, config.schedule, config.min_lr_ratio))
        self.step, self.epoch, self.pos = 0, 0, 0
        self._order_epoch, self._order = -1, None
        random.seed(config.seed)
        torch.manual_seed(config.seed)

    # ------------------------------------------------------------------------------------ data
    def epoch_order(self, epoch: int) -> list[int]:
        """The seeded item order of ``epoch``; prompts stay together under instruction-wise balance."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        if self.config.loss == "ce" and self.config.ce_balance == "instruction":
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
        """Loss of one micro-batch of items (mean over its items); updates ``m``."""
        cfg, items = self.config, [self.items[i] for i in idx]
        if cfg.loss in losses.PAIR_LOSSES:
            seqs = [it.seqs[0] for it in items] + [it.seqs[1] for it in items]
            refs = None if self.ref is None else self._refs(idx, 0) + self._refs(idx, 1)
            r, m_tok = self.rewards(seqs, refs)
            rc, rr = r[:len(items)], r[len(items):]
            loss = losses.dpo_loss(rc, rr) if cfg.loss == "dpo" else losses.nca_loss(rc, rr)
            m.correct += rc.detach().tolist()
            m.incorrect += rr.detach().tolist()
            m.pair_wins += int((rc > rr).sum())
            m.pairs += len(items)
        else:
            r, m_tok = self.rewards([it.seqs[0] for it in items], self._refs(idx, 0))
            y = torch.tensor([it.label for it in items], dtype=torch.float32, device=r.device)
            if cfg.loss == "ce":
                groups = torch.tensor([it.group for it in items], device=r.device)
                loss = losses.ce_loss(r, y, balance=cfg.ce_balance, groups=groups,
                                      positive_fraction=self.positive_fraction)
            else:  # kto: z0 from mismatched (prompt, other response) pairs, no grad
                with torch.no_grad():
                    r_kl, _ = self.rewards([it.seqs[1] for it in items], self._refs(idx, 1))
                z0 = losses.kto_ref_point(r_kl)
                m.z0.append(float(z0))
                loss = losses.kto_loss(r, y, z0, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
            for rv, yv in zip(r.detach().tolist(), y.tolist()):
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
        log = open(self.out_dir / "metrics.jsonl", "a") if self.out_dir is not None else None
        try:
            while self.step < end:
                row = self.train_step()
                rows.append(row)
                if log is not None and (self.step % self.config.log_every == 0 or self.step == end):
                    log.write(json.dumps(row) + "\n")
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
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Model + tokenizer + ``trainer_state.json`` + ``optimizer.pt``, written to a temp dir then renamed."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        self.save_model(tmp)
        state = {"format": STATE_FORMAT, "step": self.step, "epoch": self.epoch, "pos": self.pos,
                 "total_steps": self.total_steps, "n_items": len(self.items), "config": self.config.to_dict(),
                 **self.meta}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "rng": _rng_state()}, tmp / "optimizer.pt")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)

    def _prune_checkpoints(self) -> None:
        ckpts = sorted(self.out_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[-1]))
        for p in ckpts[:-self.config.keep_checkpoints]:
            shutil.rmtree(p, ignore_errors=True)

    def load_state(self, path: str | os.PathLike) -> None:
        """Restore optimizer, scheduler, RNG and data position from a checkpoint (weights: load them first)."""
        path = Path(path)
        state = read_state(path)
        if state["n_items"] != len(self.items):
            raise ValueError(f"the checkpoint was trained on {state['n_items']} items, this data has {len(self.items)}; "
                             "resume with the same data")
        blob = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        _set_rng_state(blob["rng"])
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.total_steps = state["total_steps"]


def read_state(path: str | os.PathLike) -> dict:
    p = Path(path) / "trainer_state.json"
    if not p.is_file():
        raise ValueError(f"{path} is not a trainer checkpoint (no trainer_state.json)")
    state = json.loads(p.read_text())
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{p} has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
    return state


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    ckpts = [p for p in Path(out).glob("checkpoint-*[0-9]") if (p / "trainer_state.json").is_file()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


def _check_resume_config(saved: dict, config: TrainConfig) -> None:
    now = config.to_dict()
    diff = [k for k in now if k not in _RESUME_FREE and k in saved and saved[k] != now[k]]
    if diff:
        raise ValueError("resume needs the run's own settings; these differ from the checkpoint: "
                         + ", ".join(f"{k}={now[k]!r} (was {saved[k]!r})" for k in diff))


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
    dtype: str = "float32",
    trust_remote_code: bool = False,
    until_step: int | None = None,
) -> TrainResult:
    """Train ``policy`` (a spec for ``load_model`` or a ``(model, tokenizer)`` pair) on ``data``; see the module docstring.

    reference: ``None`` = the initial policy (the paper's setup); a spec or ``(model, tokenizer)``
    otherwise; ignored with ``config.reference_free``. resume: ``"auto"`` (latest checkpoint in
    ``out``, or a fresh start if none) or a checkpoint directory. ``until_step`` stops early and
    saves a checkpoint there (for interrupted runs and tests); the run's schedule is unchanged.
    """
    config = config or TrainConfig()
    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = latest_checkpoint(out) if resume == "auto" else (Path(resume) if resume else None)
    state = None
    if ckpt is not None:
        state = read_state(ckpt)
        _check_resume_config(state["config"], config)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    spec_name = policy if isinstance(policy, (str, os.PathLike)) else type(policy[0]).__name__
    model, tokenizer = load_model(str(ckpt) if ckpt is not None else policy, dtype=dtype, device=device,
                                  trust_remote_code=trust_remote_code)
    if isinstance(policy, tuple) and ckpt is None:
        model.to(device)
    examples = load_examples(data, config.loss, seed=config.seed) if isinstance(data, (str, os.PathLike)) else list(data)
    if not isinstance(data, (str, os.PathLike)):
        if config.loss in losses.PAIR_LOSSES and examples and isinstance(examples[0], Labeled):
            from .data import pair_labeled
            examples = pair_labeled(examples, seed=config.seed)
        elif config.loss not in losses.PAIR_LOSSES:
            from .data import as_labeled
            examples = as_labeled(examples)
    items, n_trunc = build_items(tokenizer, examples, config.loss, max_length=config.max_length,
                                 prompt_format=config.prompt_format, seed=config.seed)
    if n_trunc:
        print(f"freeprm train: {n_trunc} sequences were cut to max_length={config.max_length} tokens")

    ref_logps, cache, meta = None, None, {"policy": str(spec_name)}
    if not config.reference_free:
        seqs = [s for it in items for s in it.seqs]
        root = Path(config.ref_cache_dir) if config.ref_cache_dir else cache_dir() / "refcache"
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
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
        flat = cache.get(seqs, loader, pad_id=pad, max_batch_tokens=config.ref_batch_tokens, impl=config.impl,
                         progress=config.progress)
        ref_logps, k = [], 0
        for it in items:
            ref_logps.append(tuple(flat[k:k + len(it.seqs)]))
            k += len(it.seqs)
        meta.update(ref_model_fp=cache.model_fp, ref_tokenizer_fp=cache.tokenizer_fp, reference=ref_src,
                    ref_cache=str(cache.path))
    trainer = Trainer(model, tokenizer, items, config, ref_logps=ref_logps, out_dir=out, meta=meta)
    if ckpt is not None:
        trainer.load_state(ckpt)
        _truncate_metrics(out / "metrics.jsonl", trainer.step)
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


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows past the checkpoint being resumed (steps that will be redone)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))

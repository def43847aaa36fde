"""``TrainConfig``: everything that defines a training run (stored in each checkpoint), and its checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..config import DEFAULT_TRAIN_BETA, PROMPT_FORMATS, check_beta
from . import losses

SCHEDULES = ("cosine", "linear", "constant")
# config fields that may differ on resume (they do not change the optimization)
RESUME_FREE = {"save_every", "keep_checkpoints", "log_every", "progress", "ref_cache_dir", "ref_batch_tokens"}


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in each checkpoint).

    ``beta``, ``reference_free``, ``prompt_format`` and ``max_length`` are training settings here (``max_length``
    cuts the response tail); the PRM directories a run writes record what scoring needs as a
    ``freeprm.ScoringConfig`` in ``freeprm_prm.json`` (``freeprm.prm_meta``: beta, the reference and its digest,
    the prompt format), so ``Scorer(dir)`` and ``ImplicitPRM.from_pretrained(dir)`` use them. docs/config.md.
    """

    loss: str = "ce"  # ce | dpo | nca | kto
    beta: float = DEFAULT_TRAIN_BETA  # reward scale: r = beta * log(pi / pi_ref) (the paper's 0.05; docs/config.md)
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
        losses.get_loss(self.loss)  # a registered loss
        check_beta(self.beta)
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
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


def check_resume_config(saved: dict, config: TrainConfig) -> None:
    """Raise ``ValueError`` naming every setting that differs from the checkpoint's (``saved``) and matters."""
    now = config.to_dict()
    diff = [k for k in now if k not in RESUME_FREE and k in saved and saved[k] != now[k]]
    if diff:
        raise ValueError("resume needs the run's own settings; these differ from the checkpoint: "
                         + ", ".join(f"{k}={now[k]!r} (was {saved[k]!r})" for k in diff))

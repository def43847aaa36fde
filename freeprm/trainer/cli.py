"""``freeprm train``: train an implicit PRM from outcome labels (see docs/trainer.md)."""

from __future__ import annotations

from ..cliargs import DeprecatedAlias, HelpFormatter, check_device, error, positive_float, positive_int
from ..config import DEFAULT_POLICY, add_scoring_args
from ..io import dumps_line, mark_nonfinite
from .config import SCHEDULES, TrainConfig
from .losses import CE_BALANCE, LOSSES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train an implicit PRM (CE, DPO, KTO, NCA) on response-level labels",
        description="Train r = beta * log(pi/pi_ref) as an outcome reward model; the result scores steps "
                    "(freeprm score --policy OUT/final --reference REF).",
        formatter_class=HelpFormatter)
    d = TrainConfig()
    p.add_argument("--loss", choices=LOSSES, default=d.loss)
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help=f"model to train: HF dir, hub id, .gguf file or '{DEFAULT_POLICY}'")
    add_scoring_args(p, ["reference", "reference_free"], help={
        "reference": "pi_ref, the model subtracted (default: the initial policy; its log-probs are cached); 'none' "
                     "for no reference (log pi_ref = 0, the same as --reference-free); see docs/config.md"})
    p.add_argument("--data", required=True, help="JSONL: {prompt, response, label} or {prompt, chosen, rejected}")
    p.add_argument("--output", "-o", "--out", dest="out", required=True, action=DeprecatedAlias, deprecated=("--out",),
                   help="output directory (metrics.jsonl, checkpoint-*/, final/); --out: deprecated spelling")
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint in --out) or a checkpoint directory")
    add_scoring_args(p, ["beta"], defaults={"beta": d.beta},
                     help={"beta": "reward scale: r = beta * log(pi / pi_ref) (DEFAULT_TRAIN_BETA, the paper's value)"})
    p.add_argument("--ce-balance", choices=CE_BALANCE, default=d.ce_balance)
    p.add_argument("--kto-desirable-weight", type=float, default=d.kto_desirable_weight)
    p.add_argument("--kto-undesirable-weight", type=float, default=d.kto_undesirable_weight)
    p.add_argument("--lr", type=positive_float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--epochs", type=positive_int, default=d.epochs)
    p.add_argument("--max-steps", type=positive_int, default=None)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="items per micro-batch")
    p.add_argument("--grad-accum", type=positive_int, default=d.grad_accum)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--train-last-layers", type=positive_int, default=d.train_last_layers,
                   help="train only the last N decoder layers + final norm (default: every parameter)")
    p.add_argument("--bf16", choices=("auto", "true", "false"), default=d.bf16)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-length", type=positive_int, default=d.max_length)
    add_scoring_args(p, ["prompt_format"], defaults={"prompt_format": d.prompt_format},
                     help={"prompt_format": "auto: chat when the tokenizer has a chat template, else raw (recorded in "
                                            "the trained PRM's freeprm_prm.json)"})
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--ref-cache-dir", default=None)
    p.add_argument("--device", default=None)
    add_scoring_args(p, ["dtype"], help={
        "dtype": "dtype of the trained weights: auto (= float32: the optimizer keeps fp32 weights; --bf16 sets bf16 "
                 "autocast), float32, bfloat16, float16 (default: auto)"})
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from .run import train

    config = TrainConfig(
        loss=args.loss, beta=args.beta, reference_free=bool(args.reference_free), ce_balance=args.ce_balance,
        kto_desirable_weight=args.kto_desirable_weight, kto_undesirable_weight=args.kto_undesirable_weight,
        lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio,
        schedule=args.schedule, min_lr_ratio=args.min_lr_ratio, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
        grad_checkpointing=args.grad_checkpointing, train_last_layers=args.train_last_layers, bf16=args.bf16,
        seed=args.seed, max_length=args.max_length,
        prompt_format=args.prompt_format, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        progress=not args.no_progress, ref_cache_dir=args.ref_cache_dir)
    try:
        check_device(args.device)
        config.validate()
        res = train(args.policy, args.data, args.out, config=config, reference=args.reference, resume=args.resume,
                    device=args.device, dtype=args.dtype or "auto", trust_remote_code=args.trust_remote_code)
    except ValueError as e:  # bad data, settings or model: say what to fix, no traceback
        return error("train", e)
    last = res.metrics[-1] if res.metrics else {}
    print(dumps_line({"final": str(res.final_dir) if res.final_dir else None, "steps": res.steps,
                      "ref_cache": str(res.ref_cache) if res.ref_cache else None,
                      "ref_computed": res.ref_computed, "truncated": res.truncated,
                      "last": mark_nonfinite({k: last.get(k) for k in ("loss", "accuracy", "margin")})}), end="")
    return 0

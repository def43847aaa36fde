"""``freeprm rerank``: stream groups of candidates (JSONL or Parquet) into resumable output parts.

Input rows (one per JSONL line or Parquet row)::

    {"id": ..., "prompt": str, "candidates": [str | {"response": str} | {"steps": [str]}]}
    {"group": ..., "prompt": str, "response": str}     # flat rows: consecutive rows of a group
    {"id": ..., "prompt": str, "steps": [str]}         #   ("group", else "id") form one group

Output: DIR/part-NNNNNN.parquet (or .jsonl with --format jsonl), one row per group: id, line,
num_candidates, best (ties: the lowest index), best_score, aggregation, scores, score_<agg> for
every aggregation, step_rewards, num_tokens, errors, extra (the row's other keys),
candidate_extra; plus DIR/manifest.jsonl, DIR/fingerprint.json and DIR/summary.json. Rerun the
same command after a crash or kill to resume; another configuration on the same DIR is refused.
Bad lines are reported with their line number and skipped; a rejected candidate (empty, too long,
...) is reported, gets null scores and its reason in errors, and the rest of its group is scored
(--strict: either is fatal). Details: docs/batch.md.
"""

from __future__ import annotations


def cmd_rerank(args) -> int:
    from ..scorer_cli import check_scorer_args
    from .rerank import rerank

    try:
        # --engine ray: the device is the workers' business, not the driver's
        config = check_scorer_args(args, device=args.engine == "local")
        summary = rerank(
            args.input, args.output, policy=args.policy, config=config, device=args.device,
            max_batch_tokens=args.max_batch_tokens, format=args.format, input_format=args.input_format,
            rows_per_part=args.rows_per_part, strict=args.strict, progress=not args.no_progress, engine=args.engine,
            workers=args.workers, num_cpus_per_worker=args.num_cpus_per_worker,
            num_gpus_per_worker=args.num_gpus_per_worker, torch_threads=args.torch_threads,
            ray_address=args.ray_address, pattern_timeout=args.pattern_timeout,
            trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
            force_reference=args.force_reference)
    except ValueError as e:
        from ..cliargs import error

        return error("rerank", e)
    return 0 if summary is not None else 1


def register(sub) -> None:
    from ..cliargs import HelpFormatter, positive_float, positive_int
    from ..scorer_cli import add_scorer_args

    p = sub.add_parser("rerank", help="rerank groups of candidates at scale (streaming, resumable, Ray)",
                       description=__doc__, formatter_class=HelpFormatter)
    add_scorer_args(p)
    p.add_argument("--input", "-i", required=True, help="input .jsonl or .parquet")
    p.add_argument("--input-format", default=None, choices=["jsonl", "parquet"],
                   help="default: from the extension (.parquet/.pq = parquet, else jsonl)")
    p.add_argument("--output", "-o", required=True, help="output directory (created; rerun to resume)")
    p.add_argument("--format", default="parquet", choices=["parquet", "jsonl"], help="format of the output parts")
    p.add_argument("--rows-per-part", type=positive_int, default=1000,
                   help="groups per output part; also the unit of work and of memory")
    p.add_argument("--strict", action="store_true", help="a bad line or rejected candidate is fatal (finished parts stay)")
    p.add_argument("--engine", default="local", choices=["local", "ray"])
    p.add_argument("--workers", type=positive_int, default=1, help="--engine ray: actors in the pool (one model copy each)")
    p.add_argument("--num-cpus-per-worker", type=positive_float, default=1.0, help="--engine ray: CPUs per actor (may be < 1)")
    p.add_argument("--num-gpus-per-worker", type=float, default=0.0, help="--engine ray: GPUs per actor (may be < 1)")
    p.add_argument("--torch-threads", type=positive_int, default=None, help="--engine ray: torch threads per actor")
    p.add_argument("--ray-address", default=None,
                   help="--engine ray: cluster address (default: $RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_rerank)

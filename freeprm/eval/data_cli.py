"""``freeprm data`` (on-policy rollouts, step-error rows) and ``freeprm eval steps`` (ProcessBench-style).

    freeprm data rollouts --task arith --levels 1 --limit 200 --k 4 --policy smollm2 --out runs/data
    freeprm train --loss ce --policy smollm2 --data runs/data/rows.jsonl --out runs/ce
    freeprm data steps --task arith --levels 2 --limit 100 --task-seed 7 -o steps_dev.jsonl
    freeprm eval steps --tune steps_dev.jsonl --test steps_test.jsonl --policy runs/ce/final --reference smollm2 --beta 0.05

See docs/eval.md ("On-policy training data", "Step-error evaluation").
"""

from __future__ import annotations

import argparse
import json
import sys

from ..cliargs import DeprecatedAlias, HelpFormatter, error, escapes_arg
from ..config import DEFAULT_POLICY, add_scoring_args
from ..scorer_cli import add_reference_args
from .cli import _add_task, _ints  # noqa: F401  (the task options are bon's own)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _problems(args):
    from .tasks import load_task, load_task_file

    if args.task_file:
        probs = load_task_file(args.task_file, task=args.task)
        return probs[args.offset:][:args.limit] if args.limit is not None else probs[args.offset:]
    return load_task(args.task, limit=args.limit, offset=args.offset, shuffle_seed=args.shuffle_seed,
                     data_dir=args.data_dir, seed=args.task_seed, levels=tuple(args.levels), small=args.small_numbers)


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="make training / evaluation data: on-policy rollouts, step-error rows",
                              description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="data_cmd", metavar="KIND", required=True)

    r = sub.add_parser("rollouts", help="K graded rollouts per problem -> CE rows and DPO pairs (resumable)",
                       formatter_class=HelpFormatter)
    _add_task(r)
    r.add_argument("--task-file", default=None, help="JSONL of {question, gold[, problem_id, task, meta]} problems "
                   "(instead of --task's built-in set; --task then names the grader)")
    r.add_argument("--output", "-o", "--out", dest="out", required=True, action=DeprecatedAlias, deprecated=("--out",),
                   help="output directory: rollouts.jsonl, rows.jsonl, pairs.jsonl, summary.json (rerun to resume; "
                        "--out: deprecated spelling)")
    r.add_argument("--policy", default=DEFAULT_POLICY,
                   help=f"the policy that samples (HF dir, .gguf, {DEFAULT_POLICY})")
    r.add_argument("--k", type=int, default=4, help="rollouts per problem")
    r.add_argument("--temperature", type=float, default=0.7)
    r.add_argument("--top-p", type=float, default=0.95)
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    r.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto")
    r.add_argument("--dtype", default="float32")
    r.add_argument("--device", default=None)
    r.add_argument("--prompt-template", default=None, help="user prompt with {question} (default: per task)")
    r.add_argument("--prompt-format", choices=("auto", "chat", "raw"), default="auto")
    r.add_argument("--stop", action="append", type=escapes_arg, default=None, help="stop string, repeatable")
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(func=run_rollouts)

    s = sub.add_parser("steps", help="step-error rows (ProcessBench format) from corrupted gold solutions",
                       formatter_class=HelpFormatter)
    _add_task(s)
    s.add_argument("--split", choices=("test", "train"), default="test", help="GSM8K split (task gsm8k)")
    s.add_argument("--corrupt-seed", type=int, default=0)
    s.add_argument("--output", "-o", "--out", dest="out", required=True, action=DeprecatedAlias, deprecated=("--out",),
                   help="output JSONL (--out: deprecated spelling)")
    s.set_defaults(func=run_step_rows)

    e = subparsers.add_parser("eval", help="evaluate a PRM: step-error localisation (ProcessBench format)",
                              description=__doc__, formatter_class=HelpFormatter)
    esub = e.add_subparsers(dest="eval_cmd", metavar="KIND", required=True)
    st = esub.add_parser("steps", help="first-error prediction by a tuned step-reward threshold; F1",
                         formatter_class=HelpFormatter)
    st.add_argument("--tune", required=True, help="rows to tune the threshold on")
    st.add_argument("--test", required=True, help="rows to report on (threshold applied unchanged)")
    st.add_argument("--policy", default=DEFAULT_POLICY)
    add_reference_args(st)
    st.add_argument("--prompt-template", default=None, help="prompt with {question} (default: the problem text)")
    add_scoring_args(st, ["prompt_format", "dtype"])
    st.add_argument("--threads", type=int, default=None)
    st.add_argument("--json", default=None, help="also write the result (with per-row predictions) here")
    st.set_defaults(func=run_eval_steps)


def _threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def run_rollouts(args) -> int:
    from .rollouts import make_rollouts

    _threads(args)
    try:
        from ..cliargs import check_device

        check_device(args.device)
        problems = _problems(args)
        summary = make_rollouts(problems, args.out, k=args.k, model=args.policy, temperature=args.temperature,
                                top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                batch_size=args.batch_size, backend=args.backend, dtype=args.dtype, device=args.device,
                                prompt_template=args.prompt_template, stop=args.stop, prompt_format=args.prompt_format,
                                progress=not args.no_progress)
    except ValueError as e:
        return error("data rollouts", e)
    short = {k: v for k, v in summary.items() if k != "accuracy_per_problem"}
    print(json.dumps(short))
    _log(f"data rollouts: {summary['problems']} problems, rollout accuracy {summary['rollout_accuracy']:.1%}, "
         f"{summary['problems_with_both_labels']:.0%} of problems with both labels; {summary['rows']} rows "
         f"({summary['duplicates_dropped']} duplicates dropped), {summary['pairs']} pairs in {args.out}")
    return 0


def run_step_rows(args) -> int:
    from ..io import write_jsonl_atomic
    from .steps import arith_step_rows, gsm8k_step_rows

    try:
        if args.task == "arith":
            rows = arith_step_rows(_problems(argparse.Namespace(**{**vars(args), "task_file": None})),
                                   seed=args.corrupt_seed)
        elif args.task == "gsm8k":
            from ..gsm8k import read_gsm8k

            recs = read_gsm8k(args.split, limit=None if args.limit is None else args.offset + args.limit)[args.offset:]
            rows = gsm8k_step_rows(recs, seed=args.corrupt_seed, id_prefix=f"gsm8k-{args.split}")
        else:
            raise ValueError("step rows come from tasks with gold step solutions: arith or gsm8k")
        n = write_jsonl_atomic(args.out, rows)
    except ValueError as e:
        return error("data steps", e)
    _log(f"data steps: {n} rows ({sum(r['label'] >= 0 for r in rows)} with an error) -> {args.out}")
    return 0


def run_eval_steps(args) -> int:
    from ..engine import Scorer
    from .steps import evaluate_steps, load_step_rows

    _threads(args)
    try:
        tune, test = load_step_rows(args.tune), load_step_rows(args.test)
        scorer = Scorer(args.policy, args.reference, beta=args.beta, prompt_format=args.prompt_format, dtype=args.dtype,
                        force_reference=args.force_reference)
        res = evaluate_steps(tune, test, scorer, prompt_template=args.prompt_template)
    except ValueError as e:
        return error("eval steps", e)
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    t, c = res["test"], res["chance"]
    print(json.dumps({k: res[k] for k in ("threshold", "tune", "test", "chance")}))
    _log(f"eval steps: threshold {res['threshold']:.4g} (tuned on {args.tune}); on {args.test}: "
         f"erroneous {t['acc_error']:.1%} (n={t['n_error']}), correct {t['acc_correct']:.1%} (n={t['n_correct']}), "
         f"F1 {t['f1']:.3f}; chance F1 {c['f1']:.3f}")
    return 0

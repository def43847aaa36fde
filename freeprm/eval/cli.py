"""``freeprm bon``: best-of-N evaluation in stages (generate, score, report, or all).

    freeprm bon all --task arith --limit 36 --n 8 --out runs/bon_arith
    freeprm bon score --candidates my_candidates.jsonl --out runs/mine --policy path/to/prm
    freeprm bon report --out runs/mine

Files in ``--out``: ``candidates.jsonl`` (or ``--candidates``), ``scores.jsonl``,
``bon_table.md``, ``bon_table.json``, ``bon_plot.png``. Every stage skips work already in its
file, so rerunning a command resumes it. See docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..cliargs import (
    DeprecatedAlias,
    HelpFormatter,
    error,
    escapes_arg,
    positive_float,
    positive_int,
)
from ..config import DEFAULT_POLICY, add_scoring_args
from ..scorer_cli import add_reference_args, aggregations_arg

STAGES = ("generate", "score", "report", "all")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _dtype_arg(text: str) -> str:
    from ..config import dtype_name

    try:
        return dtype_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _scoring_config(args):
    """The ``ScoringConfig`` of the score options (left-out ones not given: a trained PRM fills them)."""
    from ..config import ScoringConfig

    return ScoringConfig.from_args(args)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", "--out", dest="out", required=True, action=DeprecatedAlias, deprecated=("--out",),
                   help="output directory (created; reused on reruns; --out: deprecated spelling)")
    p.add_argument("--candidates", default=None, help="candidates JSONL (default: OUT/candidates.jsonl); "
                   "bring your own in the documented schema")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    add_scoring_args(p, ["prompt_format"], help={
        "prompt_format": "prompt formatting for the generator and the scorer alike: auto (the chat template when the "
                         "tokenizer has one), chat or raw (default: a trained PRM directory's recorded one, else auto)"})


def _add_task(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task")
    g.add_argument("--task", choices=("gsm8k", "math500", "arith"), default="gsm8k")
    g.add_argument("--limit", type=positive_int, default=None, help="number of problems (arith default 40)")
    g.add_argument("--offset", type=int, default=0, help="skip this many problems first")
    g.add_argument("--shuffle-seed", type=int, default=None, help="shuffle the dataset with this seed before taking")
    g.add_argument("--data-dir", default=None, help="folder with gsm8k_test.jsonl / math500.jsonl "
                   "(default: $FREEPRM_DATA or ../shared/data)")
    g.add_argument("--task-seed", type=int, default=0, help="seed of the generated arith problems")
    g.add_argument("--levels", type=_ints, default=[1, 2, 3, 4], help="arith difficulty levels, e.g. 1,2,3")
    g.add_argument("--small-numbers", action="store_true",
                   help="arith: every step adds or subtracts a single-digit number (multi-step, level-1 sized steps)")


def _add_generate(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generate")
    g.add_argument("--generator", default=DEFAULT_POLICY,
                   help=f"model that samples candidates (HF dir, .gguf, {DEFAULT_POLICY})")
    g.add_argument("--n", type=positive_int, default=8, help="candidates per problem")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=positive_float, default=0.95)
    g.add_argument("--max-new-tokens", type=positive_int, default=256)
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--batch-size", type=positive_int, default=16, help="sequences per generate call")
    g.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto")
    g.add_argument("--gen-dtype", default="float32")
    g.add_argument("--device", default=None)
    g.add_argument("--prompt-template", default=None, help="user prompt with {question} (default: per task)")
    g.add_argument("--stop", action="append", type=escapes_arg, default=None,
                   help="stop string, repeatable, backslash escapes allowed (e.g. '\\nQuestion:')")


def _add_score(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("score")
    g.add_argument("--policy", default=DEFAULT_POLICY, help=f"implicit PRM policy (HF dir, .gguf, {DEFAULT_POLICY})")
    add_reference_args(g)
    add_scoring_args(g, ["step_delimiter"])
    g.add_argument("--dtype", "--score-dtype", dest="dtype", type=_dtype_arg, default=None, action=DeprecatedAlias,
                   deprecated=("--score-dtype",), metavar="{auto,float32,bfloat16,float16}",
                   help="scoring model dtype: auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16, float16 "
                        "(default: auto; --score-dtype: deprecated spelling, whose default was float32)")
    g.add_argument("--score-chunk", type=positive_int, default=16, help="candidates per scorer call (one flush each)")


def _add_report(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("report")
    g.add_argument("--aggregate", "--aggregations", dest="aggregations", type=aggregations_arg, default=["min"],
                   action=DeprecatedAlias, deprecated=("--aggregations",),
                   help="aggregations to select by, comma-separated, from min, last, mean, sum, q_min, q_last, q_mean, "
                        "q_sum (default: min; --aggregations: deprecated spelling)")
    g.add_argument("--weights", type=_csv, default=["raw", "sigmoid", "softmax"], help="weighted-vote weightings")
    g.add_argument("--methods", type=_csv, default=None, help="explicit method list (overrides the two above), "
                   "e.g. random,majority,bon:min,wmv:min:sigmoid,pass@N")
    g.add_argument("--ns", type=_ints, default=None, help="N values (default 1,2,4,...,Nmax)")
    g.add_argument("--n-subsets", type=positive_int, default=100, help="random N-subsets per problem")
    g.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples for the CIs")
    g.add_argument("--report-seed", type=int, default=0)
    g.add_argument("--no-scores", action="store_true", help="report without PRM methods (skip scores)")
    g.add_argument("--title", default=None)


def register(subparsers) -> None:
    p = subparsers.add_parser("bon", help="best-of-N evaluation: generate, score, report",
                              description=__doc__, formatter_class=HelpFormatter)
    stages = p.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage in STAGES:
        sp = stages.add_parser(stage, help={"generate": "sample N candidates per problem",
                                            "score": "score candidates with the implicit PRM",
                                            "report": "table + plot", "all": "generate, score, report"}[stage],
                               formatter_class=HelpFormatter)
        _add_common(sp)
        if stage in ("generate", "all"):
            _add_task(sp)
            _add_generate(sp)
        if stage in ("score", "all"):
            _add_score(sp)
        if stage in ("report", "all"):
            _add_report(sp)
        sp.set_defaults(func=run, stage=stage)


def _candidates_path(args) -> Path:
    return Path(args.candidates) if args.candidates else Path(args.out) / "candidates.jsonl"


def _load_candidates(path: Path, where: dict | None = None) -> list[dict]:
    """The latest record of each candidate; ``where`` (if given) gets ``key -> "PATH:LINE"`` of each."""
    from .candidates import key_of, read_jsonl_lines, validate_record

    recs = read_jsonl_lines(path)
    if not recs:
        raise ValueError(f"no candidates in {path}; run `freeprm bon generate` or pass --candidates")
    latest: dict = {}  # key -> (line, record): the last record of each key, in first-seen order
    for line, r in recs:
        if "problem_id" not in r or "candidate_id" not in r:
            validate_record(r, f"{path}:{line}: ")  # raises, naming what is missing
        try:
            latest[key_of(r)] = (line, r)
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{line}: candidate_id must be an integer, got {r['candidate_id']!r}") from None
    out = [validate_record(r, f"{path}:{line}: ") for line, r in latest.values()]
    if where is not None:
        where.update({k: f"{path}:{line}" for k, (line, _) in latest.items()})
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stage_generate(args) -> None:
    from .candidates import generate_candidates
    from .tasks import load_task

    problems = load_task(args.task, limit=args.limit, offset=args.offset, shuffle_seed=args.shuffle_seed,
                         data_dir=args.data_dir, seed=args.task_seed, levels=tuple(args.levels),
                         small=args.small_numbers)
    st = generate_candidates(problems, _candidates_path(args), model=args.generator, n=args.n,
                             temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                             seed=args.seed, batch_size=args.batch_size, backend=args.backend, dtype=args.gen_dtype,
                             device=args.device, prompt_template=args.prompt_template, stop=args.stop,
                             prompt_format=args.prompt_format or "auto", progress=not args.no_progress)
    _log(f"generate: {st['generated']} new, {st['reused']} reused, {st['new_tokens']} tokens in "
         f"{st['seconds']:.0f} s ({st['tokens_per_s']:.1f} tokens/s)")


def stage_score(args) -> None:
    from .scoring import score_candidates

    where: dict = {}
    cands = _load_candidates(_candidates_path(args), where)
    st = score_candidates(cands, Path(args.out) / "scores.jsonl", policy=args.policy, config=_scoring_config(args),
                          chunk_size=args.score_chunk, progress=not args.no_progress, where=where,
                          force_reference=args.force_reference)
    _log(f"score: {st['scored']} scored, {st['reused']} reused, {st['empty']} empty responses "
         f"({st['seconds']:.0f} s)")


def stage_report(args) -> dict:
    from .report import build_problems, build_table, write_report
    from .scoring import load_scores, resolved_config_tag
    from .selection import default_methods, parse_method

    cands = _load_candidates(_candidates_path(args))
    if args.methods:
        methods = args.methods
        aggs = sorted({parse_method(m)[1] for m in methods if parse_method(m)[1]})
    elif args.no_scores:
        methods, aggs = default_methods(scored=False), []
    else:
        aggs = args.aggregations
        methods = default_methods(aggs, args.weights)
    scores = None
    meta = {"candidates_file": str(_candidates_path(args))}
    if aggs:
        tag = None  # `bon all`: only the lines of this run's scorer config
        if args.stage == "all":
            tag = resolved_config_tag(args.policy, _scoring_config(args), force_reference=args.force_reference)[0]
        scores = load_scores(Path(args.out) / "scores.jsonl", tag)
        tags = {s["scorer"] for s in scores.values()}
        if len(tags) > 1:
            raise ValueError(f"scores.jsonl mixes scorer configs {sorted(tags)}; report one (use `bon all` with "
                             "the scorer options, or a fresh --out)")
        meta["scorer"] = next(iter(tags), None)
    gens = {json.dumps({k: v for k, v in c["gen"].items() if k != "new_tokens"}, sort_keys=True)
            for c in cands if c.get("gen")}
    if len(gens) == 1:
        meta["generation"] = json.loads(gens.pop())
    new_tokens = [c["gen"]["new_tokens"] for c in cands if c.get("gen", {}).get("new_tokens") is not None]
    if new_tokens:
        meta["mean_new_tokens"] = round(sum(new_tokens) / len(new_tokens), 1)
    problems = build_problems(cands, scores, aggs)
    table = build_table(problems, methods, args.ns, n_subsets=args.n_subsets, n_bootstrap=args.bootstrap,
                        seed=args.report_seed, meta=meta)
    table["meta"]["argv"] = " ".join(shlex.quote(a) for a in sys.argv[1:])
    paths = write_report(table, args.out, title=args.title)
    _log(f"report: {paths['md']}, {paths['json']}, {paths['png']}")
    from .report import table_markdown

    print(table_markdown(table, args.title))
    return table


def run(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        from ..cliargs import check_device
        from ..io import check_output_dir

        check_device(getattr(args, "device", None))
        check_output_dir(args.out)  # a file, /dev/null, a FIFO as --out: refused before any work
        if args.stage in ("generate", "all"):
            stage_generate(args)
        if args.stage in ("score", "all"):
            stage_score(args)
        if args.stage in ("report", "all"):
            stage_report(args)
    except ValueError as e:
        return error(f"bon {args.stage}", e)
    return 0

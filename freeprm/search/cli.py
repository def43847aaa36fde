"""``freeprm search``: PRM-guided step-level search (best-of-N, beam, DVTS) over a task or a JSONL of prompts.

Input: ``--task gsm8k|math500|arith`` (graded: each row gets ``correct`` per candidate and ``best_correct``), or
``--input prompts.jsonl`` with rows ``{"id": ..., "prompt": "...", ...}`` (``id`` optional; other keys are passed
through in ``extra``; ``gold`` with ``task`` is graded). Output: a directory of JSONL parts, one row per prompt
(the final candidates with their step rewards, the pick, a per-step trace), a manifest and a fingerprint, written
atomically: rerun the same command after a crash or ``kill -9`` to resume; another configuration on the same
directory is refused. Details: docs/search.md.
"""

from __future__ import annotations


def cmd_search(args) -> int:
    from ..scorer_cli import check_scorer_args
    from .algorithms import SearchConfig
    from .run import read_prompts, run_search, task_prompts

    try:
        scoring = check_scorer_args(args)
        if scoring.step_pattern is not None:
            raise ValueError("--step-pattern is not supported by search: steps end at --step-delimiter while they "
                             "are generated")
        if (args.task is None) == (args.input is None):
            raise ValueError("give exactly one of --task or --input")
        config = SearchConfig(method=args.method, n=args.n, beam_width=args.beam_width, max_steps=args.max_steps,
                              step_delimiter=scoring.step_delimiter or "", aggregate=scoring.aggregate,
                              max_step_tokens=args.max_step_tokens, max_tokens=args.max_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
        if args.task is not None:
            rows, bad = task_prompts(args.task, limit=args.limit, offset=args.offset, seed=args.task_seed,
                                     data_dir=args.data_dir), 0
            source = {"task": args.task, "limit": args.limit, "offset": args.offset, "task_seed": args.task_seed}
        else:
            rows, bad = read_prompts(args.input)
            source = {"input": "jsonl"}
        run_search(rows, args.output, config=config, policy=args.policy, reference=scoring.reference,
                   generator=args.generator, backend=args.backend, prompts_per_part=args.prompts_per_part,
                   source=source, progress=not args.no_progress, bad_lines=bad, beta=args.beta,
                   prompt_format=args.prompt_format, dtype=args.dtype, max_length=args.max_length,
                   force_reference=args.force_reference, device=args.device,
                   max_batch_tokens=args.max_batch_tokens, trust_remote_code=args.trust_remote_code,
                   allow_pickle=args.allow_pickle)
    except ValueError as e:
        from ..cliargs import error

        return error("search", e)
    return 0


def register(sub) -> None:
    from ..cliargs import HelpFormatter, escapes_arg, positive_float, positive_int
    from ..eval.tasks import TASK_NAMES
    from ..scorer_cli import add_scorer_args
    from .algorithms import METHODS

    p = sub.add_parser("search", help="PRM-guided step-level search: best-of-N, beam search, DVTS (resumable)",
                       description=__doc__, formatter_class=HelpFormatter)
    add_scorer_args(p)
    p.add_argument("--task", default=None, choices=TASK_NAMES, help="search the problems of a task (graded)")
    p.add_argument("--limit", type=positive_int, default=None, help="--task: number of problems (arith: default 40)")
    p.add_argument("--offset", type=int, default=0, help="--task: skip this many problems first")
    p.add_argument("--task-seed", type=int, default=0, help="--task arith: the generator seed of the problems")
    p.add_argument("--data-dir", default=None, help="--task gsm8k/math500: folder of the data files")
    p.add_argument("--input", "-i", default=None, help="JSONL of prompts ({\"id\", \"prompt\", ...} per line)")
    p.add_argument("--output", "-o", required=True, help="output directory (created; rerun to resume)")
    p.add_argument("--method", default="beam", choices=METHODS)
    p.add_argument("--n", type=positive_int, default=8, help="candidates per prompt (best-of-N's N, the beam size)")
    p.add_argument("--beam-width", type=positive_int, default=4, help="children per kept candidate (beam, dvts)")
    p.add_argument("--max-steps", type=positive_int, default=10, help="step budget per candidate")
    p.add_argument("--max-step-tokens", type=positive_int, default=128, help="sampled tokens per step at most")
    p.add_argument("--max-tokens", type=positive_int, default=1024, help="response tokens per candidate at most")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=positive_float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], type=escapes_arg,
                   help="a string that finishes a candidate after the step that contains it (repeatable), "
                        "e.g. 'The answer is'")
    p.add_argument("--generator", default=None, help="model that writes the steps (default: the --policy model); "
                   "it must share the policy's tokenizer")
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm"],
                   help="step generation backend (vllm: GPU, prefix caching)")
    p.add_argument("--prompts-per-part", type=positive_int, default=16,
                   help="prompts per output part: searched together (one batch) and the unit of resume")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_search)

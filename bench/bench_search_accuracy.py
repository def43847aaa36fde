"""Accuracy of step-level search vs best-of-N on generated arithmetic, with 95% CIs over problems.

    flock /work/heavy.lock nice -n 5 python bench/bench_search_accuracy.py       # 24 problems, n=4, level 1
    python bench/bench_search_accuracy.py --problems 2 --n 2 --max-steps 2 --methods best_of_n,beam   # quick check

SmolLM2-135M-Instruct writes the steps (its own KV cache is the PRM policy's) and is the PRM: the untrained,
reference-free implicit PRM (``r_t = log pi(y_t)``, beta 1). Every method gets the same problems (``arith``,
``--levels``, the task's one-shot step-format prompt), ``n`` candidates per problem, the same step budget, the
same sampling settings and seed, and ``stop=("The answer is",)`` (a candidate is done after the step that gives
its answer). Reported per method: accuracy of the pick (graded like ``freeprm bon``), pass@n of its final
candidates, tokens generated per problem (so the budgets can be compared: best-of-N, beam and DVTS with the same
``n`` generate ``n`` step continuations per step while candidates are live), with 95% percentile-bootstrap CIs
over problems, and each method's paired accuracy difference to best-of-N. Results:
``bench/results/search_accuracy_arith.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import env_info  # noqa: E402


def boot_ci(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap CI of the mean over problems."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    return means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--levels", default="1")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--beam-width", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--max-step-tokens", type=int, default=40)
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--aggregate", default="min")
    ap.add_argument("--methods", default="best_of_n,beam,dvts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from freeprm.engine import Scorer
    from freeprm.eval.grading import grade
    from freeprm.eval.tasks import make_arith
    from freeprm.search import SearchConfig, build_searcher

    levels = tuple(int(x) for x in args.levels.split(","))
    probs = make_arith(args.problems, seed=0, levels=levels)
    scorer = Scorer("smollm2", dtype="float32", device="cpu")
    per_method = {}
    for method in args.methods.split(","):
        cfg = SearchConfig(method=method, n=args.n, beam_width=args.beam_width, max_steps=args.max_steps,
                           max_step_tokens=args.max_step_tokens, max_tokens=args.max_steps * args.max_step_tokens,
                           temperature=args.temperature, top_p=0.95, seed=args.seed, aggregate=args.aggregate,
                           stop=("The answer is",))
        searcher = build_searcher(scorer=scorer, config=cfg)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = searcher.run([p.prompt() for p in probs])
        secs = time.perf_counter() - t0
        acc, oracle, toks = [], [], []
        for p, r in zip(probs, res):
            ok = [grade(c["text"], p.gold, p.grader_task)[1] for c in r.candidates]
            acc.append(float(r.best is not None and ok[r.best]))
            oracle.append(float(any(ok)))
            toks.append(float(r.generated_tokens))
        per_method[method] = {"acc": acc, "oracle": oracle, "tokens": toks, "seconds": secs}
        print(f"{method}: accuracy {statistics.mean(acc):.3f}, pass@n {statistics.mean(oracle):.3f}, "
              f"tokens/problem {statistics.mean(toks):.0f}, {secs:.0f} s", flush=True)
    rows = []
    base = per_method.get("best_of_n")
    for method, m in per_method.items():
        row = {"method": method, "accuracy": statistics.mean(m["acc"]), "accuracy_ci": boot_ci(m["acc"]),
               "pass_at_n": statistics.mean(m["oracle"]), "pass_at_n_ci": boot_ci(m["oracle"]),
               "tokens_per_problem": statistics.mean(m["tokens"]), "tokens_ci": boot_ci(m["tokens"]),
               "seconds": m["seconds"]}
        if base is not None and method != "best_of_n":
            d = [a - b for a, b in zip(m["acc"], base["acc"])]
            row["diff_vs_best_of_n"], row["diff_ci"] = statistics.mean(d), boot_ci(d)
        rows.append(row)
    env = env_info(args.threads)
    setup = {k: getattr(args, k) for k in ("problems", "levels", "n", "beam_width", "max_steps", "max_step_tokens",
                                           "temperature", "aggregate", "seed")}
    setup["prm"] = "SmolLM2-135M-Instruct, reference-free, beta 1 (untrained)"
    setup["generator"] = "SmolLM2-135M-Instruct (shares the PRM policy's KV cache)"
    out = {"env": env, "setup": setup, "results": rows}
    stem = Path(args.out) / "search_accuracy_arith"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))

    def pct(x):
        return f"{100 * x:.1f}"

    md = [f"# Step-level search vs best-of-N: generated arithmetic (level {args.levels}), {args.problems} problems",
          "", f"{env['date']}, git {env['git_sha']}, {env['device']}, torch {env['torch']}, {args.threads} threads. "
          f"Generator and PRM: SmolLM2-135M-Instruct (untrained reference-free implicit PRM, beta 1); n={args.n}, "
          f"beam width {args.beam_width}, {args.max_steps} steps of at most {args.max_step_tokens} tokens, "
          f"temperature {args.temperature}, top-p 0.95, ranking by {args.aggregate} step reward, stop after "
          "'The answer is'. 95% percentile bootstrap CIs over problems (2000 resamples).", "",
          "| method | accuracy % | pass@n % | tokens / problem | diff vs best-of-N (points) | seconds |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        diff = (f"{100 * r['diff_vs_best_of_n']:+.1f} [{100 * r['diff_ci'][0]:+.1f}, {100 * r['diff_ci'][1]:+.1f}]"
                if "diff_vs_best_of_n" in r else "")
        md.append(f"| {r['method']} | {pct(r['accuracy'])} [{pct(r['accuracy_ci'][0])}, {pct(r['accuracy_ci'][1])}] "
                  f"| {pct(r['pass_at_n'])} [{pct(r['pass_at_n_ci'][0])}, {pct(r['pass_at_n_ci'][1])}] "
                  f"| {r['tokens_per_problem']:.0f} [{r['tokens_ci'][0]:.0f}, {r['tokens_ci'][1]:.0f}] | {diff} "
                  f"| {r['seconds']:.0f} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

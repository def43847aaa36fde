"""Accuracy of step-level search (beam, DVTS) vs best-of-N at an equal number of generated tokens, 95% CIs.

    X=/work/runs/claim_onpolicy/data/rollouts.jsonl       # the trained PRM's training prompts: skipped
    nice -n 5 python bench/bench_search_accuracy.py --task arith --problems 30 --exclude $X --threads 1
    nice -n 5 python bench/bench_search_accuracy.py --task gsm8k --problems 8 --data-dir /work/shared/data
    python bench/bench_search_accuracy.py --quick --out /tmp/sa                              # tiny random models

SmolLM2-135M-Instruct writes every step (``--generator``). Two PRMs rank the partial solutions:

* ``untrained``: the generator itself read as a reference-free implicit PRM (``r_t = log pi(y_t)``, beta 1); the
  generator's KV cache is the PRM policy's;
* ``trained`` (``--trained-prm PATH``, ``none`` to skip): a trained implicit PRM directory; its
  ``freeprm_prm.json`` gives beta and the reference (the search then runs generator, PRM policy and reference
  separately; they must share one tokenizer).

Per task part (``--part-size`` problems searched together, with the same sampling seed for every method):

1. **best-of-N pool**: ``--pool`` independent candidates per problem (the best-of-N search method, which prunes
   nothing, so its candidates do not depend on the PRM), scored by the untrained PRM during the search and
   re-scored by the trained PRM afterwards (``Scorer.score_prepared`` on the same token ids and step map).
2. **beam** and **DVTS** with ``--n`` / ``--beam-width``, once per PRM.

**Equal generated tokens.** Generated tokens are every token sampled for a problem, by all candidates, kept or
pruned. A best-of-N of ``k`` candidates drawn at random from the pool of ``N`` picks the pool's best-scored
candidate among them; its expected accuracy is exact (no sampling): candidate ``i``, ranked ``r`` (0 = best)
among the pool, is the pick with probability ``C(N-1-r, k-1) / C(N, k)``; it costs ``k * t`` tokens, ``t`` the
pool's mean tokens per candidate. A search method that generates ``T`` tokens per problem (mean over problems) is
compared with best-of-N at ``k* = T / t`` candidates (one ``k*`` for all problems, as a fixed budget would be): a
mix of ``floor(k*)`` and ``ceil(k*)`` candidates, weighted so that its expected tokens are exactly ``T``. When
``k* > N`` best-of-N gets only ``N`` (marked: it then spends fewer tokens than the search).

Reported: accuracy of each pick, pass@ (any correct final candidate), tokens per problem, 95% percentile-bootstrap
CIs over problems (2000 resamples, problems resampled jointly so differences are paired), each search's paired
difference to token-matched best-of-N and to best-of-N with the same ``n``. Results under ``--out/<task>/``:
``parts/`` (one JSONL file per PRM, method and part: a killed run redoes at most one part per method), ``plan.json``
(a rerun with other settings is refused), ``report.json``, ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import env_info  # noqa: E402

DEFAULT_TRAINED = "/work/runs/claim_onpolicy/ce/final"
PLAN_KEYS = ("task", "problems", "levels", "small", "task_seed", "n", "beam_width", "pool", "max_steps",
             "max_step_tokens", "max_tokens", "temperature", "top_p", "aggregate", "seed", "part_size", "generator",
             "trained_prm", "methods", "exclude")
TASK_DEFAULTS = {  # what a task runs with unless given
    "arith": dict(max_steps=4, max_step_tokens=40, max_tokens=160),
    "gsm8k": dict(max_steps=6, max_step_tokens=48, max_tokens=288),
}


# ---------------------------------------------------------------------- statistics
def boot_ci(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap CI of the mean over problems."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    return means[int(0.025 * reps)], means[int(0.975 * reps) - 1]


def rank_order(scores: list[float | None]) -> list[int]:
    """Pool indices best first, as ``freeprm.search.algorithms.pick_best`` ranks them (higher score first, ties to the lower
    index, NaN below every number); candidates without a score (None) are left out: they are never picked."""
    ok = [i for i, s in enumerate(scores) if s is not None]
    return sorted(ok, key=lambda i: (scores[i] == scores[i], scores[i] if scores[i] == scores[i] else 0.0, -i),
                  reverse=True)


def bon_expected(scores: list[float | None], correct: list[bool], k: int) -> float:
    """Expected accuracy of best-of-k over the uniformly random k-subsets of a pool (exact).

    The candidate ranked ``r`` (0 = best) is picked iff it is in the subset and none of the ``r`` ranked above it
    is: probability ``C(N - 1 - r, k - 1) / C(N, k)``. A subset of unscored candidates picks nothing (wrong).
    """
    n = len(scores)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    total = math.comb(n, k)
    return sum(math.comb(n - 1 - r, k - 1) for r, i in enumerate(rank_order(scores)) if correct[i]) / total


def pass_at(correct: list[bool], k: int) -> float:
    """Probability that a random k-subset holds a correct candidate (exact)."""
    n, c = len(correct), sum(correct)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def matched(per_k: dict[int, list[float]], k_star: float, pool: int) -> tuple[list[float], float, bool]:
    """Per-problem best-of-N accuracy at a fractional budget ``k_star`` (a mix of floor and ceil, linear in k);
    returns (values, the k used, whether it was capped at the pool size)."""
    capped = k_star > pool
    k = min(max(k_star, 1.0), float(pool))
    lo = int(math.floor(k))
    hi = min(lo + 1, pool)
    w = k - lo
    vals = [(1 - w) * a + w * b for a, b in zip(per_k[lo], per_k[hi])] if w else list(per_k[lo])
    return vals, k, capped


# ---------------------------------------------------------------------- running
def load_problems(args) -> tuple[list, int]:
    """The task's first ``--problems`` problems whose prompt is not in ``--exclude`` (e.g. a trained PRM's training
    rollouts: the small arith question space repeats); returns (problems, how many were dropped)."""
    from freeprm.eval.tasks import load_gsm8k, make_arith
    from freeprm.io import load_jsonl

    seen = set()
    if args.exclude:
        seen = {r["prompt"] for _, r in load_jsonl(args.exclude, on_error="raise") if "prompt" in r}
    if args.task == "arith":
        levels = tuple(int(x) for x in args.levels.split(","))
        pool = make_arith(3 * args.problems + 10, seed=args.task_seed, levels=levels, small=args.small)
    else:
        pool = load_gsm8k("test", shuffle_seed=args.task_seed, data_dir=args.data_dir)
    out, dropped = [], 0
    for p in pool:
        if len(out) == args.problems:
            break
        if p.prompt() in seen:
            dropped += 1
        else:
            out.append(p)
    return out, dropped


def part_file(out: Path, prm: str, method: str, part: int) -> Path:
    return out / "parts" / f"{prm}_{method}_{part:03d}.jsonl"


def write_rows(path: Path, rows: list[dict]) -> None:
    """Atomic: a kill leaves the part absent or whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def graded(problem, cands: list[dict], keep_ids: bool) -> list[dict]:
    from freeprm.eval.grading import grade

    out = []
    for c in cands:
        ans, ok = grade(c["text"], problem.gold, problem.grader_task)
        row = {"text": c["text"], "step_rewards": c["step_rewards"], "score": c["score"], "status": c["status"],
               "num_tokens": c["num_tokens"], "answer": ans, "correct": bool(ok)}
        if keep_ids:
            row.update(token_ids=c["token_ids"], step_ends=c["step_ends"])
        out.append(row)
    return out


def run_parts(args, out: Path, probs: list, prms: dict) -> None:
    from freeprm.search import SearchConfig, build_searcher
    from freeprm.search.incremental import Candidate, IncrementalScorer

    def config(method: str, n: int) -> SearchConfig:
        return SearchConfig(method=method, n=n, beam_width=1 if method == "best_of_n" else args.beam_width,
                            max_steps=args.max_steps, max_step_tokens=args.max_step_tokens, max_tokens=args.max_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed, aggregate=args.aggregate,
                            stop=("The answer is",))

    untrained = prms["untrained"]
    searchers = {}

    def searcher(prm: str, method: str):
        if (prm, method) not in searchers:
            n = args.pool if method == "best_of_n" else args.n
            gen = None if prm == "untrained" else (untrained.policy, untrained.tokenizer)
            searchers[prm, method] = build_searcher(scorer=prms[prm], config=config(method, n), generator=gen)
        return searchers[prm, method]

    parts = [probs[i:i + args.part_size] for i in range(0, len(probs), args.part_size)]
    methods = [m for m in args.methods.split(",") if m != "best_of_n"]
    for k, chunk in enumerate(parts):
        prompts = [p.prompt() for p in chunk]
        seed = args.seed * 1_000_003 + k  # the same for every method and PRM of this part
        jobs = [("untrained", "best_of_n")] + [(prm, "best_of_n") for prm in prms if prm != "untrained"]
        jobs += [(prm, m) for prm in prms for m in methods]
        for prm, method in jobs:
            path = part_file(out, prm, method, k)
            if path.exists():
                continue
            t0 = time.perf_counter()
            if method == "best_of_n" and prm != "untrained":  # re-score the pool with this PRM
                pool = read_rows(part_file(out, "untrained", "best_of_n", k))
                inc = IncrementalScorer(prms[prm])
                items, where = [], []
                for pi, row in enumerate(pool):
                    pids = inc.prompt_ids(prompts[pi])
                    for ci, c in enumerate(row["candidates"]):
                        if c["step_ends"]:
                            cand = Candidate(pi, pids, list(c["token_ids"]), list(c["step_ends"]),
                                             step_rewards=[0.0] * len(c["step_ends"]))  # sets the step count
                            items.append(inc.prepared(cand))
                            where.append((pi, ci))
                res = prms[prm].score_prepared(items, aggregate=args.aggregate) if items else []
                rows = [dict(r, candidates=[dict(c, step_rewards=[], score=None) for c in r["candidates"]])
                        for r in pool]
                for (pi, ci), sr in zip(where, res):
                    c = rows[pi]["candidates"][ci]
                    c["step_rewards"], c["score"] = sr.step_rewards.tolist(), float(sr.score)
                for r in rows:
                    r["best"] = rank_order([c["score"] for c in r["candidates"]])[:1]
                    r["best"] = r["best"][0] if r["best"] else None
                    r["seconds"] = (time.perf_counter() - t0) / len(rows)
                    r["rescored"] = True
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = searcher(prm, method).run(prompts, seed=seed)
                secs = time.perf_counter() - t0
                rows = []
                for p, r in zip(chunk, res):
                    cands = graded(p, r.candidates, keep_ids=method == "best_of_n")
                    rows.append({"problem_id": p.problem_id, "gold": p.gold, "level": p.meta.get("level"),
                                 "best": r.best, "generated_tokens": r.generated_tokens,
                                 "scored_tokens": r.scored_tokens, "steps": r.steps, "candidates": cands,
                                 "seconds": secs / len(chunk)})
            write_rows(path, rows)
            toks = sum(r["generated_tokens"] for r in rows)
            ok = sum(r["best"] is not None and r["candidates"][r["best"]]["correct"] for r in rows)
            print(f"part {k + 1}/{len(parts)} {prm:9s} {method:9s}: {ok}/{len(rows)} picks correct, "
                  f"{toks / len(rows):.0f} tokens/problem, {time.perf_counter() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------- report
def collect(out: Path, prm: str, method: str) -> list[dict]:
    rows, k = [], 0
    while part_file(out, prm, method, k).exists():
        rows += read_rows(part_file(out, prm, method, k))
        k += 1
    return rows


def summarize(args, out: Path, prm_names: list[str]) -> dict:
    """Everything the report shows, from the parts on disk (only problems every method and PRM has finished)."""
    methods = [m for m in args.methods.split(",") if m != "best_of_n"]
    data = {(prm, m): collect(out, prm, m) for prm in prm_names for m in ["best_of_n"] + methods}
    n_done = min(len(v) for v in data.values())
    if n_done == 0:
        return {"problems": 0}
    data = {key: v[:n_done] for key, v in data.items()}
    pool = args.pool
    t_cand = [r["generated_tokens"] / pool for r in data["untrained", "best_of_n"]]  # per problem
    t_mean = statistics.mean(t_cand)
    res = {"problems": n_done, "pool": pool, "pool_tokens_per_candidate": t_mean,
           "pool_pass_at": {k: statistics.mean(pass_at([c["correct"] for c in r["candidates"]], k)
                                               for r in data["untrained", "best_of_n"])
                            for k in range(1, pool + 1)},
           "pool_candidate_accuracy": statistics.mean(
               c["correct"] for r in data["untrained", "best_of_n"] for c in r["candidates"]),
           "prms": {}}
    for prm in prm_names:
        rows = data[prm, "best_of_n"]
        per_k = {k: [bon_expected([c["score"] for c in r["candidates"]], [c["correct"] for c in r["candidates"]], k)
                     for r in rows] for k in range(1, pool + 1)}
        curve = [{"k": k, "tokens": k * t_mean, "accuracy": statistics.mean(v), "accuracy_ci": boot_ci(v)}
                 for k, v in per_k.items()]
        entry = {"best_of_n": curve, "search": []}
        for m in methods:
            rs = data[prm, m]
            acc = [float(r["best"] is not None and r["candidates"][r["best"]]["correct"]) for r in rs]
            pas = [float(any(c["correct"] for c in r["candidates"])) for r in rs]
            toks = [float(r["generated_tokens"]) for r in rs]
            t_search = statistics.mean(toks)
            bon_m, k_used, capped = matched(per_k, t_search / t_mean, pool)
            bon_same = per_k[min(args.n, pool)]
            d_m = [a - b for a, b in zip(acc, bon_m)]
            d_s = [a - b for a, b in zip(acc, bon_same)]
            entry["search"].append({
                "method": m, "accuracy": statistics.mean(acc), "accuracy_ci": boot_ci(acc),
                "pass_final": statistics.mean(pas), "pass_final_ci": boot_ci(pas),
                "tokens_per_problem": t_search, "tokens_ci": boot_ci(toks),
                "seconds_per_problem": statistics.mean(r["seconds"] for r in rs),
                "matched_k": k_used, "matched_capped": capped, "bon_matched_accuracy": statistics.mean(bon_m),
                "bon_matched_ci": boot_ci(bon_m), "diff_vs_matched": statistics.mean(d_m), "diff_vs_matched_ci":
                boot_ci(d_m), "diff_vs_same_n": statistics.mean(d_s), "diff_vs_same_n_ci": boot_ci(d_s),
                "by_level": {str(lv): statistics.mean(a for a, r in zip(acc, rs) if r["level"] == lv)
                             for lv in sorted({r["level"] for r in rs if r["level"] is not None})}})
        res["prms"][prm] = entry
    return res


def reading(d: float, ci: tuple[float, float]) -> str:
    if ci[0] <= 0 <= ci[1]:
        return "inside noise (CI contains 0)"
    return "search better" if d > 0 else "best-of-N better"


def write_report(args, out: Path, summary: dict, prm_desc: dict, env: dict, argv: list[str]) -> dict:
    doc = {"env": env, "command": "python bench/bench_search_accuracy.py " + shlex.join(argv),
           "plan": {k: getattr(args, k) for k in PLAN_KEYS}, "prms": prm_desc, "summary": summary}
    (out / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
    n = summary["problems"]

    def pct(x):
        return f"{100 * x:.1f}"

    def ci(v, c, signed=False):
        f = (lambda x: f"{100 * x:+.1f}") if signed else pct
        return f"{f(v)} [{f(c[0])}, {f(c[1])}]"

    task = {"arith": f"generated arithmetic (levels {args.levels}{', small numbers' if args.small else ''}, "
                     f"task seed {args.task_seed})", "gsm8k": f"GSM8K test (shuffle seed {args.task_seed})"}[args.task]
    md = [f"# Step-level search vs best-of-N at equal generated tokens: {task}", "",
          f"- command: `{doc['command']}`",
          f"- device: {env['device']}, {env['threads']} torch thread(s); torch {env['torch']}, transformers "
          f"{env['transformers']}; git {env['git_sha']}; {env['date']}",
          f"- **{n} problems** (of {args.problems} planned); generator {args.generator}; sampling temperature "
          f"{args.temperature}, top-p {args.top_p}; at most {args.max_steps} steps of {args.max_step_tokens} tokens, "
          f"{args.max_tokens} tokens per candidate; a candidate stops after the step with 'The answer is'; "
          f"partial solutions ranked by the `{args.aggregate}` step reward.",
          f"- search: n={args.n}, beam width {args.beam_width}; best-of-N pool: {args.pool} candidates per problem "
          f"(candidate accuracy {pct(summary['pool_candidate_accuracy'])}%, pass@{args.pool} "
          f"{pct(summary['pool_pass_at'][args.pool])}%), {summary['pool_tokens_per_candidate']:.1f} tokens per candidate.",
          f"- problems skipped because their prompt is in `--exclude` (the trained PRM's training prompts): "
          f"{summary['dropped_excluded']}",
          "- PRMs: " + "; ".join(f"`{k}` = {v}" for k, v in prm_desc.items()),
          "- equal tokens: best-of-N gets k* = (search's tokens per problem) / (tokens per pool candidate) "
          "candidates, a mix of floor(k*) and ceil(k*) with exactly the search's expected tokens; best-of-N's accuracy "
          "is the exact expectation over random k-subsets of the pool. 95% percentile-bootstrap CIs over problems "
          "(2000 resamples); differences are paired per problem.", ""]
    for prm, e in summary["prms"].items():
        md += [f"## PRM `{prm}`", "", "| method | tokens / problem | accuracy % | pass@final % | best-of-N at equal "
               "tokens (k*) % | diff vs equal-token best-of-N (points) | reading | diff vs best-of-N with the same n |",
               "|---|---|---|---|---|---|---|---|"]
        for s in e["search"]:
            kk = f"{s['matched_k']:.2f}{' (capped: pool too small)' if s['matched_capped'] else ''}"
            md.append(f"| {s['method']} | {s['tokens_per_problem']:.0f} | {ci(s['accuracy'], s['accuracy_ci'])} | "
                      f"{ci(s['pass_final'], s['pass_final_ci'])} | {ci(s['bon_matched_accuracy'], s['bon_matched_ci'])} "
                      f"(k*={kk}) | {ci(s['diff_vs_matched'], s['diff_vs_matched_ci'], True)} | "
                      f"{reading(s['diff_vs_matched'], s['diff_vs_matched_ci'])} | "
                      f"{ci(s['diff_vs_same_n'], s['diff_vs_same_n_ci'], True)} |")
        md += ["", "Best-of-N against tokens (the pool's k-subsets):", "",
               "| k | " + " | ".join(str(c["k"]) for c in e["best_of_n"]) + " |",
               "|---|" + "---|" * len(e["best_of_n"]),
               "| tokens / problem | " + " | ".join(f"{c['tokens']:.0f}" for c in e["best_of_n"]) + " |",
               "| accuracy % | " + " | ".join(ci(c["accuracy"], c["accuracy_ci"]) for c in e["best_of_n"]) + " |",
               "| pass@k % | " + " | ".join(pct(summary["pool_pass_at"][c["k"]]) for c in e["best_of_n"]) + " |",
               ""]
        if any(s["by_level"] for s in e["search"]):
            md += ["Search accuracy by level: " + "; ".join(
                f"{s['method']} " + ", ".join(f"level {lv} {pct(a)}%" for lv, a in s["by_level"].items())
                for s in e["search"]), ""]
    floor = summary["pool_pass_at"][args.pool]
    if floor < 0.1:
        md += [f"**At the floor**: pass@{args.pool} of the pool is {pct(floor)}%: the generator almost never writes a "
               "correct solution, so no ranking can show a difference; these rows measure tokens and cost only.", ""]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return doc


# ---------------------------------------------------------------------- main
def build_prms(args, out: Path) -> tuple[dict, dict]:
    from freeprm.engine import Scorer

    gen = args.generator
    prms = {"untrained": Scorer(gen, "none", dtype="float32", device="cpu", beta=1.0)}
    desc = {"untrained": f"{gen} read as a reference-free implicit PRM, beta 1 (no training)"}
    if args.trained_prm != "none":
        sc = Scorer(args.trained_prm, dtype="float32", device="cpu")
        prms["trained"] = sc
        ref = "none" if sc.reference is None else "recorded in its freeprm_prm.json"
        desc["trained"] = f"`{args.trained_prm}`, beta {sc.beta}, reference {ref}"
    return prms, desc


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("arith", "gsm8k"), default="arith")
    ap.add_argument("--problems", type=int, help="problems to search (default 30; --quick: 2)")
    ap.add_argument("--levels", default="1,2", help="arith levels (cycled)")
    ap.add_argument("--small", action=argparse.BooleanOptionalAction, default=True,
                    help="arith: every event a single-digit add/sub (make_arith small=True)")
    ap.add_argument("--task-seed", type=int, default=505)
    ap.add_argument("--n", type=int, default=4, help="beam / DVTS candidates per problem")
    ap.add_argument("--beam-width", type=int, default=2)
    ap.add_argument("--pool", type=int, default=8, help="best-of-N pool per problem (best-of-k for k <= pool)")
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--max-step-tokens", type=int)
    ap.add_argument("--max-tokens", type=int)
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--aggregate", default="min")
    ap.add_argument("--methods", default="beam,dvts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--part-size", type=int, default=5, help="problems searched together (and saved) at a time")
    ap.add_argument("--generator", default="smollm2")
    ap.add_argument("--trained-prm", default=DEFAULT_TRAINED, help="a trained PRM directory, or 'none'")
    ap.add_argument("--exclude", help="JSONL with a 'prompt' per row: problems with one of these prompts are skipped")
    ap.add_argument("--data-dir", help="where gsm8k_test.jsonl is (default: $FREEPRM_DATA, else ../shared/data)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "search_accuracy"))
    ap.add_argument("--report-only", action="store_true", help="write the report from the parts on disk")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny random models, 2 problems")
    args = ap.parse_args(argv)
    for k, v in TASK_DEFAULTS[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    out = Path(args.out) / args.task
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        from freeprm.prm_meta import meta_dict, write_meta
        from freeprm.search.defaults import ScoringConfig
        from freeprm.testing import make_tiny_model_dir

        gen, trained = out / "tiny_generator", out / "tiny_trained"
        if not (gen / "config.json").exists():
            make_tiny_model_dir(gen, seed=0)
        if not (trained / "config.json").exists():
            make_tiny_model_dir(trained, seed=1)
            write_meta(trained, meta_dict(ScoringConfig(beta=0.05, reference=str(gen)), reference_digest=None,
                                          training={"note": "tiny random stand-in for a trained PRM"}))
        args.generator, args.trained_prm = str(gen), str(trained)
        args.problems = 2 if args.problems is None else args.problems
        args.pool, args.n, args.part_size = 4, 2, 1
        args.max_steps, args.max_step_tokens, args.max_tokens = 2, 8, 16
    if args.problems is None:
        args.problems = 30
    torch.set_num_threads(args.threads)
    plan = {k: getattr(args, k) for k in PLAN_KEYS}
    saved = out / "plan.json"
    if saved.exists() and json.loads(saved.read_text()) != plan:
        old = json.loads(saved.read_text())
        diff = sorted(k for k in set(old) | set(plan) if k not in old or k not in plan or old[k] != plan[k])
        # more problems extend a finished run: the problem list is prefix-stable and part k is seeded by k alone,
        # so whole parts stay valid (a last part cut short by the old count would not be: refused)
        grow = diff == ["problems"] and plan["problems"] > old["problems"] and old["problems"] % args.part_size == 0
        if not grow:
            ap.error(f"{saved} holds another plan (differs in {diff}); resume with the same options, raise only "
                     "--problems (from a multiple of --part-size), or use a fresh --out")
    saved.write_text(json.dumps(plan, indent=1) + "\n")
    if args.methods.split(",") and any(m not in ("beam", "dvts", "best_of_n") for m in args.methods.split(",")):
        ap.error("--methods: a comma list of beam, dvts")
    probs, dropped = load_problems(args)
    print(f"{len(probs)} problems ({dropped} dropped: their prompt is in --exclude)", flush=True)
    prms, desc = build_prms(args, out)
    if not args.report_only:
        run_parts(args, out, probs, prms)
    summary = summarize(args, out, list(prms))
    summary["dropped_excluded"] = dropped
    if summary["problems"] == 0:
        print("no finished part yet", flush=True)
        return {"summary": summary}
    doc = write_report(args, out, summary, desc, env_info(args.threads), argv)
    print((out / "report.md").read_text(), flush=True)
    return doc


if __name__ == "__main__":
    main()

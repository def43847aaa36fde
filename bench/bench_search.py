"""PRM cost per search step: incremental scoring (KV caches per candidate) vs re-scoring every candidate's full prefix.

    flock /work/heavy.lock nice -n 5 python bench/bench_search.py     # SmolLM2 pi + pi_ref, 2 prompts x 4, 8 steps
    python bench/bench_search.py --prompts 1 --n 2 --steps 3 --step-tokens 8 --reps 1    # quick check

A search step extends every live candidate by one step of ``--step-tokens`` tokens. After each step ``k = 1 ..
--steps`` the PRM must give each candidate's new step reward. Two ways, timed side by side in one process, on the
same candidates (``--prompts`` prompts x ``--n`` candidates, each candidate its own GSM8K-solution text, cut into
steps of exactly ``--step-tokens`` tokens):

* ``incremental``: ``IncrementalScorer.extend`` runs only the new step's tokens of every candidate on top of its
  pi and pi_ref KV caches (``freeprm/search``);
* ``full``: ``Scorer.score_prepared`` re-scores each candidate's whole prompt + response so far (the engine's best
  full path: batched, the shared prompt run once per prompt): what search-and-learn does with its PRMs each step.

Per step: the median seconds over ``--reps`` repetitions (after a warm-up repetition), the ratio, the tokens each
path runs through the models, and the largest difference between the two paths' step rewards. The models are
SmolLM2-135M-Instruct as pi and a second instance of it, its weights perturbed by 2% noise, as pi_ref (fp32, CPU).
Results: ``bench/results/search_incremental_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import env_info  # noqa: E402


def build(scorer, prompts: int, n: int, steps: int, step_tokens: int):
    """Prompts (GSM8K questions) and per candidate ``steps`` token-id steps of ``step_tokens`` tokens each."""
    from freeprm.gsm8k import read_gsm8k

    tok = scorer.tokenizer
    recs = read_gsm8k("test", limit=400)
    qs = [r["question"] for r in recs[:prompts]]
    need = steps * step_tokens
    cands = []
    pool = [r["answer"].replace("\n", "\n\n") for r in recs[prompts:]]
    j = 0
    for _ in range(prompts * n):
        ids: list[int] = []
        while len(ids) < need:
            ids += tok(pool[j % len(pool)] + "\n\n", add_special_tokens=False)["input_ids"]
            j += 1
        cands.append([ids[k * step_tokens:(k + 1) * step_tokens] for k in range(steps)])
    return qs, cands


def one_rep(inc, qs, cands, n, steps):
    """Times (incremental, full) per step, tokens run per step, max |step reward difference| per step."""
    roots = inc.start(qs)
    live = [c for r in roots for c in inc.fork(r, n)]
    t_inc, t_full, tok_inc, tok_full, err = [], [], [], [], []
    for k in range(steps):
        new = [cands[i][k] for i in range(len(live))]
        t0 = time.perf_counter()
        inc.extend(live, new)
        t_inc.append(time.perf_counter() - t0)
        tok_inc.append(sum(len(x) for x in new))
        t0 = time.perf_counter()
        full = inc.rescore_full(live)
        t_full.append(time.perf_counter() - t0)
        tok_full.append(sum(len(c.prompt_ids) for c in roots) + sum(len(c.response_ids) for c in live))
        err.append(max(abs(a - b) for c, f in zip(live, full) for a, b in zip(c.step_rewards, f)))
    return t_inc, t_full, tok_inc, tok_full, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--n", type=int, default=4, help="candidates per prompt")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--step-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from freeprm.engine import Scorer, load_model
    from freeprm.engine.loading import resolve_spec
    from freeprm.search import IncrementalScorer

    path = resolve_spec("smollm2")
    ref = load_model(path)  # a second instance, perturbed so that rewards are not identically 0
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref[0].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02 * float(p.float().std()))
    scorer = Scorer(path, ref, dtype="float32", device="cpu")
    inc = IncrementalScorer(scorer)
    qs, cands = build(scorer, args.prompts, args.n, args.steps, args.step_tokens)
    one_rep(inc, qs, cands, args.n, min(2, args.steps))  # warm-up
    reps = [one_rep(inc, qs, cands, args.n, args.steps) for _ in range(args.reps)]
    rows = []
    for k in range(args.steps):
        ti = [r[0][k] for r in reps]
        tf = [r[1][k] for r in reps]
        mi, mf = statistics.median(ti), statistics.median(tf)
        rows.append({"step": k + 1, "incremental_s": mi, "incremental_min_max": [min(ti), max(ti)], "full_s": mf,
                     "full_min_max": [min(tf), max(tf)], "ratio_incremental_over_full": mi / mf,
                     "tokens_incremental": reps[0][2][k], "tokens_full": reps[0][3][k],
                     "max_abs_step_reward_diff": max(r[4][k] for r in reps)})
    env = env_info(args.threads)
    setup = {"model": "SmolLM2-135M-Instruct (pi) and a perturbed second instance (pi_ref), fp32",
             "prompts": args.prompts,
             "candidates_per_prompt": args.n, "steps": args.steps, "step_tokens": args.step_tokens, "reps": args.reps,
             "prompt_tokens": [len(inc.prompt_ids(q)) for q in qs],
             "full_path": "Scorer.score_prepared (batched, shared-prompt prefill)"}
    last = rows[-1]
    summary = {"ratio_at_last_step": last["ratio_incremental_over_full"], "speedup_at_last_step":
               last["full_s"] / last["incremental_s"], "target": "incremental <= 1/5 of full at step 8",
               "met": last["ratio_incremental_over_full"] <= 0.2}
    out = {"env": env, "setup": setup, "results": rows, "summary": summary}
    stem = Path(args.out) / "search_incremental_cpu"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    md = [f"# PRM cost per search step: incremental vs full re-scoring ({env['device']})", "",
          f"{env['date']}, git {env['git_sha']}, torch {env['torch']}, transformers {env['transformers']}, "
          f"{args.threads} threads. {setup['model']}; {args.prompts} prompts x {args.n} candidates, steps of "
          f"{args.step_tokens} tokens, prompts of {setup['prompt_tokens']} tokens; median of {args.reps} reps "
          "(min..max) after a warm-up, both paths interleaved in one process.", "",
          "| step | incremental s | full re-scoring s | ratio | tokens incr. / full | max abs diff |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['step']} | {r['incremental_s']:.3f} ({r['incremental_min_max'][0]:.3f}..."
                  f"{r['incremental_min_max'][1]:.3f}) | {r['full_s']:.3f} ({r['full_min_max'][0]:.3f}..."
                  f"{r['full_min_max'][1]:.3f}) | {r['ratio_incremental_over_full']:.3f} | "
                  f"{r['tokens_incremental']} / {r['tokens_full']} | {r['max_abs_step_reward_diff']:.2g} |")
    md += ["", f"At step {args.steps}: incremental = {last['ratio_incremental_over_full']:.3f} x full re-scoring "
               f"({summary['speedup_at_last_step']:.1f}x faster); target <= 0.2: "
               f"{'met' if summary['met'] else 'NOT met'}."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

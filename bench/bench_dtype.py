"""Accuracy of bfloat16 scoring vs float32 (what ``dtype="auto"`` picks on CUDA), measured on the CPU.

    flock /work/heavy.lock python bench/bench_dtype.py            # SmolLM2, 16 GSM8K question + solution items

The same items are scored by two ``Scorer``s, weights and activations in float32 and in bfloat16 (log-probs
and rewards are fp32 in both). Reported: |bf16 - fp32| of token log-probs (max, mean, p99), of step rewards
and of the min-step score, and how often the two agree on the best of each group of 4 responses.
Results: ``bench/results/dtype_bf16_vs_fp32_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import env_info  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    from freeprm.engine import Scorer
    from freeprm.gsm8k import gold_steps, read_gsm8k

    torch.set_num_threads(args.threads)
    recs = read_gsm8k("test", limit=args.items * 2)
    # groups of 4: one question, its own solution and three other questions' solutions
    items = []
    for g in range(args.items // 4):
        q = recs[g]["question"]
        for k in range(4):
            items.append({"prompt": q, "steps": gold_steps(recs[(g + 7 * k) % len(recs)]["answer"])})
    res = {}
    for name in ("float32", "bfloat16"):
        res[name] = Scorer(args.policy, dtype=name, device="cpu").score(items)
    a, b = res["float32"], res["bfloat16"]
    lp_err = torch.cat([(x.token_logprobs - y.token_logprobs).abs() for x, y in zip(a, b)])
    sr_err = torch.cat([(x.step_rewards - y.step_rewards).abs() for x, y in zip(a, b)])
    sc_err = torch.tensor([abs(x.score - y.score) for x, y in zip(a, b)])
    lp_mag = torch.cat([x.token_logprobs.abs() for x in a]).mean()
    agree = sum(max(range(4), key=lambda k: a[4 * g + k].score) == max(range(4), key=lambda k: b[4 * g + k].score)
                for g in range(len(items) // 4))
    summary = {"token_logprob_abs_err": {"max": float(lp_err.max()), "mean": float(lp_err.mean()),
                                         "p99": float(lp_err.quantile(0.99))},
               "mean_abs_token_logprob_fp32": float(lp_mag),
               "step_reward_abs_err": {"max": float(sr_err.max()), "mean": float(sr_err.mean())},
               "score_abs_err": {"max": float(sc_err.max()), "mean": float(sc_err.mean())},
               "best_of_4_agreement": f"{agree}/{len(items) // 4}", "tokens": int(lp_err.numel())}
    env = env_info(args.threads)
    out = {"env": env, "setup": {"policy": args.policy, "items": len(items)}, "summary": summary}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) / "dtype_bf16_vs_fp32_cpu"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    e = summary
    md = ["# bfloat16 vs float32 scoring error (CPU)", "",
          f"- device: {env['device']}, {args.threads} threads; torch {env['torch']}, transformers {env['transformers']}, "
          f"git {env['git_sha']}, {env['date']}",
          f"- model: {args.policy}, {len(items)} GSM8K items ({e['tokens']} response tokens), reference-free, beta=1", "",
          "| quantity | max abs err | mean abs err |", "|---|---|---|",
          f"| token log-prob (mean |log p| {e['mean_abs_token_logprob_fp32']:.2f}) | {e['token_logprob_abs_err']['max']:.3f} | "
          f"{e['token_logprob_abs_err']['mean']:.4f} (p99 {e['token_logprob_abs_err']['p99']:.3f}) |",
          f"| step reward | {e['step_reward_abs_err']['max']:.3f} | {e['step_reward_abs_err']['mean']:.4f} |",
          f"| score (min step) | {e['score_abs_err']['max']:.3f} | {e['score_abs_err']['mean']:.4f} |", "",
          f"- best-of-4 pick agrees: {e['best_of_4_agreement']} groups", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

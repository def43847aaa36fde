"""Varlen packing vs padding: does packing several sequences per row pay on this device?

    flock /work/heavy.lock python bench/bench_packing.py
    python bench/bench_packing.py --scale 0.25 --reps 1        # quick check

One ``Scorer`` (SmolLM2-135M-Instruct, fp32, CPU, ``share_prompt=False``) scores the same items with
``pack=False`` (one padded row per sequence) and ``pack=True`` (first-fit-decreasing rows, block-diagonal
causal 4-D mask, position ids restarting), interleaved rep by rep after a warm-up rep, on workloads whose
lengths leave more or less padding in a length-sorted batch. Reported per workload: the fraction of
padded tokens packing removes, the speedup of packing, and the max difference of token rewards.
This is what sets ``PACK_MIN_SAVING`` (``pack="auto"`` packs a batch only when it saves at least that).
Results: ``bench/results/packing_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_shared_prompt import _cut_to_tokens  # noqa: E402
from bench.common import env_info  # noqa: E402


def workloads(scale: float) -> dict[str, list[int]]:
    rng = random.Random(0)
    s = lambda n: max(4, int(n * scale))  # noqa: E731
    return {
        "skewed (1 long + 15 short)": [s(256)] + [s(32)] * 15,
        "uniform 32..256 (12)": [s(rng.randint(32, 256)) for _ in range(12)],
        "mixed halves 128/256 (8)": [s(256)] * 4 + [s(128)] * 4,
        "near-equal 224..256 (8)": [s(rng.randint(224, 256)) for _ in range(8)],
    }


def build_items(scorer, lengths: list[int]) -> list[dict]:
    """Items of about ``lengths[i]`` tokens (prompt + response) from GSM8K text."""
    from freeprm.engine.tokenization import prompt_ids, response_tokens
    from freeprm.gsm8k import read_gsm8k

    tok = scorer.tokenizer
    recs = read_gsm8k("test", limit=200)
    items = []
    for i, n in enumerate(lengths):
        prompt = recs[i]["question"][:40]
        n_p = len(prompt_ids(tok, prompt, scorer.prompt_format))
        text = "\n\n".join(r["answer"] for r in recs[i:i + 40])
        response = _cut_to_tokens(text, max(1, n - n_p), lambda t: len(response_tokens(tok, t)[0]))
        items.append({"prompt": prompt, "response": response})
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every length")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    from freeprm.engine import Scorer
    from freeprm.engine.batching import pack_rows

    torch.set_num_threads(args.threads)
    scorer = Scorer(args.policy, dtype="float32", device="cpu", share_prompt=False, max_batch_tokens=1 << 20)
    rows = []
    for name, lengths in workloads(args.scale).items():
        prepared = [scorer.prepare(it, i) for i, it in enumerate(build_items(scorer, lengths))]
        real = [len(p.input_ids) for p in prepared]
        t = max(real)
        padded_tokens, packed_tokens = len(real) * t, len(pack_rows(real, t)) * t
        times, outs = {"padded": [], "packed": []}, {}
        for rep in range(args.reps + 1):
            for k in times:
                scorer.pack = k == "packed"
                t0 = time.perf_counter()
                out = scorer.score_prepared(prepared)
                if rep == 0:
                    outs[k] = out
                else:
                    times[k].append(time.perf_counter() - t0)
        err = max(float((a.token_rewards - b.token_rewards).abs().max()) for a, b in zip(outs["padded"], outs["packed"]))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"workload": name, "items": len(real), "real_tokens": sum(real), "padded_tokens": padded_tokens,
               "packed_tokens": packed_tokens, "saving": 1 - packed_tokens / padded_tokens,
               "padded_s": med["padded"], "packed_s": med["packed"], "speedup_packed": med["padded"] / med["packed"],
               "spread_s": {k: [min(v), max(v)] for k, v in times.items()}, "max_abs_diff": err}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    env = env_info(args.threads)
    out = {"env": env, "setup": {"policy": args.policy, "dtype": "float32", "reps": args.reps, "scale": args.scale},
           "results": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) / "packing_cpu"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    md = ["# Varlen packing vs padding (one length-sorted batch per workload), fp32", "",
          f"- device: {env['device']}, {args.threads} threads",
          f"- torch {env['torch']}, transformers {env['transformers']}, git {env['git_sha']}, {env['date']}",
          f"- model: {args.policy}; `Scorer.score_prepared` with `pack` False / True, {args.reps} timed reps interleaved "
          "after a warm-up rep (machine shared: ratios only)", "",
          "| workload | padded tokens | packed tokens | saving | speedup packed/padded | max abs diff |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['workload']} | {r['padded_tokens']} | {r['packed_tokens']} | {100 * r['saving']:.0f}% | "
                  f"{r['speedup_packed']:.2f}x | {r['max_abs_diff']:.1e} |")
    md.append("")
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

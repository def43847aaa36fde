"""CPU generation throughput of the best-of-N / rollout sampler (``TransformersGenerator.sample_many``).

Why the bon_arith run sampled only ~10-12 new tokens/s: every row of a ``generate`` call
re-ran the forward pass over its whole prompt (the one-shot arith prompt is ~150 tokens under
the chat template), although best-of-N sends each prompt N times; the prompt work then rivals
the decode work. ``share_prefill=True`` runs each distinct prompt once and copies its KV cache
to its rows. This script samples the same rows (level-1 arith, the bon_arith settings:
temperature 0.3, top-p 0.95, stop ``\\nQuestion:``) with each variant, interleaved, in one
process, and reports new tokens/s and ratios to the baseline, plus the time of one prefill and
of one decode step to show where the time goes.

    python bench/bench_generate.py --problems 2 --n 8 --max-new-tokens 128 --reps 2 --threads 2

Writes ``bench/results/generate_cpu.{json,md}``.
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
from freeprm.eval.generation import TransformersGenerator  # noqa: E402
from freeprm.eval.tasks import make_arith  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--problems", type=int, default=2)
    ap.add_argument("--n", type=int, default=8, help="rows per problem")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="also time a bfloat16 copy of the model")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generate_cpu"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gens = {"float32": TransformersGenerator(args.model, dtype="float32", device="cpu")}
    if args.bf16:
        gens["bfloat16"] = TransformersGenerator(args.model, dtype="bfloat16", device="cpu")
    probs = make_arith(args.problems, seed=0, levels=(1,))
    prompts = [p.prompt() for p in probs for _ in range(args.n)]
    variants = [("baseline: every row prefills its prompt", "float32", False),
                ("shared prefill (one prompt pass per problem)", "float32", True)]
    if args.bf16:
        variants.append(("shared prefill, bfloat16 weights", "bfloat16", True))
    kw = dict(temperature=0.3, top_p=0.95, max_new_tokens=args.max_new_tokens, stop=["\nQuestion:"])
    runs: dict[str, list[tuple[float, int]]] = {v[0]: [] for v in variants}
    for rep in range(args.reps):
        for name, dt, share in variants:
            t0 = time.perf_counter()
            outs = gens[dt].sample_many(prompts, seed=rep, share_prefill=share, **kw)
            runs[name].append((time.perf_counter() - t0, sum(n for _, n in outs)))
            print(f"rep {rep} {name}: {runs[name][-1][1]} tokens in {runs[name][-1][0]:.1f} s", flush=True)
    # where the time goes: one full-batch prefill vs one per distinct prompt, and one decode step
    g = gens["float32"]
    ids = [g.prompt_ids(p) for p in prompts]
    with torch.inference_mode():
        full = torch.tensor([ids[0]] * len(prompts))
        one = torch.tensor([ids[0]] * args.problems)
        t0 = time.perf_counter()
        out = g.model(input_ids=full, use_cache=True)
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        g.model(input_ids=one, use_cache=True)
        t_one = time.perf_counter() - t0
        pkv, nxt, steps = out.past_key_values, full[:, -1:], []
        for _ in range(5):
            t0 = time.perf_counter()
            o = g.model(input_ids=nxt, cache=pkv, use_cache=True)
            steps.append(time.perf_counter() - t0)
            pkv = o.past_key_values
    base = variants[0][0]
    tps = {name: statistics.median(n / s for s, n in r) for name, r in runs.items()}
    res = {"env": env_info(args.threads), "argv": sys.argv[1:], "rows": len(prompts), "prompt_tokens": len(ids[0]),
           "tokens_per_s": tps, "ratio_to_baseline": {k: v / tps[base] for k, v in tps.items()},
           "runs": runs, "prefill_all_rows_s": t_full, "prefill_distinct_prompts_s": t_one,
           "decode_step_s_median": statistics.median(steps)}
    Path(args.out + ".json").write_text(json.dumps(res, indent=2) + "\n")
    e = res["env"]
    md = [f"# CPU generation throughput ({Path(args.model).name}, {len(prompts)} rows = {args.problems} arith "
          f"problems x {args.n})", "",
          f"- device: {e.get('device')}, {args.threads} threads; torch {e.get('torch')}, transformers "
          f"{e.get('transformers')}; git {e.get('git_sha')}; {e.get('date')}",
          f"- command: `python bench/bench_generate.py {' '.join(sys.argv[1:])}`; one process, variants interleaved, "
          f"{args.reps} reps each (median); shared machine (2 cores, other jobs running): read the ratios, not the times.",
          f"- prompt: {len(ids[0])} tokens (one-shot arith prompt, chat template); temperature 0.3, top-p 0.95, "
          f"<= {args.max_new_tokens} new tokens, stop `\\nQuestion:`", "",
          "| variant | new tokens/s (median) | ratio to baseline |", "|---|---|---|"]
    md += [f"| {k} | {v:.1f} | {v / tps[base]:.2f}x |" for k, v in tps.items()]
    md += ["", f"Where the time goes (float32): prefill of all {len(prompts)} rows {t_full:.2f} s; of the "
           f"{args.problems} distinct prompts {t_one:.2f} s; one decode step of {len(prompts)} rows "
           f"{statistics.median(steps):.3f} s (median of 5).", ""]
    Path(args.out + ".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""Engine benchmark: ``score()`` vs the naive Hugging Face path, same inputs, one run.

    python bench/bench_engine.py                 # SmolLM2-135M-Instruct, 8 x 1024 tokens, fp32, CPU
    python bench/bench_engine.py --batch 2 --seq 256 --reps 2    # quick check

Providers:
  naive      ``model(ids).logits`` -> fp32 ``log_softmax`` -> gather at the response tokens (``[B, T, V]`` logits)
  freeprm    ``Scorer.score()`` end to end: tokenization, steps, base model, LM head at response
             positions only, chunked fp32 logsumexp + gather, step sums, Q values, aggregation
  chunked    a hand-written loop: base model, then per 1024-row chunk full-vocabulary logits,
             ``logsumexp`` and gather (the reference point issue 10 quotes)
  base-only  the base model's forward alone (hidden states, no LM head): no scorer that runs the same
             base model can take less time, so ``naive / base-only`` bounds every provider's speedup

Throughput: both providers are timed in one process, interleaved rep by rep (naive, freeprm,
naive, ...), so a noisy machine slows both alike; we report median tokens/s and min..max.
Peak extra memory: each provider runs once in a fresh subprocess; the kernel's peak-RSS mark
is reset (``/proc/self/clear_refs``) after the model and inputs are loaded, so the number is
the memory the scoring pass itself adds. Results go to ``bench/results/engine_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import env_info, rss_kb  # noqa: E402


def build_items(tokenizer, batch: int, seq: int) -> list[dict]:
    """``batch`` GSM8K-based items of exactly ``seq`` tokens each (prompt = a question, response = solutions)."""
    from freeprm.engine.tokenization import encode, prompt_ids
    from freeprm.gsm8k import gold_steps, read_gsm8k

    recs = read_gsm8k("test", limit=400)
    items = []
    for b in range(batch):
        prompt = recs[b]["question"]
        n_prompt = len(prompt_ids(tokenizer, prompt))
        steps, j = [], b + batch
        text = ""
        while True:
            steps += gold_steps(recs[j % len(recs)]["answer"])
            j += 1
            text = "\n\n".join(steps)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= seq - n_prompt:
                break
        # cut the response to the token budget at a token boundary, using the offsets
        enc = encode(tokenizer, prompt, text)
        keep = seq - enc.response_start
        response = text[: enc.offsets[keep - 1][1]]
        while len(encode(tokenizer, prompt, response).input_ids) > seq:
            response = response[:-1]
        items.append({"prompt": prompt, "response": response})
    return items


def make_providers(scorer, items):
    from freeprm.engine.batching import pad_batch
    from freeprm.testing import naive_sequence_logprobs

    prepared = [scorer.prepare(it, i) for i, it in enumerate(items)]
    batch = pad_batch([p.input_ids for p in prepared], scorer.pad_id, target_starts=[p.response_start for p in prepared],
                      device=scorer.device)
    ids, am, tm = batch.input_ids, batch.attention_mask, batch.target_mask
    starts = [batch.offsets[b] + p.response_start for b, p in enumerate(prepared)]

    def naive():
        with torch.inference_mode():
            lp = naive_sequence_logprobs(scorer.policy, ids, am, tm)
            return [lp[b, s:] for b, s in enumerate(starts)]

    def freeprm():
        return [r.token_rewards for r in scorer.score(items)]

    from freeprm.engine.logprobs import split_lm

    base, head = split_lm(scorer.policy)

    def base_only():
        with torch.inference_mode():
            return base(input_ids=ids, attention_mask=am).last_hidden_state

    def chunked():
        with torch.inference_mode():
            hs = base(input_ids=ids, attention_mask=am).last_hidden_state  # [B, T, D]
            b_idx, t_idx = tm.nonzero(as_tuple=True)
            rows, tgt = hs[b_idx, t_idx - 1], ids[b_idx, t_idx]
            lp = torch.cat([(lg := rows[i:i + 1024] @ head.weight.T).gather(1, tgt[i:i + 1024, None])[:, 0]
                            - torch.logsumexp(lg, 1) for i in range(0, len(rows), 1024)])
            full = torch.zeros(tm.shape, dtype=lp.dtype)
            full[b_idx, t_idx] = lp
            return [full[b, s:] for b, s in enumerate(starts)]

    n_tokens = int(am.sum())
    n_scored = int(tm.sum())
    return {"naive": naive, "freeprm": freeprm, "chunked": chunked, "base-only": base_only}, n_tokens, n_scored


def load(args):
    from freeprm.engine import Scorer

    torch.set_num_threads(args.threads)
    scorer = Scorer(args.policy, dtype="float32", device="cpu", max_batch_tokens=args.batch * args.seq)
    items = build_items(scorer.tokenizer, args.batch, args.seq)
    return scorer, items


def child_memory(args) -> None:
    scorer, items = load(args)
    providers, _, _ = make_providers(scorer, items)
    fn = providers[args.child]
    base = rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    fn()
    peak = rss_kb("VmHWM")
    print(json.dumps({"provider": args.child, "peak_extra_mb": (peak - base) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_memory(args)

    scorer, items = load(args)
    providers, n_tokens, n_scored = make_providers(scorer, items)
    # rep 0 is the warm-up (not timed) and gives the outputs compared for correctness
    times, outs = {k: [] for k in providers}, {}
    for rep in range(args.reps + 1):
        for k, fn in providers.items():
            t0 = time.perf_counter()
            out = fn()
            if rep == 0:
                outs[k] = out
            else:
                times[k].append(time.perf_counter() - t0)
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items() if v), file=sys.stderr)
    max_err = max(float((a - b).abs().max()) for a, b in zip(outs["naive"], outs["freeprm"]))
    max_err_chunked = max(float((a - b).abs().max()) for a, b in zip(outs["naive"], outs["chunked"]))
    mem = {}
    for k in providers:
        cmd = [sys.executable, __file__, "--child", k, "--policy", args.policy, "--batch", str(args.batch),
               "--seq", str(args.seq), "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        mem[k] = json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mb"]

    rows = []
    for k in providers:
        med = statistics.median(times[k])
        rows.append({"provider": k, "median_s": med, "min_s": min(times[k]), "max_s": max(times[k]),
                     "tokens_per_s": n_tokens / med, "peak_extra_mb": mem[k]})
    by = {r["provider"]: r for r in rows}
    summary = {
        "throughput_ratio_freeprm_over_naive": by["freeprm"]["tokens_per_s"] / by["naive"]["tokens_per_s"],
        "memory_ratio_freeprm_over_naive": by["freeprm"]["peak_extra_mb"] / by["naive"]["peak_extra_mb"],
        "throughput_ratio_chunked_over_naive": by["chunked"]["tokens_per_s"] / by["naive"]["tokens_per_s"],
        "bound_naive_over_base_only": by["base-only"]["tokens_per_s"] / by["naive"]["tokens_per_s"],
        "max_abs_diff_token_logprobs": max_err,
        "max_abs_diff_token_logprobs_chunked": max_err_chunked,
    }
    env = env_info(args.threads) | {
           "command": "python bench/bench_engine.py " + " ".join(sys.argv[1:]),
           "cpp_kernel": __import__("freeprm.kernels.cpu_ext", fromlist=["get"]).get() is not None,
           "note": "shared machine: other processes may have run during the timed reps; ratios are from one "
                   "interleaved run"}
    setup = {"policy": args.policy, "batch": args.batch, "seq": args.seq, "dtype": "float32", "reps": args.reps,
             "tokens": n_tokens, "scored_tokens": n_scored, "vocab": scorer.vocab_size}
    out = {"env": env, "setup": setup, "results": rows, "summary": summary}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tag = "" if args.policy == "smollm2" else f"{Path(args.policy).name}_"
    stem = Path(args.out) / f"engine_cpu_{tag}b{args.batch}x{args.seq}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    md = [f"# Engine benchmark: score() vs naive HF, {args.batch} x {args.seq} tokens, fp32",
          "", f"- device: {env['device']}, {args.threads} threads", f"- torch {env['torch']}, transformers "
          f"{env['transformers']}, git {env['git_sha']}, {env['date']}, C++ CPU kernel built: {env['cpp_kernel']}",
          f"- command: `{env['command']}` (run under `flock /work/heavy.lock`; {env['note']})",
          f"- model: {args.policy} (V={scorer.vocab_size}), {n_tokens} tokens, {n_scored} scored; {args.reps} timed reps "
          "interleaved after one warm-up rep (machine shared with other jobs: ratios only); peak extra memory from one run per provider in a fresh process",
          "", "| provider | tokens/s (median) | time min..max (s) | peak extra memory (MB) |", "|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['provider']} | {r['tokens_per_s']:.1f} | {r['min_s']:.2f}..{r['max_s']:.2f} | "
                  f"{r['peak_extra_mb']:.0f} |")
    md += ["", f"- throughput freeprm / naive: **{summary['throughput_ratio_freeprm_over_naive']:.2f}x**",
           f"- peak extra memory freeprm / naive: **{100 * summary['memory_ratio_freeprm_over_naive']:.1f}%**",
           f"- throughput chunked loop / naive: {summary['throughput_ratio_chunked_over_naive']:.2f}x",
           f"- bound for any LM-head implementation over this base model, naive / base-only time: "
           f"**{summary['bound_naive_over_base_only']:.2f}x**",
           f"- max |token log-prob difference| vs naive: freeprm {max_err:.2e}, chunked {max_err_chunked:.2e}", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

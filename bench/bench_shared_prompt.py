"""Shared-prompt prefill benchmark: best-of-N candidates scored with and without reusing the prompt's KV cache.

    flock /work/heavy.lock python bench/bench_shared_prompt.py            # N=16, 512-token prompt, 256-token responses
    python bench/bench_shared_prompt.py --n 4 --prompt 64 --response 32 --reps 1    # quick check

One ``Scorer`` (SmolLM2-135M-Instruct, fp32, CPU) scores the same N items (one prompt, N different
responses) with ``share_prompt=False`` (each of the N sequences runs whole: N x (P + R) tokens) and
``share_prompt=True`` (the prompt runs once: P + N x R tokens), the latter with the prompt attended by
cascade attention (``shared``, the CPU default) and through a KV cache repeated over the candidates
(``shared-repeat``), interleaved rep by rep after one warm-up rep, in one process; medians and min..max.

Also reported: the largest difference between the paths' token rewards (fp32 rounding, ~1e-5 on
SmolLM2), and the FLOP ratio of the two workloads, which bounds the speedup a path that is equally
efficient per FLOP can reach: linear layers ``2 * params`` per token, attention ``4 * head_dim *
heads * keys`` per token and layer (causal: a token attends to itself and what precedes it), the LM
head ``2 * D * V`` per scored token in both paths.
Results go to ``bench/results/shared_prompt_cpu_n{N}_p{P}_r{R}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import env_info  # noqa: E402


def _cut_to_tokens(text: str, n_tokens: int, count) -> str:
    """The longest prefix of ``text`` with ``count(prefix) <= n_tokens`` (binary search on characters)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[:mid]) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def build_items(scorer, n: int, prompt_tokens: int, response_tokens: int) -> list[dict]:
    """One prompt of ``prompt_tokens`` tokens (GSM8K questions, chat format) and ``n`` GSM8K-solution responses."""
    from freeprm.engine.tokenization import prompt_ids
    from freeprm.engine.tokenization import response_tokens as resp_tok
    from freeprm.gsm8k import gold_steps, read_gsm8k

    tok = scorer.tokenizer
    recs = read_gsm8k("test", limit=400)
    text = " ".join(r["question"] for r in recs[:40])
    prompt = _cut_to_tokens(text, prompt_tokens, lambda t: len(prompt_ids(tok, t, scorer.prompt_format)))
    items = []
    for g in range(n):
        steps = [s for r in recs[40 + 5 * g: 45 + 5 * g] for s in gold_steps(r["answer"])]
        response = _cut_to_tokens("\n\n".join(steps), response_tokens, lambda t: len(resp_tok(tok, t)[0]))
        items.append({"prompt": prompt, "response": response})
    return items


def workload_flops(model, run_lengths: list[int], past: list[int], scored: list[int]) -> dict:
    """FLOPs of base-model runs of ``run_lengths[i]`` new tokens after ``past[i]`` cached ones, plus the LM head.

    Linear layers: ``2 * (non-embedding parameters)`` per token. Attention: ``4 * head_dim * heads`` per
    (query, key) pair and layer, where the query at position ``j`` sees ``past + j + 1`` keys (causal).
    LM head: ``2 * D * V`` per scored token. Norms, activations and the softmax are not counted.
    """
    cfg = getattr(model.config, "text_config", None) or model.config
    emb = model.get_input_embeddings().weight.numel()
    head_params = model.get_output_embeddings().weight
    linear_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2) - emb
    if head_params.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        linear_params -= head_params.numel()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_pair = 4 * head_dim * cfg.num_attention_heads * cfg.num_hidden_layers
    tokens = sum(run_lengths)
    pairs = sum(n * p + n * (n + 1) // 2 for n, p in zip(run_lengths, past))
    out = {"linear": 2 * linear_params * tokens, "attention": per_pair * pairs,
           "head": 2 * head_params.shape[0] * head_params.shape[1] * sum(scored)}
    out["total"] = sum(out.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    from freeprm.engine import Scorer

    torch.set_num_threads(args.threads)
    scorer = Scorer(args.policy, dtype="float32", device="cpu")
    items = build_items(scorer, args.n, args.prompt, args.response)
    prepared = [scorer.prepare(it, i) for i, it in enumerate(items)]
    n_prompt = prepared[0].response_start
    n_resp = [p.num_response_tokens for p in prepared]
    assert all(p.prompt_ids == prepared[0].prompt_ids for p in prepared)

    def run(share: bool, attention: str = "auto"):
        scorer.share_prompt, scorer._prefill_attention = share, attention
        return scorer.score_prepared(prepared)

    providers = {"unshared": lambda: run(False), "shared": lambda: run(True, "cascade"),
                 "shared-repeat": lambda: run(True, "repeat")}
    times, outs = {k: [] for k in providers}, {}
    for rep in range(args.reps + 1):  # rep 0: warm-up, gives the outputs compared
        for k, fn in providers.items():
            t0 = time.perf_counter()
            out = fn()
            if rep == 0:
                outs[k] = out
            else:
                times[k].append(time.perf_counter() - t0)
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items() if v), file=sys.stderr)
    max_err = {k: max(float((a.token_rewards - b.token_rewards).abs().max()) for a, b in zip(outs["unshared"], outs[k]))
               for k in providers if k != "unshared"}
    # fp64 oracle (unshared, each sequence whole): how far each fp32 path is from the exact result
    import copy

    m64 = copy.deepcopy(scorer.policy).double()
    oracle = Scorer((m64, scorer.tokenizer), share_prompt=False, prompt_format=scorer.prompt_format).score_prepared(prepared)
    del m64
    err64 = {k: max(float((a.token_rewards.double() - o.token_rewards).abs().max()) for a, o in zip(outs[k], oracle))
             for k in providers}
    scored = sum(n_resp)
    rows = []
    for k in providers:
        med = statistics.median(times[k])
        rows.append({"provider": k, "median_s": med, "min_s": min(times[k]), "max_s": max(times[k]),
                     "scored_tokens_per_s": scored / med})
    by = {r["provider"]: r for r in rows}
    speedup = by["unshared"]["median_s"] / by["shared"]["median_s"]
    speedup_repeat = by["unshared"]["median_s"] / by["shared-repeat"]["median_s"]
    fl_un = workload_flops(scorer.policy, [n_prompt + r for r in n_resp], [0] * args.n, n_resp)
    fl_sh = workload_flops(scorer.policy, [n_prompt] + n_resp, [0] + [n_prompt] * args.n, n_resp)
    env = env_info(args.threads)
    setup = {"policy": args.policy, "candidates": args.n, "prompt_tokens": n_prompt, "response_tokens": n_resp,
             "dtype": "float32", "reps": args.reps, "max_batch_tokens": scorer.max_batch_tokens,
             "base_model_tokens_unshared": args.n * n_prompt + scored, "base_model_tokens_shared": n_prompt + scored}
    summary = {"speedup_shared_over_unshared": speedup, "speedup_shared_repeat_over_unshared": speedup_repeat,
               "flops_unshared": fl_un, "flops_shared": fl_sh,
               "flop_ratio_unshared_over_shared": fl_un["total"] / fl_sh["total"],
               "max_abs_diff_token_rewards": max_err, "max_abs_err_vs_fp64": err64}
    out = {"env": env, "setup": setup, "results": rows, "summary": summary}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) / f"shared_prompt_cpu_n{args.n}_p{args.prompt}_r{args.response}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    md = [f"# Shared-prompt prefill: {args.n} candidates, {n_prompt}-token prompt, {max(n_resp)}-token responses, fp32",
          "", f"- device: {env['device']}, {args.threads} threads",
          f"- torch {env['torch']}, transformers {env['transformers']}, git {env['git_sha']}, {env['date']}",
          f"- model: {args.policy}; `Scorer.score_prepared` end to end with `share_prompt` False / True, "
          f"{args.reps} timed reps interleaved after one warm-up rep (machine shared: ratios only)",
          f"- base-model tokens: unshared {setup['base_model_tokens_unshared']}, shared {setup['base_model_tokens_shared']}",
          "", "| path | scored tokens/s (median) | time min..max (s) |", "|---|---|---|"]
    for r in rows:
        md.append(f"| {r['provider']} | {r['scored_tokens_per_s']:.1f} | {r['min_s']:.2f}..{r['max_s']:.2f} |")
    ratio = summary["flop_ratio_unshared_over_shared"]
    md += ["", f"- speedup shared (cascade attention) / unshared: **{speedup:.2f}x**; "
           f"shared with a repeated KV cache / unshared: {speedup_repeat:.2f}x",
           f"- FLOP ratio of the two workloads (unshared / shared): **{ratio:.2f}x** "
           f"(GFLOP unshared {fl_un['total'] / 1e9:.0f} = linear {fl_un['linear'] / 1e9:.0f} + attention "
           f"{fl_un['attention'] / 1e9:.0f} + LM head {fl_un['head'] / 1e9:.0f}; shared {fl_sh['total'] / 1e9:.0f} = "
           f"{fl_sh['linear'] / 1e9:.0f} + {fl_sh['attention'] / 1e9:.0f} + {fl_sh['head'] / 1e9:.0f})",
           "- max |token reward difference| vs unshared: "
           + ", ".join(f"{k} {v:.2e}" for k, v in max_err.items()),
           "- max |token reward error| vs an fp64 run of the unshared path: "
           + ", ".join(f"{k} {v:.2e}" for k, v in err64.items()), ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

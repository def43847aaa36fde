"""A PRIME-style reward loop on CPU: rollouts, verifier labels, online implicit-PRM update, advantages.

    flock /work/heavy.lock python bench/rl_loop.py               # defaults below, ~10 min on 2 cores
    python bench/rl_loop.py --steps 1 --prompts 1 --k 2 --heldout-problems 2 --reps 1 --no-memory   # smoke

Loop (each step): SmolLM2-135M-Instruct, the RL policy, samples ``k`` responses to each of ``prompts``
generated-arithmetic problems (``freeprm.eval.tasks.make_arith``, level 1, seed 1); ``freeprm.eval.grading``
labels them (outcome 1/0); the ``ImplicitPRM`` (initialised from SmolLM2, reference = a frozen copy of it,
PRIME's default) runs ``step(mode="before")``: one online CE update on these labels, then dense token
rewards from the updated PRM; ``prime_advantages`` turns rewards and outcomes into advantages. The policy
itself is NOT updated (a policy-gradient step is the RL framework's job; this measures the reward side).

Measured:
  * PRM accuracy on held-apart rollouts before and after the loop: the sign of the response reward
    ``R = sum_t r_t`` against the verifier's label, and AUROC of ``R``. Held-apart rollouts are the
    stored SmolLM2 candidates of ``bench/results/bon_arith`` (level 1, seed 0: other problems than the
    loop's seed-1 problems; checked to share no question).
  * tokens/s of reward computation (``token_rewards``: policy + reference forward) and of the PRM update
    (``update``: reference forward, policy forward + backward, AdamW step) for freeprm (LM head at the
    response rows only, chunked, custom backward) vs the naive full-logits path (``[B, T, V]`` logits +
    ``log_softmax``, ``ImplicitPRM(full_logits=True)``), on the loop's last batch, interleaved rep by rep
    in this process; each update starts from the same saved PRM state (restored after timing);
  * peak extra memory of each of the four passes, each in a fresh process (peak-RSS mark reset after
    loading, after a warm-up update for the update passes so AdamW's state is already allocated).

Results: ``bench/results/rl_loop_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import env_info, rss_kb  # noqa: E402
from freeprm.eval.grading import grade  # noqa: E402
from freeprm.eval.metrics import auroc  # noqa: E402
from freeprm.rl import ImplicitPRM, encode_batch, prime_advantages  # noqa: E402

STOP = ["\nQuestion:"]


def make_prm(args, full_logits: bool = False) -> ImplicitPRM:
    return ImplicitPRM(args.model, "frozen", beta=args.beta, lr=args.lr, grad_clip=10.0,
                       mini_batch_size=args.mini_batch_size, dtype="float32", device="cpu", full_logits=full_logits)


def heldout_rollouts(args) -> list[dict]:
    """The first ``heldout_problems`` problems x ``heldout_k`` candidates of the stored bon_arith run."""
    from freeprm.eval.candidates import read_jsonl

    recs = read_jsonl(ROOT / "bench" / "results" / "bon_arith" / "candidates.jsonl")
    by_problem: dict[str, list[dict]] = {}
    for r in recs:
        if r["response"].strip():
            by_problem.setdefault(r["problem_id"], []).append(r)
    out = []
    for pid in list(by_problem)[:args.heldout_problems]:
        out += sorted(by_problem[pid], key=lambda r: r["candidate_id"])[:args.heldout_k]
    return out


def response_rewards(prm: ImplicitPRM, prompts, responses, batch: int = 8) -> list[float]:
    out = []
    for a in range(0, len(prompts), batch):
        ids, am, rm = encode_batch(prm.tokenizer, prompts[a:a + batch], responses[a:a + batch])
        out += prm.token_rewards(ids, am, rm).sum(1).tolist()
    return out


def prm_quality(prm, held) -> dict:
    r = response_rewards(prm, [h["prompt"] for h in held], [h["response"] for h in held])
    y = [bool(h["correct"]) for h in held]
    return {"accuracy": sum((ri > 0) == yi for ri, yi in zip(r, y)) / len(y), "auroc": auroc(r, y),
            "mean_reward_correct": statistics.fmean([ri for ri, yi in zip(r, y) if yi] or [float("nan")]),
            "mean_reward_incorrect": statistics.fmean([ri for ri, yi in zip(r, y) if not yi] or [float("nan")]),
            "n": len(y), "n_correct": sum(y)}


def child_memory(args) -> None:
    """One pass in a fresh process: its peak RSS above what was resident before it."""
    torch.set_num_threads(args.threads)
    data = torch.load(args.batch_file, weights_only=True)
    prm = make_prm(args, full_logits=args.child.endswith("naive"))
    ids, am, rm, y = data["input_ids"], data["attention_mask"], data["response_mask"], data["outcome"]
    if args.child.startswith("update"):
        prm.update(ids[:1], am[:1], rm[:1], y[:1])  # allocates AdamW's state, not counted
    base = rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    if args.child.startswith("update"):
        prm.update(ids, am, rm, y)
    else:
        prm.token_rewards(ids, am, rm)
    print(json.dumps({"pass": args.child, "peak_extra_mb": (rss_kb("VmHWM") - base) / 1024}))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2, help="problems per step")
    ap.add_argument("--k", type=int, default=4, help="rollouts per problem (the RLOO group)")
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--mini-batch-size", type=int, default=None)
    ap.add_argument("--heldout-problems", type=int, default=8)
    ap.add_argument("--heldout-k", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="interleaved timing reps per path")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-pass memory subprocesses")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child_memory(args)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    from freeprm.eval.candidates import TransformersGenerator
    from freeprm.eval.tasks import make_arith

    gen = TransformersGenerator(args.model, dtype="float32", device="cpu")
    prm = make_prm(args)
    held = heldout_rollouts(args)
    problems = make_arith(args.steps * args.prompts, seed=1, levels=(1,))
    held_q = {h["prompt"] for h in held}
    assert not any(p.prompt() in held_q for p in problems), "held-apart problems overlap the loop's"

    before = prm_quality(prm, held)
    print(f"held-apart before: {before}", file=sys.stderr)
    steps, last = [], None
    for s in range(args.steps):
        probs = problems[s * args.prompts:(s + 1) * args.prompts]
        prompts = [p.prompt() for p in probs for _ in range(args.k)]  # groups of k consecutive rows
        t_gen, outs = timed(lambda: gen.sample_many(prompts, seed=args.seed + s, temperature=args.temperature,
                                                     top_p=0.95, max_new_tokens=args.max_new_tokens, stop=STOP))
        responses = [text if text.strip() else "." for text, _ in outs]  # an empty rollout scores as "."
        labels = [float(grade(r, p.gold, "arith")[1]) for r, p in zip(responses, [p for p in probs for _ in range(args.k)])]
        ids, am, rm = encode_batch(prm.tokenizer, prompts, responses)
        y = torch.tensor(labels)
        t_step, out = timed(lambda: prm.step(ids, am, rm, y, mode="before"))
        adv, ret = prime_advantages(out["rewards"], y, rm, args.k)
        row = {"step": s, "rollouts": len(prompts), "rollout_accuracy": sum(labels) / len(labels),
               "response_tokens": int(rm.sum()), "tokens": int(am.sum()), "generate_s": t_gen,
               "prm_update_and_score_s": t_step, "prm_metrics": out["metrics"], "rewards_version": out["version"],
               "mean_response_reward": float(out["rewards"].sum(1).mean()),
               "advantage_abs_mean": float(adv[rm].abs().mean()), "return_mean": float(ret[rm].mean())}
        steps.append(row)
        print(json.dumps(row), file=sys.stderr)
        last = (ids, am, rm, y)
    after = prm_quality(prm, held)
    print(f"held-apart after: {after}", file=sys.stderr)

    # ---- throughput: freeprm vs naive full-logits on the last batch, interleaved, same PRM state
    ids, am, rm, y = last
    naive = copy.copy(prm)  # the same models and optimizer, read through [B, T, V] logits
    naive.full_logits = True
    snapshot = copy.deepcopy({k: v for k, v in prm.state_dict().items() if k != "reference"})
    times = {k: [] for k in ("rewards_freeprm", "rewards_naive", "update_freeprm", "update_naive")}
    r_fast = r_naive = None
    for rep in range(args.reps):
        for name, p in (("freeprm", prm), ("naive", naive)):
            dt, r = timed(lambda: p.token_rewards(ids, am, rm))
            times[f"rewards_{name}"].append(dt)
            r_fast, r_naive = (r, r_naive) if name == "freeprm" else (r_fast, r)
        for name, p in (("freeprm", prm), ("naive", naive)):
            prm.load_state_dict(snapshot)
            dt, _ = timed(lambda: p.update(ids, am, rm, y))
            times[f"update_{name}"].append(dt)
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()), file=sys.stderr)
    prm.load_state_dict(snapshot)
    max_diff = float((r_fast - r_naive).abs().max())
    n_resp, n_tok = int(rm.sum()), int(am.sum())

    mem = {}
    if not args.no_memory:
        with tempfile.TemporaryDirectory() as tmp:
            bf = str(Path(tmp) / "batch.pt")
            torch.save({"input_ids": ids, "attention_mask": am, "response_mask": rm, "outcome": y}, bf)
            for k in times:
                cmd = [sys.executable, __file__, "--child", k, "--batch-file", bf, "--model", args.model,
                       "--beta", str(args.beta), "--lr", str(args.lr), "--threads", str(args.threads)]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                mem[k] = json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mb"]
                print(f"memory {k}: {mem[k]:.0f} MB", file=sys.stderr)

    rows = []
    for k, v in times.items():
        med = statistics.median(v)
        rows.append({"pass": k, "median_s": med, "min_s": min(v), "max_s": max(v),
                     "response_tokens_per_s": n_resp / med, "tokens_per_s": n_tok / med, "peak_extra_mb": mem.get(k)})
    by = {r["pass"]: r for r in rows}
    summary = {
        "rewards_throughput_freeprm_over_naive": by["rewards_freeprm"]["tokens_per_s"] / by["rewards_naive"]["tokens_per_s"],
        "update_throughput_freeprm_over_naive": by["update_freeprm"]["tokens_per_s"] / by["update_naive"]["tokens_per_s"],
        "max_abs_diff_rewards_freeprm_vs_naive": max_diff,
    }
    if mem:
        summary["rewards_memory_freeprm_over_naive"] = mem["rewards_freeprm"] / mem["rewards_naive"]
        summary["update_memory_freeprm_over_naive"] = mem["update_freeprm"] / mem["update_naive"]
    env = env_info(args.threads) | {
           "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
           "wall_s": time.perf_counter() - t_start}
    setup = {k: getattr(args, k) for k in ("model", "steps", "prompts", "k", "max_new_tokens", "temperature", "beta",
                                           "lr", "mini_batch_size", "heldout_problems", "heldout_k", "reps", "seed")}
    setup.update(reference="frozen copy of the initial PRM", mode="before", policy_updated=False,
                 timing_batch={"rows": int(ids.shape[0]), "tokens": n_tok, "response_tokens": n_resp,
                               "padded": int(ids.numel()), "vocab": int(prm.model.get_output_embeddings().weight.shape[0])})
    result = {"env": env, "setup": setup, "heldout_before": before, "heldout_after": after, "steps": steps,
              "throughput": rows, "summary": summary}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rl_loop_cpu.json").write_text(json.dumps(result, indent=2))
    (out / "rl_loop_cpu.md").write_text(markdown(result))
    print(markdown(result))


def _f(x, fmt=".3f"):
    return "n/a" if x is None or x != x else format(x, fmt)


def markdown(res: dict) -> str:
    env, setup, summ = res["env"], res["setup"], res["summary"]
    b, a = res["heldout_before"], res["heldout_after"]
    tb = setup["timing_batch"]
    md = ["# PRIME-style reward loop on CPU (SmolLM2-135M-Instruct, generated arithmetic level 1)", "",
          f"- device: {env['device']}, {env['threads']} threads; torch {env['torch']}, transformers "
          f"{env['transformers']}, python {env['python']}; git {env['git_sha']}; {env['date']}; wall {env['wall_s']:.0f} s",
          f"- command: `{env['command']}` (run under `flock /work/heavy.lock`)",
          f"- loop: {setup['steps']} steps x {setup['prompts']} problems x {setup['k']} rollouts (temperature "
          f"{setup['temperature']}, <= {setup['max_new_tokens']} new tokens); ImplicitPRM({setup['model']}, reference=frozen copy, "
          f"beta={setup['beta']}, lr={setup['lr']}, CE), `step(mode=\"before\")` each step, then "
          "`prime_advantages(group_size=k)`. **The policy is not updated** (rollouts all come from the initial "
          "SmolLM2): this exercises and measures the reward side of the loop.", "",
          "## Steps", "", "| step | rollout acc. | PRM loss | PRM acc. (pre-step) | grad norm | version | mean R | mean abs adv. | generate s | update+score s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for s in res["steps"]:
        m = s["prm_metrics"]
        md.append(f"| {s['step']} | {_f(s['rollout_accuracy'], '.2f')} | {_f(m['loss'], '.4f')} | {_f(m['accuracy'], '.2f')} | "
                  f"{_f(m['grad_norm'], '.2f')} | {s['rewards_version']} | {_f(s['mean_response_reward'], '.4f')} | "
                  f"{_f(s['advantage_abs_mean'], '.3f')} | {s['generate_s']:.0f} | {s['prm_update_and_score_s']:.0f} |")
    md += ["", f"## PRM on held-apart rollouts ({b['n']} stored SmolLM2 candidates from bench/results/bon_arith, "
           f"{b['n_correct']} correct)", "",
           "| | accuracy (sign of R vs label) | AUROC of R | mean R correct | mean R incorrect |", "|---|---|---|---|---|",
           f"| before | {_f(b['accuracy'], '.3f')} | {_f(b['auroc'], '.3f')} | {_f(b['mean_reward_correct'], '.4f')} | {_f(b['mean_reward_incorrect'], '.4f')} |",
           f"| after | {_f(a['accuracy'], '.3f')} | {_f(a['auroc'], '.3f')} | {_f(a['mean_reward_correct'], '.4f')} | {_f(a['mean_reward_incorrect'], '.4f')} |",
           "", "Before any update the PRM equals its frozen reference, so every reward is exactly 0: accuracy is the "
           "fraction of incorrect rollouts (R = 0 counts as 'incorrect') and AUROC is 0.5.", "",
           f"## Throughput and memory: freeprm vs naive full logits (last batch: {tb['rows']} rows, {tb['tokens']} tokens, "
           f"{tb['response_tokens']} response tokens, V={tb['vocab']})", "",
           f"Interleaved in one process, {setup['reps']} reps each (median; the machine is shared: ratios only). "
           "Peak extra memory: one fresh process per pass.", "",
           "| pass | tokens/s | response tokens/s | time min..max (s) | peak extra memory (MB) |", "|---|---|---|---|---|"]
    for r in res["throughput"]:
        md.append(f"| {r['pass']} | {r['tokens_per_s']:.1f} | {r['response_tokens_per_s']:.1f} | "
                  f"{r['min_s']:.1f}..{r['max_s']:.1f} | {_f(r['peak_extra_mb'], '.0f')} |")
    md += ["", f"- reward computation freeprm / naive throughput: **{summ['rewards_throughput_freeprm_over_naive']:.2f}x**",
           f"- PRM update freeprm / naive throughput: **{summ['update_throughput_freeprm_over_naive']:.2f}x**"]
    if "update_memory_freeprm_over_naive" in summ:
        md += [f"- peak extra memory freeprm / naive: rewards **{100 * summ['rewards_memory_freeprm_over_naive']:.1f}%**, "
               f"update **{100 * summ['update_memory_freeprm_over_naive']:.1f}%**"]
    md += [f"- max |reward difference| freeprm vs naive: {summ['max_abs_diff_rewards_freeprm_vs_naive']:.2e}", ""]
    return "\n".join(md)


if __name__ == "__main__":
    main()

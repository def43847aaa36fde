"""Bounded load test of ``freeprm serve`` (the OpenRLHF reward server) on loopback: batching on vs off.

    flock /work/heavy.lock python bench/serve_load.py            # SmolLM2-135M-Instruct, fp32, CPU

One process loads the Scorer once and starts a ``RewardServer`` on an ephemeral 127.0.0.1 port per run;
``--clients`` threads send a fixed number of ``POST /get_reward`` requests (``--requests``, each with
``--per-request`` responses from the bundled GSM8K demo set) and stop by themselves; a run also stops
sending at ``--time-cap`` seconds. Two modes, interleaved ``--reps`` times in one run, medians reported:

    batched    --max-batch-size 32 --batch-wait-ms 10   (concurrent requests share one score() call)
    unbatched  --max-batch-size 1                       (each request scored on its own)

Reported per mode: requests/s and responses/s (completed, over the run's wall time), p50 / p95 request
latency, and the number of score() calls. Every response is checked against one direct ``Scorer.score``
of the same items (max abs difference reported). Results: ``bench/results/serve_load_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import env_info  # noqa: E402

MODES = {"batched": dict(max_batch_size=32, batch_wait_ms=10.0), "unbatched": dict(max_batch_size=1, batch_wait_ms=0.0)}


def load_items() -> list[dict]:
    rows = [json.loads(line) for line in (ROOT / "freeprm" / "data" / "demo_gsm8k.jsonl").open()]
    return [{"prompt": r["prompt"], "response": "\n\n".join(r["steps"])} for r in rows]


def run_mode(scorer, items, mode, args):
    from freeprm.integrations.openrlhf import RewardServer

    reqs = [[items[(i * args.per_request + j) % len(items)] for j in range(args.per_request)]
            for i in range(args.requests)]
    latencies, answers, lock = [], {}, threading.Lock()
    next_req = iter(range(len(reqs)))
    with RewardServer(scorer, "127.0.0.1", 0, **MODES[mode]) as server:
        url = server.url + "/get_reward"
        t0 = time.perf_counter()

        def client():
            while time.perf_counter() - t0 < args.time_cap:
                with lock:
                    i = next(next_req, None)
                if i is None:
                    return
                body = json.dumps({"query": [it["prompt"] + it["response"] for it in reqs[i]],
                                   "prompts": [it["prompt"] for it in reqs[i]]}).encode()
                t = time.perf_counter()
                with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=args.time_cap + 60) as r:
                    out = json.loads(r.read())
                with lock:
                    latencies.append(time.perf_counter() - t)
                    answers[i] = out["rewards"]

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        calls = server.batches_scored
    lat = sorted(latencies)
    return {"mode": mode, **MODES[mode], "requests_done": len(lat), "responses_done": len(lat) * args.per_request,
            "wall_s": wall, "requests_per_s": len(lat) / wall, "responses_per_s": len(lat) * args.per_request / wall,
            "p50_ms": 1000 * lat[len(lat) // 2], "p95_ms": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "score_calls": calls}, answers, reqs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--per-request", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--time-cap", type=float, default=120.0, help="seconds after which a run stops sending")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    import torch

    from freeprm.engine import Scorer

    torch.set_num_threads(args.threads)
    scorer = Scorer(args.policy)
    items = load_items()
    scorer.score(items[:4])  # warm-up (first-call initialisation is not part of either mode)
    direct = {}
    runs = []
    for rep in range(args.reps):
        for mode in MODES:
            res, answers, reqs = run_mode(scorer, items, mode, args)
            res["rep"] = rep
            runs.append(res)
            print(json.dumps(res), flush=True)
            for i, got in answers.items():
                for it, g in zip(reqs[i], got):
                    key = it["prompt"] + "\x00" + it["response"]
                    if key not in direct:
                        direct[key] = scorer.score([it])[0].score
                    res.setdefault("max_abs_diff_vs_direct", 0.0)
                    res["max_abs_diff_vs_direct"] = max(res["max_abs_diff_vs_direct"], abs(g - direct[key]))

    def med(mode, key):
        return statistics.median(r[key] for r in runs if r["mode"] == mode)

    summary = {m: {k: med(m, k) for k in ("requests_per_s", "responses_per_s", "p50_ms", "p95_ms", "score_calls")}
               for m in MODES}
    summary["throughput_ratio_batched_over_unbatched"] = (summary["batched"]["responses_per_s"]
                                                          / summary["unbatched"]["responses_per_s"])
    summary["max_abs_diff_vs_direct"] = max(r.get("max_abs_diff_vs_direct", 0.0) for r in runs)
    env = env_info(args.threads) | {
           "command": "flock /work/heavy.lock python bench/serve_load.py " + " ".join(sys.argv[1:])}
    setup = {"policy": args.policy, "requests": args.requests, "per_request": args.per_request,
             "clients": args.clients, "reps": args.reps, "time_cap_s": args.time_cap, "modes": MODES,
             "transport": "HTTP on 127.0.0.1 (urllib clients in the same process)"}
    out = {"env": env, "setup": setup, "runs": runs, "summary": summary}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) / "serve_load_cpu"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    md = ["# `freeprm serve` load test (loopback), batching on vs off", "",
          f"- device: {env['device']}, {args.threads} torch threads; torch {env['torch']}, transformers "
          f"{env['transformers']}, Python {env['python']}; git {env['git_sha']}; {env['date']}",
          f"- command: `{env['command']}`",
          f"- {args.policy}, fp32, reference-free; {args.requests} requests x {args.per_request} responses "
          f"(GSM8K demo set), {args.clients} concurrent clients, {args.reps} interleaved repeats (medians), "
          f"time cap {args.time_cap:.0f} s per run", "",
          "| mode | max batch | wait ms | requests/s | responses/s | p50 ms | p95 ms | score() calls |",
          "|---|---|---|---|---|---|---|---|"]
    for m in MODES:
        s = summary[m]
        md.append(f"| {m} | {MODES[m]['max_batch_size']} | {MODES[m]['batch_wait_ms']:g} | {s['requests_per_s']:.2f} | "
                  f"{s['responses_per_s']:.2f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | {s['score_calls']:.0f} |")
    md += ["", f"Throughput ratio batched / unbatched (responses/s): "
               f"**{summary['throughput_ratio_batched_over_unbatched']:.2f}x**; max |reward - direct Scorer.score| = "
               f"{summary['max_abs_diff_vs_direct']:.2e}.", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's claim at small scale: an ORM trained with CE on outcome labels only locates wrong steps.

Data (GSM8K, from ``/work/shared/data``): each gold solution, with its calculator annotations
(``<<48/2=24>>``) removed and its ``#### X`` line written as ``The answer is X.``, is a correct
response whose steps are its lines (``step_delimiter="\\n"``). Its incorrect twin corrupts the
result of one calculation line (a seeded choice among lines with an annotation) by a small
offset and propagates the change: every later annotated calculation is re-evaluated with the
new numbers, the changed results replace the old ones in the text, and the final answer
changes (problems where that cannot be done unambiguously are skipped). Only the response
labels (1 gold, 0 corrupted) are used in training; the corrupted step index is used only to
evaluate.

Training: SmolLM2-135M-Instruct (``policy="smollm2"``), CE loss, reference = the initial model
(log-probs cached, so training runs no reference forward), 1 epoch over the train items. To fit
2 shared CPU cores, only the last 8 of the 30 decoder layers (+ final norm) are trained by
default (``--train-last-layers 0`` trains everything); r = beta * log(pi_theta / pi_ref) holds
for any pi_theta, so this is the same implicit PRM with fewer free parameters.

Evaluation on held-apart GSM8K-test problems built the same way, with the engine's Scorer:
  * step location: on corrupted responses, how often the lowest step reward is the corrupted
    step, for the trained PRM (``r = beta * log(pi_theta / pi_ref)``), for the untrained model in
    reference-free mode (``r = log pi_init``), and for chance (mean of 1 / #steps);
  * response level: accuracy of ``sign(sum of step rewards)`` vs the label, and pairwise
    accuracy (the gold response scored above its corrupted twin) with the response reward and
    with the PRM's min-step score.

Writes ``bench/results/<name>.{json,md}`` (``--name``, default ``claim_small_scale``). Run: ``python bench/claim_small_scale.py``
(about 30 minutes on 2 shared CPU cores at the default size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from freeprm.gsm8k import corrupt, gold_response, read_gsm8k, render_steps  # noqa: E402


def render(body: list[str], final: str) -> str:
    return "\n".join(render_steps(body, final))


def build_items(rows: list[dict], n: int, seed: int, tokenizer, max_length: int) -> list[dict]:
    """Up to ``n`` problems -> [{prompt, response, label, steps, bad_step, problem}], gold then corrupted."""
    from freeprm.engine.steps import split_steps
    from freeprm.engine.tokenization import encode

    rng = random.Random(seed)
    out, used = [], 0
    for i, row in enumerate(rows):
        if used >= n:
            break
        g = gold_response(row["answer"])
        if g is None:
            continue
        body, final = g
        c = corrupt(row["question"], body, final, rng)
        if c is None:
            continue
        cbody, cfinal, k = c
        gold, bad = render(body, final), render(cbody, cfinal)
        n_steps = len(split_steps(gold, step_delimiter="\n"))
        if n_steps != len(body) + 1 or len(split_steps(bad, step_delimiter="\n")) != n_steps:
            continue
        if gold.split("\n")[:k] != bad.split("\n")[:k] or gold.split("\n")[k] == bad.split("\n")[k]:
            continue
        if max(len(encode(tokenizer, row["question"], r).input_ids) for r in (gold, bad)) > max_length:
            continue
        out.append({"prompt": row["question"], "response": gold, "label": 1, "steps": n_steps, "bad_step": None, "problem": i})
        out.append({"prompt": row["question"], "response": bad, "label": 0, "steps": n_steps, "bad_step": k, "problem": i})
        used += 1
    return out


# ------------------------------------------------------------------------------------ eval
def evaluate(step_rewards: list[torch.Tensor], items) -> dict:
    """Step location on corrupted items and response-level accuracies from per-response step rewards ``[S]``."""
    hits, n_bad, signs, pair_sum, pair_min, n_pairs = 0, 0, 0, 0, 0, 0
    by_problem: dict[int, dict] = {}
    for sr, it in zip(step_rewards, items):
        total = float(sr.sum())
        signs += int((total > 0) == (it["label"] == 1))
        by_problem.setdefault(it["problem"], {})[it["label"]] = (total, float(sr.min()))
        if it["bad_step"] is not None:
            n_bad += 1
            hits += int(int(sr.argmin()) == it["bad_step"])
    for p in by_problem.values():
        if 0 in p and 1 in p:
            n_pairs += 1
            pair_sum += int(p[1][0] > p[0][0])
            pair_min += int(p[1][1] > p[0][1])
    return {"lowest_step_is_corrupted": hits / n_bad, "lowest_step_hits": hits, "corrupted_items": n_bad,
            "response_sign_accuracy": signs / len(items), "pairwise_accuracy_sum": pair_sum / n_pairs,
            "pairwise_accuracy_min_step": pair_min / n_pairs, "pairs": n_pairs}


def reference_free_steps(res) -> torch.Tensor:
    """Step rewards of the initial model in reference-free mode (beta = 1): per step, the sum of its ``log pi_ref``.

    The same numbers as ``Scorer(initial, reference=None, beta=1)`` (the scorer's token -> step
    map, its log-probs), read from the trained scorer's reference pass instead of a third forward.
    """
    return torch.zeros(len(res.step_rewards)).index_add_(0, res.token_steps, res.ref_logprobs.float())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=60, help="train problems (2 items each)")
    ap.add_argument("--n-test", type=int, default=40, help="test problems (2 items each)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--train-last-layers", type=int, default=8,
                    help="train only the last N of SmolLM2's 30 layers (0 = all): what fits 2 shared CPU cores")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--ce-balance", choices=("none", "dataset", "instruction"), default="instruction",
                    help="instruction: the paper's instruction-wise balance; it also keeps a problem's gold and "
                         "corrupted responses in one batch")
    ap.add_argument("--name", default="claim_small_scale", help="results file stem")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/freeprm_claim")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()

    from freeprm.engine import Scorer, load_model
    from freeprm.engine.loading import resolve_spec
    from freeprm.trainer import TrainConfig, train

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    init_dir = resolve_spec("smollm2")  # the cached safetensors copy of the bundled GGUF
    _, tok = load_model(init_dir)
    train_rows, test_rows = read_gsm8k("train"), read_gsm8k("test")
    train_items = build_items(train_rows, args.n_train, args.seed, tok, args.max_length)
    test_items = build_items(test_rows, args.n_test, args.seed + 1, tok, args.max_length)
    (work / "train.jsonl").write_text("".join(json.dumps({k: it[k] for k in ("prompt", "response", "label")}) + "\n"
                                              for it in train_items))
    (work / "test.jsonl").write_text("".join(json.dumps(it) + "\n" for it in test_items))
    print(f"data: {len(train_items)} train items ({args.n_train} problems), {len(test_items)} test items", flush=True)

    cfg = TrainConfig(loss="ce", ce_balance=args.ce_balance, beta=args.beta, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      epochs=args.epochs, warmup_ratio=0.1, schedule="cosine", max_length=args.max_length,
                      seed=args.seed, max_grad_norm=1.0, progress=True, ref_cache_dir=str(work / "refcache"),
                      train_last_layers=args.train_last_layers or None)
    t0 = time.time()
    res = train(init_dir, work / "train.jsonl", work / f"run-{args.name}", config=cfg)
    t_train = time.time() - t0
    m = res.metrics
    k = max(1, len(m) // 4)

    def avg(rows, key):
        v = [r[key] for r in rows if r.get(key) is not None]
        return sum(v) / len(v) if v else None

    training = {"steps": res.steps, "seconds": round(t_train, 1), "ref_sequences_computed": res.ref_computed,
                "first_quarter": {key: avg(m[:k], key) for key in ("loss", "accuracy", "margin")},
                "last_quarter": {key: avg(m[-k:], key) for key in ("loss", "accuracy", "margin")},
                "tokens_per_s": avg(m, "tokens_per_s")}
    print("training:", json.dumps(training), flush=True)

    score_items = [{"prompt": it["prompt"], "response": it["response"]} for it in test_items]
    t0 = time.time()
    trained = Scorer(str(res.final_dir), reference=init_dir, beta=args.beta, step_delimiter="\n",
                     max_length=args.max_length + 8).score(score_items, progress=True)
    t_eval = time.time() - t0
    bad = [it for it in test_items if it["bad_step"] is not None]
    chance = sum(1 / it["steps"] for it in bad) / len(bad)
    ev_trained = evaluate([r.step_rewards for r in trained], test_items)
    ev_untrained = evaluate([reference_free_steps(r) for r in trained], test_items)
    # how often the corrupted step is the last body step (just before the answer line): a position prior
    pos_prior = sum(it["bad_step"] == it["steps"] - 2 for it in bad) / len(bad)

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = None
    import transformers

    out = {
        "claim": "an implicit PRM trained with CE on response labels only puts its lowest step reward on the corrupted step",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git_sha": sha,
        "command": "python bench/claim_small_scale.py " + " ".join(sys.argv[1:]),
        "device": f"CPU ({os.cpu_count()} cores, {args.threads} threads, shared machine)", "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "size": {"policy": "SmolLM2-135M-Instruct (dequantized from the bundled Q4_1 GGUF)",
                 "trained_parameters": "all" if not args.train_last_layers else
                 f"last {args.train_last_layers} of 30 decoder layers + final norm (embeddings/LM head frozen)",
                 "train_problems": len(train_items) // 2, "train_items": len(train_items),
                 "test_problems": len(test_items) // 2, "test_items": len(test_items),
                 "corrupted_test_items": len(bad), "max_length": args.max_length, "epochs": args.epochs,
                 "mean_steps_test": sum(it["steps"] for it in bad) / len(bad)},
        "config": cfg.to_dict(), "training": training,
        "step_location": {"trained_prm": ev_trained["lowest_step_is_corrupted"],
                          "untrained_reference_free": ev_untrained["lowest_step_is_corrupted"],
                          "chance": chance, "always_last_calculation_step": pos_prior},
        "response_level": {"trained_prm": ev_trained, "untrained_reference_free": ev_untrained,
                           "chance_pairwise": 0.5},
        "seconds": {"train": round(t_train, 1), "eval": round(t_eval, 1), "total": round(time.time() - t_start, 1)},
    }
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    (results / f"{args.name}.md").write_text(markdown(out))
    print(markdown(out))
    return 0


def markdown(o: dict) -> str:
    s, sl, rl, tr = o["size"], o["step_location"], o["response_level"], o["training"]
    pct = (lambda x: f"{100 * x:.1f}%")
    n = s["corrupted_test_items"]
    lines = [
        "# Small-scale check: process rewards from outcome labels (CE), SmolLM2-135M on GSM8K",
        "",
        f"{o['date']}, git {o['git_sha']}, {o['device']}, torch {o['torch']}, transformers {o['transformers']}. "
        f"Produced by `{o.get('command', 'python bench/claim_small_scale.py')}`; one run, one seed.",
        "",
        "**Size (small, state it with every number):** "
        f"{s['train_problems']} GSM8K-train problems -> {s['train_items']} responses (gold + one corrupted copy each), "
        f"{s['epochs']} epoch, {tr['steps']} optimizer steps; evaluated on {s['test_problems']} held-apart GSM8K-test "
        f"problems ({s['test_items']} responses, {n} corrupted; {s['mean_steps_test']:.2f} steps per response on average). "
        f"Trained parameters: {s['trained_parameters']}. Max length {s['max_length']} tokens. With {n} corrupted items the 95% binomial interval of a rate is about "
        f"+-{100 * 1.96 * math.sqrt(0.25 / n):.0f} points at 50%.",
        "",
        "## Lowest step reward falls on the corrupted step",
        "",
        "| scorer | rate |",
        "|---|---|",
        f"| trained implicit PRM, `beta*log(pi/pi_ref)` (CE on outcome labels only) | {pct(sl['trained_prm'])} |",
        f"| untrained SmolLM2, reference-free (`log pi`) | {pct(sl['untrained_reference_free'])} |",
        f"| chance (mean 1/#steps) | {pct(sl['chance'])} |",
        f"| always the last calculation line (position prior of this data) | {pct(sl['always_last_calculation_step'])} |",
        "",
        "## Response level",
        "",
        "| scorer | sign(r) vs label | gold above its corrupted twin (sum) | same, min-step score |",
        "|---|---|---|---|",
        f"| trained implicit PRM | {pct(rl['trained_prm']['response_sign_accuracy'])} | "
        f"{pct(rl['trained_prm']['pairwise_accuracy_sum'])} | {pct(rl['trained_prm']['pairwise_accuracy_min_step'])} |",
        f"| untrained, reference-free | {pct(rl['untrained_reference_free']['response_sign_accuracy'])} (r < 0 always) | "
        f"{pct(rl['untrained_reference_free']['pairwise_accuracy_sum'])} | "
        f"{pct(rl['untrained_reference_free']['pairwise_accuracy_min_step'])} |",
        "| chance | 50% | 50% | 50% |",
        "",
        "## Training",
        "",
        f"CE ({o['config']['ce_balance']} balance), beta {o['config']['beta']}, lr {o['config']['lr']} (10% warmup, cosine), batch "
        f"{o['config']['batch_size']} x {o['config']['grad_accum']} accumulation, reference = the initial model with its "
        f"log-probs cached ({tr['ref_sequences_computed'] or 'none'} computed in this run"
        f"{'' if tr['ref_sequences_computed'] else ', all read from the cache of an earlier run'}; "
        "no reference forward during training). "
        f"First quarter of steps: loss {tr['first_quarter']['loss']:.3f}, sign accuracy {tr['first_quarter']['accuracy']:.2f}; "
        f"last quarter: loss {tr['last_quarter']['loss']:.3f}, sign accuracy {tr['last_quarter']['accuracy']:.2f}, "
        f"margin (mean r correct - mean r incorrect) {tr['last_quarter']['margin']:.3f}. "
        f"Time: train {o['seconds']['train']:.0f} s, eval {o['seconds']['eval']:.0f} s, total {o['seconds']['total']:.0f} s.",
        "",
        "Data: gold solutions (calculator annotations removed, `#### X` written as `The answer is X.`), steps = lines. "
        "Each corrupted copy changes one calculation's written result by a small offset and recomputes every later "
        "calculation from it, so the final answer changes; only the labels (1 gold / 0 corrupted) are trained on.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

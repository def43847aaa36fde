"""The paper's claim in miniature, on-policy: train an implicit PRM on the policy's own graded rollouts, then
best-of-N with fresh rollouts on held-apart problems, and step-error localisation on corrupted gold solutions.

One command runs the whole pipeline; every stage resumes (rerun the same command after a kill):

    python bench/claim_onpolicy.py --out bench/results/claim_onpolicy            # full (hours on 2 CPU cores)
    python bench/claim_onpolicy.py --quick --out /tmp/claim_quick                 # smoke test: tiny random model

Stages (``--stages`` picks some; each skips what is done):

1. ``data``   K rollouts per train problem from the policy, graded (``freeprm.eval.rollouts.make_rollouts``:
              ``OUT/data/rollouts.jsonl`` appended per batch; ``rows.jsonl``, ``pairs.jsonl``, ``summary.json``).
2. ``train``  CE on the rows and DPO on the pairs (``freeprm.trainer.train``), reference = the initial policy,
              checkpoints every ``--save-every`` steps and ``resume="auto"`` (``OUT/ce``, ``OUT/dpo``).
3. ``steps``  step-error rows (ProcessBench format) from corrupted gold solutions of held-apart problems: a tune
              file and a test file; each scorer's step rewards saved (``OUT/steps/<scorer>.json``).
4. ``bon``    N fresh rollouts per held-apart test problem, in chunks of ``--chunk`` problems: each chunk is
              generated (``OUT/test/candidates.jsonl``) and scored by every scorer (``OUT/test/scores_<scorer>.jsonl``)
              before the next, so a stopped run has a report over the problems finished so far.
5. ``report`` tables (``OUT/claim.md``, ``OUT/claim.json``) and a plot (``OUT/claim_bon.png``) over the test problems
              that every scorer has scored: best-of-N at N = 1, 2, 4, 8 with 95% bootstrap CIs over problems, the
              paired difference (trained PRM's weighted vote - majority vote) with its CI, step-error F1.

Scorers: ``untrained`` (the initial policy read reference-free, ``beta * log pi`` with beta 1: the
baseline an untrained model gives), ``ce`` and ``dpo`` (the trained PRMs, ``beta * log(pi / pi_ref)``,
reference = the initial policy, beta = the training beta). Train, test and step problems come from
different task seeds; a test or step problem whose question text occurs among the train problems is
dropped (the count is reported).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import env_info  # noqa: E402
from freeprm.config import DEFAULT_BETA, DEFAULT_TRAIN_BETA  # noqa: E402

STAGES = ("data", "train", "steps", "bon", "report")


@dataclass
class Plan:
    policy: str = "smollm2"
    levels: tuple = (1,)  # level 1: SmolLM2-135M is right ~30% of the time (bench/results/bon_arith)
    small: bool = False  # True: single-digit add/sub at every step
    step_levels: tuple = (2, 3)  # step-error rows: multi-step solutions (a level-1 solution has one calculation)
    step_small: bool = True
    n_train: int = 100
    n_test: int = 300
    n_step_tune: int = 50
    n_step_test: int = 200
    k: int = 4
    n: int = 8
    temperature: float = 0.3
    top_p: float = 0.95
    max_new_tokens: int = 96
    gen_batch: int = 48
    seed: int = 0
    train_seed: int = 101  # task seeds: train, test, step-tune, step-test problems
    test_seed: int = 202
    step_tune_seed: int = 303
    step_test_seed: int = 404
    beta: float = DEFAULT_TRAIN_BETA  # the paper's training value
    lr: float = 2e-5
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 2
    train_last_layers: int | None = 8
    ce_balance: str = "instruction"
    save_every: int = 10
    max_length: int = 512
    chunk: int = 25
    n_subsets: int = 200
    bootstrap: int = 2000
    stop: tuple = ("\nQuestion:",)


QUICK = dict(levels=(1,), small=False, n_train=4, n_test=4, n_step_tune=3, n_step_test=3, k=2, n=4,
             max_new_tokens=12, gen_batch=16, lr=1e-3, batch_size=2, grad_accum=1, train_last_layers=None,
             save_every=1, max_length=640, chunk=2, n_subsets=20, bootstrap=100, temperature=1.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def problems(plan: Plan):
    from freeprm.eval.tasks import make_arith

    def mk(n, seed):
        return make_arith(n, seed=seed, levels=tuple(plan.levels), small=plan.small)

    def mk_steps(n, seed):
        return make_arith(n, seed=seed, levels=tuple(plan.step_levels), small=plan.step_small)

    train = mk(plan.n_train, plan.train_seed)
    seen = {p.question for p in train}
    out, dropped = {"train": train}, {}
    for name, n, seed in (("test", plan.n_test, plan.test_seed), ("step_tune", plan.n_step_tune, plan.step_tune_seed),
                          ("step_test", plan.n_step_test, plan.step_test_seed)):
        # draw extra, drop any question also in train, keep the first n (deterministic)
        kept, dropped[name] = [], 0
        for p in (mk if name == "test" else mk_steps)(2 * n + 50, seed):
            if len(kept) == n:
                break
            if p.question in seen:
                dropped[name] += 1
            else:
                kept.append(p)
        out[name] = kept
    out["dropped"] = dropped
    return out


def gen_kwargs(plan: Plan, policy) -> dict:
    return dict(model=policy, temperature=plan.temperature, top_p=plan.top_p, max_new_tokens=plan.max_new_tokens,
                seed=plan.seed, batch_size=plan.gen_batch, backend="transformers", stop=list(plan.stop),
                progress=False)


ONLY: set | None = None  # --scorers

# Training settings a variant may change (``--variant NAME:field=value,...``); everything else (data, test
# problems, candidates) is shared with the base run, so variants are compared on the same problems.
VARIANT_FIELDS = ("loss", "beta", "lr", "epochs", "train_last_layers", "ce_balance", "batch_size", "grad_accum")
# Step-only diagnostics: each trained PRM's policy read without its reference (beta 1, reference-free), named
# "<PRM>-policy-only": where does the step-error signal sit, in log pi or in log pi_ref?
DIAGNOSTIC_SUFFIX = "-policy-only"


def parse_variant(text: str) -> tuple[str, dict]:
    """``"NAME:lr=1e-4,epochs=3"`` -> ``("NAME", {"lr": 1e-4, "epochs": 3})`` (JSON values; ``loss`` defaults to ce)."""
    name, _, rest = text.partition(":")
    if not name or not name.replace("-", "").replace(".", "").isalnum() or name in ("untrained", "ce", "dpo"):
        raise ValueError(f"--variant {text!r}: give NAME:field=value,... with NAME of letters, digits, '-', '.' "
                         "(not untrained/ce/dpo)")
    over = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        if k not in VARIANT_FIELDS:
            raise ValueError(f"--variant {name}: {k!r} cannot vary; choose from {VARIANT_FIELDS}")
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    over.setdefault("loss", "ce")
    if over["loss"] not in ("ce", "dpo"):
        raise ValueError(f"--variant {name}: loss must be ce or dpo")
    return name, over


def variants(out: Path) -> dict:
    """name -> overrides of every variant registered under ``OUT/variants`` (sorted by name)."""
    vd = out / "variants"
    if not vd.is_dir():
        return {}
    return {f.parent.name: json.loads(f.read_text()) for f in sorted(vd.glob("*/variant.json"))}


def register_variant(out: Path, name: str, over: dict) -> None:
    f = out / "variants" / name / "variant.json"
    if f.exists() and json.loads(f.read_text()) != over:
        raise SystemExit(f"{f} holds other settings ({f.read_text().strip()}); use another variant name")
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(over, sort_keys=True) + "\n")


def variant_plan(plan: Plan, over: dict) -> Plan:
    from dataclasses import replace

    return replace(plan, **{k: v for k, v in over.items() if k != "loss"})


def scorer_specs(plan: Plan, out: Path, policy, *, all_: bool = False, diagnostics: bool = False) -> dict:
    """name -> (policy, reference, beta) for every scorer (``--scorers`` only, unless ``all_``), in report order:
    the untrained baseline, the base run's CE and DPO PRMs, then each variant's PRM (``OUT/variants/NAME``);
    with ``diagnostics``, also each trained PRM's step-only reading ``NAME-policy-only`` (``DIAGNOSTIC_SUFFIX``)."""
    specs = {"untrained": (policy, None, DEFAULT_BETA),
             "ce": (str(out / "ce" / "final"), policy, plan.beta),
             "dpo": (str(out / "dpo" / "final"), policy, plan.beta)}
    for name, over in variants(out).items():
        specs[name] = (str(out / "variants" / name / over["loss"] / "final"), policy, variant_plan(plan, over).beta)
    if diagnostics:
        for name in [k for k in specs if k != "untrained"]:
            specs[name + DIAGNOSTIC_SUFFIX] = (specs[name][0], "none", DEFAULT_BETA)
    return {k: v for k, v in specs.items() if all_ or ONLY is None or k in ONLY}


# ------------------------------------------------------------------------------------------------ stages
def stage_data(plan, out, policy, probs) -> dict:
    from freeprm.eval.rollouts import make_rollouts

    t0 = time.perf_counter()
    s = make_rollouts(probs["train"], out / "data", k=plan.k, **gen_kwargs(plan, policy))
    log(f"data: {s['problems']} problems x {plan.k}: accuracy {s['rollout_accuracy']:.1%}, both labels "
        f"{s['problems_with_both_labels']:.0%}, {s['rows']} rows, {s['pairs']} pairs "
        f"({s['generation']['generated']} new rollouts, {time.perf_counter() - t0:.0f} s)")
    return s


def stage_train(plan, out, policy) -> dict:
    from freeprm.trainer import TrainConfig, train
    from freeprm.trainer.checkpoint import latest_checkpoint

    res = {}
    jobs = [(loss, loss, plan) for loss in ("ce", "dpo")]
    jobs += [(name, over["loss"], variant_plan(plan, over)) for name, over in variants(out).items()]
    for name, loss, p in jobs:
        if ONLY is not None and name not in ONLY:
            continue
        data = "rows.jsonl" if loss == "ce" else "pairs.jsonl"
        d = out / loss if name == loss else out / "variants" / name / loss
        if (d / "final").is_dir():
            log(f"train {name}: done ({d / 'final'})")
            continue
        if not (out / "data" / data).read_text().strip():
            log(f"train {name}: {out / 'data' / data} is empty (no problem had both labels?), skipped")
            continue
        cfg = TrainConfig(loss=loss, beta=p.beta, lr=p.lr, epochs=p.epochs, batch_size=p.batch_size,
                          grad_accum=p.grad_accum, warmup_ratio=0.1, train_last_layers=p.train_last_layers,
                          ce_balance=p.ce_balance if loss == "ce" else "none", seed=p.seed,
                          max_length=p.max_length, save_every=p.save_every, progress=False,
                          ref_cache_dir=str(out / "refcache"))
        t0 = time.perf_counter()
        resume = "auto" if d.is_dir() and latest_checkpoint(d) is not None else None
        r = train(policy, out / "data" / data, d, config=cfg, resume=resume, device="cpu")
        last = r.metrics[-4:]
        res[name] = {"steps": r.steps, "seconds": time.perf_counter() - t0,
                     "last_loss": float(np.mean([m["loss"] for m in last])) if last else None}
        log(f"train {name}: {r.steps} steps, {res[name]['seconds']:.0f} s, last losses {res[name]['last_loss']}")
    return res


def _scorer(spec):
    from freeprm.engine import Scorer

    policy, reference, beta = spec
    if reference != "none":
        return Scorer(policy, reference, beta=beta, dtype="float32", device="cpu")
    import warnings

    from freeprm.prm_meta import PRMMetaWarning

    with warnings.catch_warnings():  # a diagnostic reading of a trained PRM without its reference: on purpose
        warnings.simplefilter("ignore", PRMMetaWarning)
        return Scorer(policy, reference, beta=beta, dtype="float32", device="cpu")


def stage_steps(plan, out, policy, probs) -> None:
    from freeprm.eval.steps import arith_step_rows, score_step_rows
    from freeprm.eval.tasks import PROMPTS
    from freeprm.io import write_jsonl_atomic

    sd = out / "steps"
    sd.mkdir(parents=True, exist_ok=True)
    files = {"tune": sd / "tune.jsonl", "test": sd / "test.jsonl"}
    for name, key in (("tune", "step_tune"), ("test", "step_test")):
        if not files[name].exists():
            write_jsonl_atomic(files[name], arith_step_rows(probs[key], seed=plan.seed))
    rows = {k: [json.loads(x) for x in f.read_text().splitlines() if x.strip()] for k, f in files.items()}
    for name, spec in scorer_specs(plan, out, policy, diagnostics=True).items():
        f = sd / f"{name}.json"
        if f.exists():
            continue
        if name != "untrained" and not Path(spec[0]).is_dir():
            log(f"steps {name}: no trained model yet, skipped")
            continue
        t0 = time.perf_counter()
        sc = _scorer(spec)
        res = {k: score_step_rows(v, sc, prompt_template=PROMPTS["arith"]) for k, v in rows.items()}
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(res) + "\n")
        tmp.replace(f)
        log(f"steps {name}: {sum(map(len, rows.values()))} rows scored in {time.perf_counter() - t0:.0f} s")


def derive_scores(cands, td: Path, name: str, beta: float, tag: str, policy_only_scorer) -> dict:
    """Score ``cands`` for the trained PRM ``name`` (reference = the initial policy) at half the model work: its step
    reward is ``beta * (sum log pi - sum log pi_ref)`` over the step's tokens, a difference of two per-step sums, and
    ``sum log pi_ref`` per step is the untrained scorer's step reward (same model, beta 1, same steps). So only the
    trained policy runs (``policy_only_scorer()``: reference-free, beta 1, built only when there is work; into
    ``scores_NAME.policy.jsonl``); the PRM's lines are written from the two files under ``tag``, the tag a direct
    ``Scorer(path, policy, beta)`` run gives (``prm_tag``), and the aggregates recomputed from the derived step
    rewards (``freeprm.engine.results.aggregate_steps``). The files hold step rewards to 6 decimals, so a derived
    reward is within ``beta * 2e-6`` of the direct one (tested)."""
    from freeprm.engine import AGGREGATIONS
    from freeprm.engine.results import aggregate_steps
    from freeprm.eval.scoring import key_of, load_scores, score_candidates
    from freeprm.io import append_jsonl

    done = load_scores(td / f"scores_{name}.jsonl", tag)
    todo = [c for c in cands if key_of(c) not in done]
    if not todo:
        return {"scored": 0}
    score_candidates(todo, td / f"scores_{name}.policy.jsonl", scorer=policy_only_scorer(), progress=False)
    p_s, u_s = load_scores(td / f"scores_{name}.policy.jsonl"), load_scores(td / "scores_untrained.jsonl")
    lines = []
    for c in todo:
        k = key_of(c)
        if k not in u_s:  # the generating process scores it soon; a later pass derives it
            continue
        p, u = p_s[k]["step_rewards"], u_s[k]["step_rewards"]
        if len(p) != len(u):
            raise SystemExit(f"derived scores of {name}: candidate {k} has {len(p)} vs {len(u)} steps")
        st = beta * (torch.tensor(p, dtype=torch.float64) - torch.tensor(u, dtype=torch.float64))
        q = st.cumsum(0)
        lines.append({"problem_id": c["problem_id"], "candidate_id": c["candidate_id"], "scorer": tag,
                      "aggregates": {a: aggregate_steps(st, q, a) for a in AGGREGATIONS},
                      "step_rewards": [round(float(x), 6) for x in st], "num_tokens": p_s[k]["num_tokens"],
                      "derived": "beta * (policy-only - untrained) step rewards"})
    append_jsonl(td / f"scores_{name}.jsonl", lines)
    return {"scored": len(lines)}


def prm_tag(spec) -> str:
    """The scores-file tag of a direct ``Scorer`` run of ``spec`` (loads both models: call it once per scorer)."""
    from freeprm.eval.scoring import scorer_tag_of

    return scorer_tag_of(_scorer(spec))


DERIVE = False  # --derive


def stage_bon(plan, out, policy, probs, *, generate: bool = True) -> None:
    """Generate (unless ``generate=False``: score-only, for a second process beside the generating one) and score
    the test candidates chunk by chunk; with ``generate=False`` a chunk whose candidates are not all written yet
    ends the stage."""
    from freeprm.eval.candidates import generate_candidates, read_jsonl
    from freeprm.eval.scoring import score_candidates

    td = out / "test"
    test = probs["test"]
    specs = scorer_specs(plan, out, policy)
    scorers: dict = {}
    for i in range(0, len(test), plan.chunk):
        chunk = test[i:i + plan.chunk]
        t0 = time.perf_counter()
        ids = {p.problem_id for p in chunk}
        if generate:
            st = generate_candidates(chunk, td / "candidates.jsonl", n=plan.n, **gen_kwargs(plan, policy))
            gen = st["generated"]
        else:
            gen = 0
        cands = [c for c in read_jsonl(td / "candidates.jsonl") if c["problem_id"] in ids and c["candidate_id"] < plan.n]
        if not generate and len({(c["problem_id"], c["candidate_id"]) for c in cands}) < len(chunk) * plan.n:
            log(f"bon problems {i}-{i + len(chunk) - 1}: not all generated yet; score-only run stops here")
            break
        line = f"bon problems {i}-{i + len(chunk) - 1}: {gen} generated ({time.perf_counter() - t0:.0f} s)"
        for name, spec in specs.items():
            if name != "untrained" and not Path(spec[0]).is_dir():
                continue
            t1 = time.perf_counter()
            if DERIVE and name != "untrained" and spec[1] == policy:
                if name not in scorers:  # the tag once per process; the policy-only model when first needed
                    scorers[name] = (prm_tag(spec), functools.cache(partial(_scorer, (spec[0], "none", DEFAULT_BETA))))
                tag, policy_only = scorers[name]
                s = derive_scores(cands, td, name, spec[2], tag, policy_only)
                line += f"; {name}: {s['scored']} scored, derived ({time.perf_counter() - t1:.0f} s)"
                continue
            if name not in scorers:
                scorers[name] = _scorer(spec)
            s = score_candidates(cands, td / f"scores_{name}.jsonl", scorer=scorers[name], progress=False)
            line += f"; {name}: {s['scored']} scored ({time.perf_counter() - t1:.0f} s)"
        log(line)


# ------------------------------------------------------------------------------------------------ report
def paired_diff(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean of a - b over problems with a 95% percentile bootstrap CI (problems resampled together)."""
    d = np.asarray(a) - np.asarray(b)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "problems": len(d)}


def bon_report(plan, out, policy) -> dict | None:
    from freeprm.eval.candidates import read_jsonl
    from freeprm.eval.grading import group_answers
    from freeprm.eval.selection import CandidateSet, accuracy_at_n

    td = out / "test"
    if not (td / "candidates.jsonl").exists():
        return None
    specs = [n for n in scorer_specs(plan, out, policy, all_=True) if (td / f"scores_{n}.jsonl").exists()]
    scores = {n: {(s["problem_id"], s["candidate_id"]): s for s in read_jsonl(td / f"scores_{n}.jsonl")} for n in specs}
    by: dict = {}
    for c in read_jsonl(td / "candidates.jsonl"):
        if c["candidate_id"] < plan.n:
            by.setdefault(c["problem_id"], {})[c["candidate_id"]] = c
    probs = []
    for pid, cs in by.items():
        if len(cs) < plan.n or not all((pid, c) in scores[n] for n in specs for c in cs):
            continue  # only problems that every scorer has finished
        cands = [cs[c] for c in range(plan.n)]
        sc = {}
        for n in specs:
            for agg in AGGS:
                v = [scores[n][(pid, c)]["aggregates"].get(agg) for c in range(plan.n)]
                sc[f"{n}_{agg}"] = np.array([-math.inf if x is None else float(x) for x in v])
        probs.append(CandidateSet(pid, group_answers([c["answer"] for c in cands], "arith"),
                                  np.array([c["correct"] for c in cands]), sc))
    if not probs:
        return None
    methods = ["random", "majority"]
    for n in specs:
        methods += [f"bon:{n}_min", f"wmv:{n}_min:sigmoid", f"wmv:{n}_min:softmax"]
        if n != "untrained":  # the response reward (what CE fits: sigmoid(sum) = P(correct)) and the last step
            methods += [f"bon:{n}_sum", f"wmv:{n}_sum:sigmoid", f"bon:{n}_last"]
    methods.append("pass@N")
    ns = [x for x in (1, 2, 4, 8) if x <= plan.n]
    res = accuracy_at_n(probs, methods, ns, n_subsets=plan.n_subsets, n_bootstrap=plan.bootstrap, seed=0)
    table = {m: {n: {"acc": 100 * c.accuracy, "lo": 100 * c.ci_low, "hi": 100 * c.ci_high} for n, c in cells.items()}
             for m, cells in res.items()}
    diffs = {}
    for n in specs:
        if n == "untrained":
            continue
        for m in (f"wmv:{n}_min:sigmoid", f"wmv:{n}_min:softmax", f"wmv:{n}_sum:sigmoid"):
            diffs[m] = {k: {kk: 100 * v if kk != "problems" else v for kk, v in
                            paired_diff(res[m][k].per_problem, res["majority"][k].per_problem, plan.bootstrap, 1).items()}
                        for k in ns}
    return {"problems": len(probs), "candidates_per_problem": plan.n, "ns": ns, "methods": methods, "table": table,
            "paired_vs_majority": diffs, "candidate_accuracy": float(np.mean([p.correct.mean() for p in probs]))}


def steps_report(plan, out, policy) -> dict | None:
    from freeprm.eval.steps import bootstrap_f1, chance_metrics, evaluate_steps

    sd = out / "steps"
    if not (sd / "test.jsonl").exists():
        return None
    rows = {k: [json.loads(x) for x in (sd / f"{k}.jsonl").read_text().splitlines() if x.strip()] for k in ("tune", "test")}
    res = {}
    for name in scorer_specs(plan, out, policy, all_=True, diagnostics=True):
        f = sd / f"{name}.json"
        if not f.exists():
            continue
        rw = json.loads(f.read_text())
        r = evaluate_steps(rows["tune"], rows["test"], None, tune_rewards=rw["tune"], test_rewards=rw["test"])
        labels = [x["label"] for x in rows["test"]]
        lo, hi = bootstrap_f1(labels, r["predictions"], n_bootstrap=plan.bootstrap)
        # the lowest-reward step on the corrupted rows (the claim_small_scale measure)
        argmin = [int(np.argmin(t)) == x["label"] for t, x in zip(rw["test"], rows["test"]) if x["label"] >= 0]
        res[name] = {"threshold": r["threshold"], "test": r["test"], "tune": r["tune"], "f1_ci": [lo, hi],
                     "argmin_on_error": float(np.mean(argmin))}
    test = rows["test"]
    ch = chance_metrics([x["label"] for x in test], [len(x["steps"]) for x in test])
    bad = [x for x in test if x["label"] >= 0]
    res["chance"] = {"test": ch.to_dict(), "argmin_on_error": float(np.mean([1 / len(x["steps"]) for x in bad]))}
    res["rows"] = {"tune": len(rows["tune"]), "test": len(test), "test_erroneous": len(bad),
                   "mean_steps": float(np.mean([len(x["steps"]) for x in test]))}
    return res


LABELS = {"random": "random pick (pass@1)", "majority": "majority vote", "pass@N": "oracle (pass@N)"}
AGGS = ("min", "sum", "last")
AGG_LABELS = {"min": "min step reward", "sum": "response reward (sum of steps)", "last": "last step's reward"}


def _who(name: str) -> str:
    base = {"untrained": "untrained, reference-free", "ce": "trained CE PRM", "dpo": "trained DPO PRM"}
    return base.get(name) or f"config {name}"


def _label(m: str) -> str:
    if m in LABELS:
        return LABELS[m]
    parts = m.split(":")
    name, agg = parts[1].rsplit("_", 1)
    if parts[0] == "bon":
        return f"{_who(name)}: best-of-N, {AGG_LABELS[agg]}"
    return f"{_who(name)}: weighted vote ({parts[2]} of {AGG_LABELS[agg]})"


def write_report(plan, out, policy, argv, env, dropped, data_summary) -> dict:
    bon, steps = bon_report(plan, out, policy), steps_report(plan, out, policy)
    train_info = {}
    runs = [(loss, loss, out / loss, plan) for loss in ("ce", "dpo")]
    runs += [(name, over["loss"], out / "variants" / name / over["loss"], variant_plan(plan, over))
             for name, over in variants(out).items()]
    for name, loss, d, p in runs:
        mf = d / "metrics.jsonl"
        if mf.exists():
            ms = [json.loads(x) for x in mf.read_text().splitlines() if x.strip()]
            q = max(1, len(ms) // 4)
            train_info[name] = {"loss": loss, "beta": p.beta, "lr": p.lr, "epochs": p.epochs,
                                "train_last_layers": p.train_last_layers,
                                "ce_balance": p.ce_balance if loss == "ce" else "-",
                                "batch": f"{p.batch_size} x {p.grad_accum}",
                                "steps": len(ms), "final": (d / "final").is_dir(),
                                "first_quarter_loss": float(np.mean([m["loss"] for m in ms[:q]])) if ms else None,
                                "last_quarter_loss": float(np.mean([m["loss"] for m in ms[-q:]])) if ms else None,
                                "last_quarter_margin": float(np.mean([m.get("margin") or 0 for m in ms[-q:]])) if ms else None}
    doc = {"plan": asdict(plan), "argv": argv, "env": env, "dropped_overlap": dropped, "data": data_summary,
           "train": train_info, "bon": bon, "steps": steps}
    (out / "claim.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md = [f"# Implicit PRM from on-policy outcome labels, in miniature ({Path(str(policy)).name})", "",
          f"- command: `python bench/claim_onpolicy.py {' '.join(shlex.quote(a) for a in argv)}`",
          f"- device: {env['device']}, {env['threads']} threads; torch {env['torch']}, transformers {env['transformers']}; "
          f"git {env['git_sha']}; "
          f"{env['date']}",
          f"- task: generated arithmetic, levels {list(plan.levels)}{', single-digit add/sub steps' if plan.small else ''}; "
          f"policy sampled at temperature {plan.temperature}, top-p {plan.top_p}, <= {plan.max_new_tokens} new tokens",
          f"- train: {plan.n_train} problems (task seed {plan.train_seed}) x K={plan.k} rollouts; test: up to "
          f"{plan.n_test} held-apart problems (seed {plan.test_seed}) x N={plan.n} fresh rollouts; step rows: "
          f"{plan.n_step_tune} tune + {plan.n_step_test} test problems (levels {list(plan.step_levels)}"
          f"{', single-digit add/sub' if plan.step_small else ''}; seeds {plan.step_tune_seed}, "
          f"{plan.step_test_seed}); problems dropped for a question also in train: {dropped}", ""]
    if data_summary:
        d = data_summary
        md += ["## Training data (the policy's own graded rollouts)", "",
               f"{d['problems']} problems, {d['rollouts']} rollouts, accuracy {100 * d['rollout_accuracy']:.1f}%; "
               f"problems with both labels {100 * d['problems_with_both_labels']:.0f}% (all correct "
               f"{100 * d['problems_all_correct']:.0f}%, all wrong {100 * d['problems_all_wrong']:.0f}%); "
               f"{d['rows']} CE rows after dropping {d['duplicates_dropped']} duplicate responses "
               f"({d['rows_correct']} correct), {d['pairs']} DPO pairs.", ""]
    if train_info:
        md += ["## Training", "", "Each configuration trains on the same rows (CE) or pairs (DPO), reference = the "
               "initial policy (log-probs cached), warm-up 10%, cosine schedule; `ce` and `dpo` are the plan's "
               "settings, the others are variants (`--variant`).", "",
               "| configuration | loss | beta | lr | epochs | trained layers (last k) | CE balance | batch | steps | "
               "finished | loss, first quarter | loss, last quarter | margin, last quarter |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, v in train_info.items():
            md.append(f"| {k} | {v['loss']} | {v['beta']} | {v['lr']} | {v['epochs']} | {v['train_last_layers'] or 'all'} "
                      f"| {v['ce_balance']} | {v['batch']} | {v['steps']} | {v['final']} | {v['first_quarter_loss']:.4f} "
                      f"| {v['last_quarter_loss']:.4f} | {v['last_quarter_margin']:.4f} |")
        md.append("")
    if bon:
        md += ["## Best-of-N on held-apart problems", "",
               f"Accuracy (%) over **{bon['problems']} test problems** (of {plan.n_test} planned), {plan.n} fresh "
               f"rollouts each (candidate accuracy {100 * bon['candidate_accuracy']:.1f}%); mean over up to "
               f"{plan.n_subsets} N-subsets per problem; [95% bootstrap CI over problems, {plan.bootstrap} resamples].", "",
               "| method | " + " | ".join(f"N={n}" for n in bon["ns"]) + " |", "|---|" + "---|" * len(bon["ns"])]
        for m in bon["methods"]:
            cells = bon["table"][m]
            md.append(f"| {_label(m)} | " + " | ".join(
                f"{cells[n]['acc']:.1f} [{cells[n]['lo']:.1f}, {cells[n]['hi']:.1f}]" for n in bon["ns"]) + " |")
        md += ["", "Paired difference, trained PRM's weighted vote minus majority vote (percentage points, same "
               "problems and subsets; 95% bootstrap CI over problems):", "",
               "| weighted vote | " + " | ".join(f"N={n}" for n in bon["ns"]) + " |", "|---|" + "---|" * len(bon["ns"])]
        for m, cells in bon["paired_vs_majority"].items():
            md.append(f"| {_label(m)} | " + " | ".join(
                f"{cells[n]['mean']:+.1f} [{cells[n]['ci_low']:+.1f}, {cells[n]['ci_high']:+.1f}]" for n in bon["ns"]) + " |")
        md.append("")
        _plot(bon, out / "claim_bon.png", f"{bon['problems']} held-apart problems x {plan.n}")
        md += ["![best-of-N](claim_bon.png)", ""]
    if steps:
        r = steps["rows"]
        md += ["## Step-error localisation (ProcessBench format)", "",
               f"{r['test']} test rows ({r['test_erroneous']} corrupted gold solutions, the rest gold; "
               f"{r['mean_steps']:.2f} steps on average) of held-apart problems; threshold tuned for F1 on "
               f"{r['tune']} other rows. First error = first step whose reward is below the threshold.", "",
               "| scorer | threshold | acc. erroneous | acc. correct | F1 [95% CI] | lowest step = the corrupted one |",
               "|---|---|---|---|---|---|"]
        for name, v in steps.items():
            if name in ("rows", "chance"):
                continue
            t = v["test"]
            md.append(f"| {name} | {v['threshold']:.4g} | {100 * t['acc_error']:.1f}% | {100 * t['acc_correct']:.1f}% | "
                      f"{t['f1']:.3f} [{v['f1_ci'][0]:.3f}, {v['f1_ci'][1]:.3f}] | {100 * v['argmin_on_error']:.1f}% |")
        c = steps["chance"]
        md.append(f"| chance | - | {100 * c['test']['acc_error']:.1f}% | {100 * c['test']['acc_correct']:.1f}% | "
                  f"{c['test']['f1']:.3f} | {100 * c['argmin_on_error']:.1f}% |")
        md.append("")
    (out / "claim.md").write_text("\n".join(md) + "\n")
    return doc


def copy_results(out: Path, dest: Path) -> None:
    """The run's small files (no model weights) into ``dest`` (e.g. bench/results/claim_onpolicy)."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    names = ["claim.md", "claim.json", "claim_bon.png", "plan.json", "data/summary.json", "data/rollouts.jsonl",
             "ce/metrics.jsonl", "dpo/metrics.jsonl", "steps/tune.jsonl", "steps/test.jsonl", "steps/untrained.json",
             "steps/ce.json", "steps/dpo.json", "test/candidates.jsonl", "test/scores_untrained.jsonl",
             "test/scores_ce.jsonl", "test/scores_dpo.jsonl"]
    for name, over in variants(out).items():
        names += [f"variants/{name}/variant.json", f"variants/{name}/{over['loss']}/metrics.jsonl",
                  f"steps/{name}.json", f"test/scores_{name}.jsonl"]
    names += [f"steps/{name}.json" for name in scorer_specs(Plan(), out, None, all_=True, diagnostics=True)
              if name.endswith(DIAGNOSTIC_SUFFIX)]
    for n in names:
        if (out / n).exists():
            (dest / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / n, dest / n)
    log(f"results copied to {dest}")


def _plot(bon: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ns = bon["ns"]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for m in bon["methods"]:
        if m.startswith("bon:") and m.endswith("_last"):
            continue
        c = bon["table"][m]
        acc = [c[n]["acc"] for n in ns]
        (ln,) = ax.plot(ns, acc, "--" if m in ("random", "pass@N") else "-", marker="o", ms=3, label=_label(m))
        ax.fill_between(ns, [c[n]["lo"] for n in ns], [c[n]["hi"] for n in ns], color=ln.get_color(), alpha=0.1, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("N")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)



def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="smoke test: a tiny random model, a handful of problems")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--scorers", default=None, help="comma-separated subset of untrained,ce,dpo for the steps and bon "
                    "stages (default: every one whose model exists)")
    ap.add_argument("--results", default=None, help="after the report, copy the small result files (tables, plot, "
                    "plan, data summary, training metrics, step rows and rewards, test candidates and scores) here")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE,...",
                    help=f"register a training configuration to try beside the plan's ({', '.join(VARIANT_FIELDS)}; "
                    "e.g. --variant lr1e-4:lr=1e-4,epochs=3); its PRM is trained on the same data, scored on the same "
                    "step rows and test candidates, and reported as one more scorer. Registered variants stay in OUT")
    ap.add_argument("--score-only", action="store_true",
                    help="bon stage: score the candidates already generated, generate none (a second process can score "
                    "new scorers while another generates)")
    ap.add_argument("--derive", action="store_true",
                    help="bon stage: score a trained PRM (reference = the initial policy) by running only its policy and "
                    "subtracting the untrained scorer's step rewards (log pi_ref per step; derive_scores): half the work")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a plan field (JSON value), e.g. --set n_test=100 --set lr=1e-5")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global ONLY, DERIVE
    DERIVE = args.derive
    ONLY = set(args.scorers.split(",")) if args.scorers else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(**QUICK) if args.quick else Plan()
    for s in args.set:
        k, _, v = s.partition("=")
        if k not in Plan.__dataclass_fields__:
            ap.error(f"--set: unknown plan field {k!r}")
        try:
            val = json.loads(v)
        except json.JSONDecodeError:
            val = v
        setattr(plan, k, tuple(val) if isinstance(val, list) else val)
    saved = out / "plan.json"
    if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(asdict(plan))):
        ap.error(f"{saved} holds another plan; resume with the same options, or use a fresh --out")
    saved.write_text(json.dumps(asdict(plan), indent=1) + "\n")
    policy = plan.policy
    if args.quick:
        from freeprm.testing import make_tiny_model_dir

        policy = str(out / "tiny_policy")
        if not (Path(policy) / "config.json").exists():
            make_tiny_model_dir(policy, seed=0)
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; choose from {STAGES}")
    for v in args.variant:
        try:
            name, over = parse_variant(v)
        except ValueError as e:
            ap.error(str(e))
        register_variant(out, name, over)
    probs = problems(plan)
    env = env_info(torch.get_num_threads())
    data_summary = None
    if "data" in stages:
        data_summary = stage_data(plan, out, policy, probs)
    elif (out / "data" / "summary.json").exists():
        data_summary = json.loads((out / "data" / "summary.json").read_text())
    if "train" in stages:
        stage_train(plan, out, policy)
    if "steps" in stages:
        stage_steps(plan, out, policy, probs)
    if "bon" in stages:
        stage_bon(plan, out, policy, probs, generate=not args.score_only)
    doc = None
    if "report" in stages:
        if data_summary:
            data_summary = {k: v for k, v in data_summary.items() if k != "accuracy_per_problem"}
        doc = write_report(plan, out, policy, argv, env, probs["dropped"], data_summary)
        log(f"report: {out / 'claim.md'}")
        if args.results:
            copy_results(out, Path(args.results))
    return doc or {}


if __name__ == "__main__":
    main()

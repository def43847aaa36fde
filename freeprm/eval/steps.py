"""Step-error evaluation in ProcessBench's format (Zheng et al. 2024, arXiv 2412.06559).

Rows (JSONL, one object a line)::

    {"problem": str, "steps": [str, ...], "label": int}   # label: index of the first wrong step, -1 if none
    optional: "id", "generator", "final_answer_correct", "prompt" (the prompt the PRM scores under; default:
    ``prompt_template`` with ``{question}`` = problem), "meta"

The PRM scores each row's steps (``Scorer.score`` on ``{"prompt", "steps"}``: per-step rewards,
no full logits); the **predicted first error** is the first step whose reward is below a
threshold ``tau`` (``-1`` when none is). ``tau`` is tuned on one file (the value that maximizes
F1 there; ties go to the smallest) and applied unchanged to another. Reported, as ProcessBench does:

    acc_error   = share of rows with label >= 0 whose prediction equals the label
    acc_correct = share of rows with label == -1 predicted -1
    F1          = 2 * acc_error * acc_correct / (acc_error + acc_correct)   (0 when both are 0)

and a **chance** baseline: a prediction drawn uniformly from the ``n + 1`` outcomes of an
``n``-step row (``-1, 0, ..., n-1``), whose expected accuracies are the mean of ``1 / (n + 1)``
over the erroneous and over the correct rows; its F1 is computed from those. The rows of one
prompt are scored in one engine call with nothing else (``score_step_rows``), so a row's rewards,
and the metrics, do not depend on the other rows, their order or their number (tested). Generate rows with ``arith_step_rows`` / ``gsm8k_step_rows`` (corrupted gold solutions).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..io import load_jsonl

ROW_FIELDS = {"problem", "steps", "label"}
OPTIONAL_FIELDS = {"id", "generator", "final_answer_correct", "prompt", "meta"}


def load_step_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a ProcessBench-format file, checked; a bad line raises ``ValueError("PATH:LINE: ...")``."""
    rows = []
    for line, r in load_jsonl(path, on_error="raise"):
        where = f"{path}:{line}"
        unknown = sorted(set(r) - ROW_FIELDS - OPTIONAL_FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown}; a row has {sorted(ROW_FIELDS)} and optionally "
                             f"{sorted(OPTIONAL_FIELDS)}")
        missing = sorted(ROW_FIELDS - set(r))
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        steps, label = r["steps"], r["label"]
        if not isinstance(r["problem"], str) or not isinstance(steps, list) or not steps \
                or not all(isinstance(s, str) and s.strip() for s in steps):
            raise ValueError(f"{where}: 'problem' must be a string and 'steps' a non-empty list of non-empty strings")
        if isinstance(label, bool) or not isinstance(label, int) or not -1 <= label < len(steps):
            raise ValueError(f"{where}: 'label' must be -1 or a step index in 0..{len(steps) - 1}, got {label!r}")
        rows.append(r)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def first_below(step_rewards: Sequence[float], threshold: float) -> int:
    """Index of the first step whose reward is ``< threshold``, or -1."""
    for i, r in enumerate(step_rewards):
        if r < threshold:
            return i
    return -1


@dataclass
class StepMetrics:
    acc_error: float  # share of erroneous rows whose first error is found exactly
    acc_correct: float  # share of correct rows predicted error-free
    f1: float
    n_error: int
    n_correct: int

    def to_dict(self) -> dict:
        return {"acc_error": self.acc_error, "acc_correct": self.acc_correct, "f1": self.f1,
                "n_error": self.n_error, "n_correct": self.n_correct}


def harmonic(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def step_metrics(labels: Sequence[int], predictions: Sequence[int]) -> StepMetrics:
    """ProcessBench's accuracies and F1 (see the module docstring)."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels for {len(predictions)} predictions")
    err = [p == y for y, p in zip(labels, predictions) if y >= 0]
    cor = [p == -1 for y, p in zip(labels, predictions) if y < 0]
    a = sum(err) / len(err) if err else 0.0
    b = sum(cor) / len(cor) if cor else 0.0
    return StepMetrics(a, b, harmonic(a, b), len(err), len(cor))


def chance_metrics(labels: Sequence[int], n_steps: Sequence[int]) -> StepMetrics:
    """Expected accuracies of a uniform guess among the ``n + 1`` outcomes of each row, and their F1."""
    err = [1 / (n + 1) for y, n in zip(labels, n_steps) if y >= 0]
    cor = [1 / (n + 1) for y, n in zip(labels, n_steps) if y < 0]
    a = sum(err) / len(err) if err else 0.0
    b = sum(cor) / len(cor) if cor else 0.0
    return StepMetrics(a, b, harmonic(a, b), len(err), len(cor))


def tune_threshold(labels: Sequence[int], step_rewards: Sequence[Sequence[float]]) -> tuple[float, StepMetrics]:
    """The threshold with the highest F1 on these rows (smallest on ties) and its metrics.

    Candidates: every distinct step reward (``r < tau`` flags the steps below it) and one above
    the largest (every first step flagged); ``-inf`` flags nothing.
    """
    vals = sorted({float(x) for rs in step_rewards for x in rs})
    cands = [-math.inf] + vals + ([vals[-1] + max(1.0, abs(vals[-1])) * 1e-6] if vals else [])
    best = None
    for t in cands:
        m = step_metrics(labels, [first_below(rs, t) for rs in step_rewards])
        if best is None or m.f1 > best[1].f1:
            best = (t, m)
    return best


def score_step_rows(rows: Sequence[dict], scorer, *, prompt_template: str | None = None) -> list[list[float]]:
    """Per-step rewards of each row: ``Scorer.score`` on ``{"prompt", "steps"}``.

    The prompt is the row's ``prompt``, else ``prompt_template.format(question=problem)``, else the
    problem. The engine's float rounding depends on what shares its forward batch (padding, packing,
    a shared prompt: about 1e-5 relative), so the rows of one prompt (a gold solution and its corrupted
    copy) are scored in one engine call with nothing else: a row's rewards never depend on the other
    rows of the file, their order, or how many there are.
    """
    items = []
    for r in rows:
        prompt = r.get("prompt") or (prompt_template.format(question=r["problem"]) if prompt_template else r["problem"])
        items.append({"prompt": prompt, "steps": list(r["steps"])})
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it["prompt"], []).append(i)
    out: list[list[float] | None] = [None] * len(items)
    for idx in groups.values():
        for i, res in zip(idx, scorer.score([items[i] for i in idx])):
            out[i] = [float(x) for x in res.step_rewards]
    return out


def evaluate_steps(tune_rows: Sequence[dict], test_rows: Sequence[dict], scorer, *, prompt_template: str | None = None,
                   tune_rewards=None, test_rewards=None) -> dict:
    """Tune the threshold on ``tune_rows``, apply it to ``test_rows``; metrics of both, and chance on the test rows.

    ``tune_rewards`` / ``test_rewards``: precomputed step rewards (then ``scorer`` may be None).
    """
    tr = tune_rewards if tune_rewards is not None else score_step_rows(tune_rows, scorer, prompt_template=prompt_template)
    te = test_rewards if test_rewards is not None else score_step_rows(test_rows, scorer, prompt_template=prompt_template)
    tau, tune_m = tune_threshold([r["label"] for r in tune_rows], tr)
    labels = [r["label"] for r in test_rows]
    preds = [first_below(rs, tau) for rs in te]
    test_m = step_metrics(labels, preds)
    chance = chance_metrics(labels, [len(r["steps"]) for r in test_rows])
    return {"threshold": tau, "tune": tune_m.to_dict(), "test": test_m.to_dict(), "chance": chance.to_dict(),
            "predictions": preds, "test_rewards": te, "tune_rewards": tr}


def bootstrap_f1(labels: Sequence[int], predictions: Sequence[int], *, n_bootstrap: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of F1 over rows."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    rng = np.random.default_rng(seed)
    f1s = []
    for _ in range(n_bootstrap):
        i = rng.integers(0, len(labels), len(labels))
        f1s.append(step_metrics(labels[i].tolist(), predictions[i].tolist()).f1)
    a = (1 - confidence) / 2
    lo, hi = np.quantile(f1s, [a, 1 - a])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- row generators

def arith_step_rows(problems, *, seed: int = 0, deltas: Sequence[int] = (-3, -2, -1, 1, 2, 3)) -> list[dict]:
    """Per generated arith problem: its gold solution (label -1) and one corrupted copy (label = the corrupted step).

    The corrupted step is drawn among the calculation steps; its written result is off by a small
    delta and later steps carry the wrong value on (``tasks.arith_steps``). Problems where no
    corruption works are skipped (none in practice for levels 1-4).
    """
    from .tasks import arith_steps

    rng = random.Random(seed)
    rows = []
    for p in problems:
        gold = arith_steps(p)
        if gold is None:
            continue
        options = [(j, d) for j in range(len(gold) - 1) for d in deltas]
        rng.shuffle(options)
        bad = next(((j, s) for j, d in options if (s := arith_steps(p, (j, d))) is not None), None)
        if bad is None:
            continue
        rows.append({"id": f"{p.problem_id}-gold", "problem": p.question, "steps": gold, "label": -1})
        rows.append({"id": f"{p.problem_id}-bad", "problem": p.question, "steps": bad[1], "label": bad[0]})
    return rows


def gsm8k_step_rows(records: Sequence[dict], *, seed: int = 0, id_prefix: str = "gsm8k") -> list[dict]:
    """The same from GSM8K ``{question, answer}`` records (``freeprm.gsm8k.corrupt_steps``; lines are steps)."""
    from ..gsm8k import corrupt_steps, gold_steps

    rng = random.Random(seed)
    rows = []
    for i, r in enumerate(records):
        c = corrupt_steps(r["question"], r["answer"], rng)
        if c is None:
            continue
        rows.append({"id": f"{id_prefix}-{i}-gold", "problem": r["question"], "steps": gold_steps(r["answer"]), "label": -1})
        rows.append({"id": f"{id_prefix}-{i}-bad", "problem": r["question"], "steps": c.steps, "label": c.step_index})
    return rows

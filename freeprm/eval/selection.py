"""Best-of-N selection, (weighted) majority voting and accuracy@N with bootstrap CIs.

A *problem* here is a list of candidates, each with a voting key (``None`` when no answer was
extracted), a correctness flag and, for PRM methods, a score per engine aggregation.

Methods (names used in tables; ``<agg>`` is any of ``freeprm.engine.AGGREGATIONS``):
  * ``pass@N``          oracle: 1 if any candidate of the subset is correct;
  * ``random``          the expected accuracy of a uniformly random pick: ``select`` gives the
                        subset's mean correctness; ``accuracy_at_n`` uses its exact expectation
                        over subsets, the problem's mean correctness (the same for every N);
  * ``majority``        majority vote over answer keys (``vote`` without weights);
  * ``bon:<agg>``       the candidate with the highest score under ``<agg>`` (``bon:min`` is the
                        paper's best-of-N by lowest step reward); ties go to the earliest candidate;
  * ``wmv:<agg>:<w>``   weighted majority vote: each answer's weight is the sum over its
                        candidates of ``w(score)``, ``w`` one of ``raw`` (the score itself),
                        ``sigmoid`` (``1 / (1 + exp(-score))``) or ``softmax`` (``exp(score -
                        max)`` over the subset, i.e. the subset's softmax).

Candidates without an extracted answer never win a vote; ``bon`` can pick one (it is wrong).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

WEIGHTINGS = ("raw", "sigmoid", "softmax")


def vote(answers: Sequence[Hashable | None], weights: Sequence[float] | None = None) -> Hashable | None:
    """The answer with the largest total weight (count when ``weights`` is None).

    ``None`` answers (nothing extracted) do not vote; returns ``None`` if no answer votes.
    Ties are broken deterministically: larger total weight, then more votes, then the answer
    whose first occurrence in ``answers`` comes first. (So with equal weights, the earliest answer
    of the most common ones wins.) Weights must be finite; they may be negative (``raw`` scores).
    """
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"weights has {len(weights)} entries for {len(answers)} answers")
    totals: dict[Hashable, list] = {}  # answer -> [weight, count, first index]
    for i, a in enumerate(answers):
        if a is None:
            continue
        w = 1.0 if weights is None else float(weights[i])
        if not math.isfinite(w):
            raise ValueError(f"weight {i} is {w}; weights must be finite")
        t = totals.setdefault(a, [0.0, 0, i])
        t[0] += w
        t[1] += 1
    if not totals:
        return None
    return min(totals, key=lambda a: (-totals[a][0], -totals[a][1], totals[a][2]))


def weights_from_scores(scores: np.ndarray, weighting: str) -> np.ndarray:
    """Per-candidate voting weights from scores (``-inf`` for unscored candidates gives weight 0)."""
    s = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(s)
    if weighting == "raw":
        return np.where(finite, s, 0.0)
    if weighting == "sigmoid":
        out = np.zeros_like(s)
        out[finite] = 1.0 / (1.0 + np.exp(-s[finite]))
        return out
    if weighting == "softmax":
        if not finite.any():
            return np.zeros_like(s)
        z = np.where(finite, s - s[finite].max(), -np.inf)
        e = np.exp(z)
        return e / e.sum()
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


@dataclass
class CandidateSet:
    """The candidates of one problem, ready for selection."""

    problem_id: str
    keys: list  # voting key per candidate (None: no answer)
    correct: np.ndarray  # [C] bool
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # aggregation -> [C] float (-inf: unscored)

    def __post_init__(self):
        self.correct = np.asarray(self.correct, dtype=bool)
        if len(self.keys) != len(self.correct):
            raise ValueError(f"problem {self.problem_id}: {len(self.keys)} keys for {len(self.correct)} candidates")
        for name, s in self.scores.items():
            s = np.asarray(s, dtype=np.float64)
            if s.shape != self.correct.shape:
                raise ValueError(f"problem {self.problem_id}: scores {name!r} has {s.shape[0]} entries for "
                                 f"{len(self.correct)} candidates")
            self.scores[name] = np.where(np.isnan(s), -np.inf, s)
        # correctness of each key (all candidates of a key are graded the same; take any)
        self.key_correct = {}
        for k, c in zip(self.keys, self.correct):
            if k is not None:
                self.key_correct[k] = self.key_correct.get(k, False) or bool(c)

    def __len__(self):
        return len(self.keys)


def parse_method(method: str) -> tuple[str, str | None, str | None]:
    """``"wmv:min:sigmoid"`` -> ``("wmv", "min", "sigmoid")``; validates the form."""
    parts = method.split(":")
    kind = parts[0]
    if kind in ("pass@N", "random", "majority") and len(parts) == 1:
        return kind, None, None
    if kind == "bon" and len(parts) == 2:
        return kind, parts[1], None
    if kind == "wmv" and len(parts) == 3 and parts[2] in WEIGHTINGS:
        return kind, parts[1], parts[2]
    raise ValueError(f"unknown method {method!r}: use pass@N, random, majority, bon:<aggregation> or "
                     f"wmv:<aggregation>:<{'|'.join(WEIGHTINGS)}>")


def select(problem: CandidateSet, idx: Sequence[int], method: str) -> float:
    """Accuracy (0/1, or an expectation for ``random``) of ``method`` on the candidates ``idx``."""
    kind, agg, weighting = parse_method(method)
    idx = np.asarray(idx, dtype=np.int64)
    correct = problem.correct[idx]
    if kind == "pass@N":
        return float(correct.any())
    if kind == "random":
        return float(correct.mean())
    keys = [problem.keys[i] for i in idx]
    if kind == "majority":
        win = vote(keys)
        return float(problem.key_correct.get(win, False)) if win is not None else 0.0
    if agg not in problem.scores:
        raise ValueError(f"method {method!r} needs scores {agg!r}; problem {problem.problem_id} has "
                         f"{sorted(problem.scores) or 'none'} (run the score stage)")
    s = problem.scores[agg][idx]
    if kind == "bon":
        return float(correct[int(np.argmax(s))])  # argmax: first of the tied maxima
    w = weights_from_scores(s, weighting)
    win = vote(keys, w.tolist())
    return float(problem.key_correct.get(win, False)) if win is not None else 0.0


def default_ns(n_max: int) -> list[int]:
    """1, 2, 4, ..., up to ``n_max`` (and ``n_max`` itself if it is not a power of two)."""
    if n_max < 1:
        raise ValueError("need at least one candidate per problem")
    ns, n = [], 1
    while n <= n_max:
        ns.append(n)
        n *= 2
    if ns[-1] != n_max:
        ns.append(n_max)
    return ns


def subsets(n_total: int, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``[k', n]`` candidate indices: all ``n``-subsets of ``range(n_total)`` when there are at most
    ``k`` of them (exact, in order; the rng is not used), else ``k`` random ones."""
    if math.comb(n_total, n) <= k:
        return np.array(list(itertools.combinations(range(n_total), n)), dtype=np.int64).reshape(-1, n)
    return np.stack([rng.choice(n_total, size=n, replace=False) for _ in range(k)])


@dataclass
class Cell:
    accuracy: float  # mean over problems of the per-problem mean over subsets, in [0, 1]
    ci_low: float
    ci_high: float
    per_problem: np.ndarray  # [P]


def accuracy_at_n(
    problems: Sequence[CandidateSet],
    methods: Sequence[str],
    ns: Sequence[int] | None = None,
    *,
    n_subsets: int = 100,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[int, Cell]]:
    """Accuracy@N of each method: ``{method: {N: Cell}}``.

    For each problem and N, ``n_subsets`` random N-subsets of its candidates are drawn, or all of
    them when there are no more than ``n_subsets`` (then the value is exact); the same subsets
    for every method, so methods are compared on the same draws. The problem's accuracy is the
    mean over them. The CI is a percentile bootstrap over problems (``n_bootstrap``
    resamples), so it reflects problem sampling, the dominant source of variance. Deterministic
    for a given ``seed``. N above the smallest candidate count of any problem is refused.
    """
    if not problems:
        raise ValueError("no problems to evaluate")
    n_min = min(len(p) for p in problems)
    ns = list(ns) if ns else default_ns(n_min)
    if max(ns) > n_min or min(ns) < 1:
        raise ValueError(f"N must be in 1..{n_min} (the fewest candidates any problem has); got {ns}")
    for m in methods:
        parse_method(m)
    rng = np.random.default_rng(seed)
    per = {m: {n: np.zeros(len(problems)) for n in ns} for m in methods}
    for pi, prob in enumerate(problems):
        for n in ns:
            idxs = subsets(len(prob), n, n_subsets, rng)
            for m in methods:
                if m == "random":  # its expectation over subsets and picks is exact: the mean correctness
                    per[m][n][pi] = float(prob.correct.mean())
                else:
                    per[m][n][pi] = float(np.mean([select(prob, idx, m) for idx in idxs]))
    boot = np.random.default_rng(seed + 1).integers(0, len(problems), size=(n_bootstrap, len(problems)))
    alpha = (1.0 - confidence) / 2
    out: dict[str, dict[int, Cell]] = {}
    for m in methods:
        out[m] = {}
        for n in ns:
            vals = per[m][n]
            means = vals[boot].mean(axis=1)
            lo, hi = np.quantile(means, [alpha, 1 - alpha])
            out[m][n] = Cell(float(vals.mean()), float(lo), float(hi), vals)
    return out


def default_methods(aggregations: Sequence[str] = ("min",), weightings: Sequence[str] = WEIGHTINGS,
                    scored: bool = True) -> list[str]:
    """The table's rows: random, majority, then bon/wmv per aggregation, then the pass@N oracle."""
    methods = ["random", "majority"]
    if scored:
        for agg in aggregations:
            methods.append(f"bon:{agg}")
            methods += [f"wmv:{agg}:{w}" for w in weightings]
    methods.append("pass@N")
    return methods

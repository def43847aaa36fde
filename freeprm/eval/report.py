"""Best-of-N reports: build problems from candidates + scores, a methods x N table (markdown +
JSON, like Table 1 of arXiv 2412.01981) and a PNG of accuracy vs N per method.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .grading import group_answers
from .selection import CandidateSet, Cell, accuracy_at_n, default_methods, parse_method
from .tasks import GRADER_TASK

METHOD_LABELS = {"random": "random pick (pass@1)", "majority": "majority vote", "pass@N": "pass@N (oracle)"}


def method_label(method: str) -> str:
    if method in METHOD_LABELS:
        return METHOD_LABELS[method]
    kind, agg, w = parse_method(method)
    if kind == "bon":
        return f"best-of-N, {agg} step reward" if agg in ("min", "last", "mean", "sum") else f"best-of-N, {agg}"
    return f"weighted vote, {agg}, {w} weights"


def build_problems(candidates: Sequence[dict], scores: dict[tuple[str, int], dict] | None = None,
                   aggregations: Sequence[str] = ()) -> list[CandidateSet]:
    """Group candidate records by problem (candidate_id order) into ``selection.CandidateSet`` objects.

    Voting keys come from ``grading.group_answers`` (equivalent MATH answers merged). When
    ``aggregations`` are asked for, every candidate must have a score line in ``scores``.
    """
    by_problem: dict[str, list[dict]] = {}
    for c in candidates:
        by_problem.setdefault(str(c["problem_id"]), []).append(c)
    out = []
    for pid, cands in by_problem.items():
        cands = sorted(cands, key=lambda c: int(c["candidate_id"]))
        task = GRADER_TASK.get(cands[0].get("task"), cands[0].get("task") or "math")
        keys = group_answers([c.get("answer") for c in cands], task)
        correct = [bool(c["correct"]) for c in cands]
        sc = {}
        for agg in aggregations:
            vals = []
            for c in cands:
                line = (scores or {}).get((pid, int(c["candidate_id"])))
                if line is None:
                    raise ValueError(f"candidate ({pid}, {c['candidate_id']}) has no score; run the score stage")
                v = line["aggregates"].get(agg)
                vals.append(-math.inf if v is None else float(v))
            sc[agg] = np.array(vals)
        out.append(CandidateSet(pid, keys, np.array(correct), sc))
    return out


def build_table(problems: Sequence[CandidateSet], methods: Sequence[str] | None = None, ns: Sequence[int] | None = None, *,
                n_subsets: int = 100, n_bootstrap: int = 1000, seed: int = 0, meta: dict | None = None) -> dict:
    """The JSON-ready table: ``{"meta", "ns", "methods": [{"method", "label", "cells": {N: {...}}}]}``."""
    if methods is None:
        aggs = sorted(problems[0].scores) if problems and problems[0].scores else []
        methods = default_methods(aggs or ("min",), scored=bool(aggs))
    res = accuracy_at_n(problems, methods, ns, n_subsets=n_subsets, n_bootstrap=n_bootstrap, seed=seed)
    ns_used = sorted(next(iter(res.values())))
    rows = []
    for m in methods:
        cells = {str(n): _cell_json(res[m][n]) for n in ns_used}
        rows.append({"method": m, "label": method_label(m), "cells": cells})
    n_cands = [len(p) for p in problems]
    info = {"problems": len(problems), "candidates_per_problem": min(n_cands), "n_subsets": n_subsets,
            "n_bootstrap": n_bootstrap, "seed": seed, "confidence": 0.95,
            "answer_extracted_rate": float(np.mean([k is not None for p in problems for k in p.keys])),
            "candidate_accuracy": float(np.mean([c for p in problems for c in p.correct]))}
    info.update(meta or {})
    return {"meta": info, "ns": ns_used, "methods": rows}


def _cell_json(c: Cell) -> dict:
    return {"accuracy": round(100 * c.accuracy, 2), "ci_low": round(100 * c.ci_low, 2), "ci_high": round(100 * c.ci_high, 2)}


def table_markdown(table: dict, title: str | None = None) -> str:
    """Methods x N, accuracy in % with the 95% bootstrap CI under it."""
    ns = table["ns"]
    meta = table["meta"]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append(f"Accuracy (%) over {meta['problems']} problems, {meta['candidates_per_problem']} candidates each; "
                 f"mean over {meta['n_subsets']} random N-subsets per problem; [95% bootstrap CI over problems, "
                 f"{meta['n_bootstrap']} resamples, seed {meta['seed']}].")
    lines.append("")
    lines.append("| method | " + " | ".join(f"N={n}" for n in ns) + " |")
    lines.append("|---|" + "---|" * len(ns))
    for row in table["methods"]:
        cells = [row["cells"][str(n)] for n in ns]
        lines.append(f"| {row['label']} | " + " | ".join(
            f"{c['accuracy']:.1f} [{c['ci_low']:.1f}, {c['ci_high']:.1f}]" for c in cells) + " |")
    lines.append("")
    return "\n".join(lines)


def plot_table(table: dict, path: str | os.PathLike, title: str | None = None) -> str:
    """Accuracy vs N (log2 axis) per method with shaded CIs; written as PNG with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ns = table["ns"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for row in table["methods"]:
        acc = [row["cells"][str(n)]["accuracy"] for n in ns]
        lo = [row["cells"][str(n)]["ci_low"] for n in ns]
        hi = [row["cells"][str(n)]["ci_high"] for n in ns]
        style = "--" if row["method"] in ("pass@N", "random") else "-"
        (line,) = ax.plot(ns, acc, style, marker="o", ms=3.5, label=row["label"])
        ax.fill_between(ns, lo, hi, color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("N (candidates per problem)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(textwrap.fill(title or "best-of-N accuracy", 60), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # keeps the outside legend and a long title
    plt.close(fig)
    return str(path)


def write_report(table: dict, out_dir: str | os.PathLike, *, prefix: str = "bon", title: str | None = None) -> dict:
    """Write ``<prefix>_table.md``, ``<prefix>_table.json`` and ``<prefix>_plot.png``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / f"{prefix}_table.md", "json": out_dir / f"{prefix}_table.json",
             "png": out_dir / f"{prefix}_plot.png"}
    paths["md"].write_text(table_markdown(table, title))
    paths["json"].write_text(json.dumps(table, indent=2) + "\n")
    plot_table(table, paths["png"], title)
    return {k: str(v) for k, v in paths.items()}

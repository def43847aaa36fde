"""On-policy training data: K graded rollouts per problem -> ``{"prompt", "response", "label"}`` rows and DPO pairs.

The paper's data recipe (arXiv 2412.01981, section 3): sample the policy on problems with known
answers, grade each outcome, and train the implicit PRM on the response labels only. This module
is that recipe on top of the best-of-N code, not a copy of it:

* sampling and grading are ``candidates.generate_candidates`` (the same batching, seeding, stop
  strings, prompt formatting, graders and vLLM path as ``freeprm bon generate``); the rollouts are
  its candidates file, ``OUT/rollouts.jsonl`` (schema in docs/eval.md), appended batch by batch,
  so a killed run resumes where it stopped (a cut last line is dropped with a warning naming the
  file and line; any other bad line is an error naming them);
* the training files are derived from the rollouts on every run, written atomically:
  ``rows.jsonl`` (``{"prompt", "response", "label", "problem_id"}``; identical responses to the
  same prompt kept once), ``pairs.jsonl`` (``{"prompt", "chosen", "rejected", "problem_id"}``: per
  problem each correct response with an incorrect one, seeded, ``freeprm.trainer.data.pair_labeled``,
  the trainer's own pairing) and ``summary.json``.

``freeprm train --data OUT/rows.jsonl`` (CE, KTO) or ``--data OUT/pairs.jsonl --loss dpo`` trains on them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..io import write_jsonl_atomic
from .candidates import generate_candidates, read_jsonl_lines
from .records import key_of
from .tasks import Problem

ROLLOUTS, ROWS, PAIRS, SUMMARY = "rollouts.jsonl", "rows.jsonl", "pairs.jsonl", "summary.json"


def load_rollouts(path: str | os.PathLike) -> list[dict]:
    """The rollout records of ``path`` (last record per ``(problem_id, candidate_id)``), strict.

    A cut last line (a write killed mid-line) is dropped with a warning; any other bad line or a
    record without the fields the rows need raises ``ValueError("PATH:LINE: ...")``.
    """
    latest: dict = {}
    for line, r in read_jsonl_lines(path):
        missing = [k for k in ("problem_id", "candidate_id", "prompt", "response", "correct") if k not in r]
        if missing:
            raise ValueError(f"{path}:{line}: rollout record lacks {missing}; delete the line (it is regenerated) "
                             "or the file")
        try:
            latest[key_of(r)] = r
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{line}: candidate_id must be an integer, got {r['candidate_id']!r}") from None
    return list(latest.values())


def training_rows(rollouts: Sequence[dict]) -> tuple[list[dict], int]:
    """``({"prompt", "response", "label", "problem_id"} rows, number of duplicates dropped)``.

    Rows follow the rollouts' order (problem, then candidate id); a response identical to an
    earlier one of the same problem and prompt is dropped (its grade is the same).
    """
    seen: set = set()
    rows, dups = [], 0
    for r in sorted(rollouts, key=lambda r: (str(r["problem_id"]), int(r["candidate_id"]))):
        k = (str(r["problem_id"]), r["prompt"], r["response"])
        if k in seen:
            dups += 1
            continue
        seen.add(k)
        if not r["response"].strip():
            continue  # an empty rollout is no training text
        rows.append({"prompt": r["prompt"], "response": r["response"], "label": int(bool(r["correct"])),
                     "problem_id": str(r["problem_id"])})
    return rows, dups


def dpo_pairs(rows: Sequence[dict], *, seed: int = 0) -> list[dict]:
    """Per problem, each correct response with an incorrect one (``trainer.data.pair_labeled``: seeded shuffle, zip)."""
    from ..trainer.data import Labeled, pair_labeled

    pid = {}
    labeled = []
    for i, r in enumerate(rows):
        labeled.append(Labeled(r["prompt"], r["response"], float(r["label"]), i + 1))
        pid[r["prompt"]] = r["problem_id"]
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "problem_id": pid[p.prompt]}
            for p in pair_labeled(labeled, seed=seed)]


def summarize(rollouts: Sequence[dict], rows: Sequence[dict], pairs: Sequence[dict], dups: int) -> dict:
    """Accuracy per problem, the share of problems with both labels, counts."""
    by: dict[str, list[bool]] = {}
    for r in rollouts:
        by.setdefault(str(r["problem_id"]), []).append(bool(r["correct"]))
    acc = {p: sum(v) / len(v) for p, v in by.items()}
    n = max(len(by), 1)
    return {"problems": len(by), "rollouts": len(rollouts), "rollout_accuracy": sum(map(sum, by.values())) / max(len(rollouts), 1),
            "problems_all_correct": sum(a == 1 for a in acc.values()) / n,
            "problems_all_wrong": sum(a == 0 for a in acc.values()) / n,
            "problems_with_both_labels": sum(0 < a < 1 for a in acc.values()) / n,
            "rows": len(rows), "rows_correct": sum(r["label"] for r in rows), "duplicates_dropped": dups,
            "pairs": len(pairs), "accuracy_per_problem": acc}


def make_rollouts(problems: Sequence[Problem], out_dir: str | os.PathLike, *, k: int = 4, pair_seed: int = 0,
                  **generate_kwargs) -> dict:
    """Sample ``k`` rollouts per problem into ``out_dir/rollouts.jsonl`` (resuming), then write the training files.

    ``generate_kwargs`` go to ``candidates.generate_candidates`` (``model``, ``temperature``, ``top_p``,
    ``max_new_tokens``, ``seed``, ``batch_size``, ``backend``, ``stop``, ``prompt_format``, ...).
    Returns the summary (also ``out_dir/summary.json``) with the generation stats under ``"generation"``.
    """
    if k < 1:
        raise ValueError(f"k (rollouts per problem) must be >= 1, got {k}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    st = generate_candidates(problems, out / ROLLOUTS, n=k, **generate_kwargs)
    wanted = {p.problem_id for p in problems}
    rollouts = [r for r in load_rollouts(out / ROLLOUTS) if str(r["problem_id"]) in wanted and int(r["candidate_id"]) < k]
    rows, dups = training_rows(rollouts)
    pairs = dpo_pairs(rows, seed=pair_seed)
    write_jsonl_atomic(out / ROWS, rows)
    write_jsonl_atomic(out / PAIRS, pairs)
    summary = summarize(rollouts, rows, pairs, dups)
    summary["generation"] = st
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    return summary

"""Candidate records: the schema of one line of the candidates file, built, validated and keyed.

Schema (see docs/eval.md)::

    problem_id, candidate_id (int), task, prompt, response, steps (list[str]),
    answer (extracted, or null), correct (bool), gold, [gen (dict of generation settings)]
"""

from __future__ import annotations

from collections.abc import Iterable

from ..config import DEFAULT_STEP_DELIMITER
from ..engine.steps import split_steps
from .grading import grade
from .tasks import GRADER_TASK, Problem

REQUIRED_FIELDS = ("problem_id", "candidate_id", "prompt", "response")


def key_of(record: dict) -> tuple[str, int]:
    return str(record["problem_id"]), int(record["candidate_id"])


def latest_by_key(records: Iterable[dict]) -> dict[tuple[str, int], dict]:
    """The last record of each (problem_id, candidate_id), in first-seen order."""
    out: dict[tuple[str, int], dict] = {}
    for r in records:
        out[key_of(r)] = r
    return out


def split_response_steps(response: str, step_delimiter: str | None = DEFAULT_STEP_DELIMITER) -> list[str]:
    """The response's steps as strings (the engine's segmentation), ``[]`` for an empty response."""
    if not response.strip():
        return []
    return [response[a:b] for a, b in split_steps(response, step_delimiter=step_delimiter)]


def make_record(problem: Problem, candidate_id: int, prompt: str, response: str, *,
                step_delimiter: str | None = DEFAULT_STEP_DELIMITER, gen: dict | None = None) -> dict:
    """One candidates-file record: steps split, answer extracted and graded."""
    answer, correct = grade(response, problem.gold, problem.grader_task)
    rec = {"problem_id": problem.problem_id, "candidate_id": int(candidate_id), "task": problem.task,
           "prompt": prompt, "response": response, "steps": split_response_steps(response, step_delimiter),
           "answer": answer, "correct": bool(correct), "gold": problem.gold}
    if gen:
        rec["gen"] = gen
    return rec


def validate_record(rec: dict, where: str = "") -> dict:
    """Check a (possibly user-made) record; fill ``steps`` / ``answer`` / ``correct`` when missing and gradable."""
    missing = [k for k in REQUIRED_FIELDS if k not in rec]
    if missing:
        raise ValueError(f"{where}candidate record lacks {missing}; required: {list(REQUIRED_FIELDS)}")
    if not isinstance(rec["response"], str) or not isinstance(rec["prompt"], str):
        raise ValueError(f"{where}'prompt' and 'response' must be strings")
    try:
        rec["candidate_id"] = int(rec["candidate_id"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}candidate_id must be an integer, got {rec['candidate_id']!r}") from None
    rec["problem_id"] = str(rec["problem_id"])
    if "steps" not in rec or rec["steps"] is None:
        rec["steps"] = split_response_steps(rec["response"])
    if "answer" not in rec or "correct" not in rec:
        task, gold = rec.get("task"), rec.get("gold")
        if task not in GRADER_TASK or gold is None:
            raise ValueError(f"{where}record has no 'answer'/'correct' and no 'task' ({'|'.join(GRADER_TASK)}) "
                             "+ 'gold' to grade it with")
        rec["answer"], rec["correct"] = grade(rec["response"], gold, GRADER_TASK[task])
    rec["correct"] = bool(rec["correct"])
    return rec

"""Evaluation tasks: GSM8K and MATH-500 from JSONL files, and generated arithmetic word problems.

Data files are looked up in ``data_dir``, else ``$FREEPRM_DATA``, else ``../shared/data``
relative to the repository root (``gsm8k_test.jsonl``, ``gsm8k_train.jsonl``, ``math500.jsonl``;
see that folder's README for provenance).

``arith`` problems are generated, seeded and of graded difficulty: a quantity goes through
``level`` events (gets more, gives away, buys packs, shares equally, doubles), with numbers
below ``10 * level``. Level 1 is one single-digit addition or subtraction; level 4 chains four
steps.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..gsm8k import data_dir as _shared_data_dir
from ..io import load_jsonl
from .grading import gold_from_gsm8k

TASK_NAMES = ("gsm8k", "math500", "arith")
GRADER_TASK = {"gsm8k": "gsm8k", "math500": "math", "arith": "arith"}  # task name -> grading.TASKS entry

_NUMERIC_PROMPT = (
    "Solve the math word problem step by step. Put a blank line between steps and finish with "
    "\"The answer is\" followed by the number.\n\n"
    "Example:\n"
    "Question: Mia has 4 pens. Then Mia buys 3 packs of pens with 2 pens in each pack. How many pens does Mia have now?\n"
    "Answer:\nMia buys 3 * 2 = 6 pens.\n\nShe has 4 + 6 = 10 pens now.\n\nThe answer is 10.\n\n"
    "Question: {question}\nAnswer:")

PROMPTS = {  # user prompts: one worked example shows the step format and the answer line
    "gsm8k": _NUMERIC_PROMPT,
    "arith": _NUMERIC_PROMPT,
    "math500": ("{question}\n\nSolve the problem step by step. Put a blank line between steps, "
                "and put the final answer in \\boxed{{}}."),
}


@dataclass
class Problem:
    problem_id: str
    task: str  # one of TASK_NAMES
    question: str
    gold: str  # reference final answer
    meta: dict = field(default_factory=dict)

    @property
    def grader_task(self) -> str:
        return GRADER_TASK[self.task]

    def prompt(self, template: str | None = None) -> str:
        """The user prompt: ``template`` (default ``PROMPTS[task]``) with ``{question}`` filled in."""
        return (template or PROMPTS[self.task]).format(question=self.question)


default_data_dir = _shared_data_dir  # $FREEPRM_DATA, else ../shared/data beside the repository


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"data file not found: {path}; pass --data-dir / data_dir=, or set FREEPRM_DATA")
    return [obj for _, obj in load_jsonl(path, on_error="raise")]


def _take(rows: list, limit: int | None, offset: int, shuffle_seed: int | None) -> list:
    idx = list(range(len(rows)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(idx)
    idx = idx[offset:]
    if limit is not None:
        idx = idx[:limit]
    return [(i, rows[i]) for i in idx]


def load_gsm8k(split: str = "test", *, limit: int | None = None, offset: int = 0, shuffle_seed: int | None = None,
               data_dir: str | os.PathLike | None = None) -> list[Problem]:
    """GSM8K problems (``problem_id`` = ``gsm8k-<split>-<line index>``), gold = the ``####`` number.

    (The raw ``{question, answer}`` records: ``freeprm.gsm8k.read_gsm8k``.)
    """
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    rows = _read_jsonl(Path(data_dir or default_data_dir()) / f"gsm8k_{split}.jsonl")
    return [Problem(f"gsm8k-{split}-{i}", "gsm8k", r["question"], gold_from_gsm8k(r["answer"]),
                    {"solution": r["answer"]}) for i, r in _take(rows, limit, offset, shuffle_seed)]


def load_math500(*, limit: int | None = None, offset: int = 0, shuffle_seed: int | None = None,
                 data_dir: str | os.PathLike | None = None) -> list[Problem]:
    """MATH-500 problems (``problem_id`` = the ``unique_id``, e.g. ``test/precalculus/807.json``)."""
    rows = _read_jsonl(Path(data_dir or default_data_dir()) / "math500.jsonl")
    return [Problem(r["unique_id"], "math500", r["problem"], r["answer"],
                    {"subject": r["subject"], "level": r["level"], "solution": r["solution"]})
            for _, r in _take(rows, limit, offset, shuffle_seed)]


# --------------------------------------------------------------------------- generated arithmetic

_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Isla", "Jack", "Lily", "Max", "Nora",
          "Omar", "Priya", "Sam", "Tara", "Yuki"]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards", "books", "coins"]


def _events(rng: random.Random, level: int, start: int, item: str, name: str) -> tuple[list[str], int]:
    x, sentences = start, []
    hi = 10 * level - 1  # level 1: single-digit numbers
    kinds = ["add", "sub"] if level == 1 else ["add", "sub", "packs", "share", "double"]
    for _ in range(level):
        kind = rng.choice(kinds)
        if kind == "share":
            divisors = [d for d in range(2, 7) if x % d == 0 and x // d > 0]
            if not divisors:
                kind = "add"
        if kind == "sub" and x < 2:
            kind = "add"
        if kind == "add":
            k = rng.randint(1, hi)
            x += k
            sentences.append(rng.choice([f"Then {name} gets {k} more {item}.", f"A friend gives {name} {k} more {item}."]))
        elif kind == "sub":
            k = rng.randint(1, min(x - 1, hi))
            x -= k
            sentences.append(rng.choice([f"Then {name} gives away {k} {item}.", f"{name} loses {k} {item}."]))
        elif kind == "packs":
            packs, per = rng.randint(2, 2 + level), rng.randint(2, 3 + 2 * level)
            x += packs * per
            sentences.append(f"Then {name} buys {packs} packs of {item} with {per} {item} in each pack.")
        elif kind == "share":
            d = rng.choice(divisors)
            x //= d
            sentences.append(f"Then {name} splits the {item} into {d} equal groups and keeps only one group.")
        else:
            x *= 2
            sentences.append(f"Then the number of {item} {name} has doubles.")
    return sentences, x


def make_arith(n: int = 40, *, seed: int = 0, levels: tuple[int, ...] = (1, 2, 3, 4)) -> list[Problem]:
    """``n`` generated word problems, levels cycling through ``levels`` (graded difficulty), seeded."""
    if n < 0 or not levels or any(lv < 1 for lv in levels):
        raise ValueError("n must be >= 0 and levels a non-empty tuple of integers >= 1")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        level = levels[i % len(levels)]
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        start = rng.randint(2, 10 * level - 1)
        sentences, answer = _events(rng, level, start, item, name)
        question = f"{name} has {start} {item}. " + " ".join(sentences) + f" How many {item} does {name} have now?"
        out.append(Problem(f"arith-s{seed}-{i}", "arith", question, str(answer), {"level": level}))
    return out


def load_task(name: str, *, limit: int | None = None, offset: int = 0, shuffle_seed: int | None = None,
              data_dir: str | os.PathLike | None = None, seed: int = 0,
              levels: tuple[int, ...] = (1, 2, 3, 4)) -> list[Problem]:
    """Problems of task ``name`` (``gsm8k`` = GSM8K test, ``math500``, ``arith`` with ``limit`` problems, default 40)."""
    if name == "gsm8k":
        return load_gsm8k("test", limit=limit, offset=offset, shuffle_seed=shuffle_seed, data_dir=data_dir)
    if name == "math500":
        return load_math500(limit=limit, offset=offset, shuffle_seed=shuffle_seed, data_dir=data_dir)
    if name == "arith":
        probs = make_arith((limit or 40) + offset, seed=seed, levels=levels)
        return probs[offset:]
    raise ValueError(f"task must be one of {TASK_NAMES}, got {name!r}")

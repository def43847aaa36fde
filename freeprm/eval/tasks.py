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


def _events(rng: random.Random, level: int, start: int, item: str, name: str,
            small: bool = False) -> tuple[list[str], int, list]:
    x, sentences, ops = start, [], []  # ops: [kind, operand, operand] per event (the gold solution's input)
    hi = 9 if small else 10 * level - 1  # level 1 (or small): single-digit numbers
    kinds = ["add", "sub"] if level == 1 or small else ["add", "sub", "packs", "share", "double"]
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
            ops.append(["add", k, 0])
            sentences.append(rng.choice([f"Then {name} gets {k} more {item}.", f"A friend gives {name} {k} more {item}."]))
        elif kind == "sub":
            k = rng.randint(1, min(x - 1, hi))
            x -= k
            ops.append(["sub", k, 0])
            sentences.append(rng.choice([f"Then {name} gives away {k} {item}.", f"{name} loses {k} {item}."]))
        elif kind == "packs":
            packs, per = rng.randint(2, 2 + level), rng.randint(2, 3 + 2 * level)
            x += packs * per
            ops.append(["packs", packs, per])
            sentences.append(f"Then {name} buys {packs} packs of {item} with {per} {item} in each pack.")
        elif kind == "share":
            d = rng.choice(divisors)
            x //= d
            ops.append(["share", d, 0])
            sentences.append(f"Then {name} splits the {item} into {d} equal groups and keeps only one group.")
        else:
            x *= 2
            ops.append(["double", 2, 0])
            sentences.append(f"Then the number of {item} {name} has doubles.")
    return sentences, x, ops


def make_arith(n: int = 40, *, seed: int = 0, levels: tuple[int, ...] = (1, 2, 3, 4),
               small: bool = False) -> list[Problem]:
    """``n`` generated word problems, levels cycling through ``levels`` (graded difficulty), seeded.

    ``small``: every event adds or subtracts a single-digit number (``level`` events, start below 10):
    multi-step problems as easy per step as level 1; ids ``arith-small-s<seed>-<i>``.
    """
    if n < 0 or not levels or any(lv < 1 for lv in levels):
        raise ValueError("n must be >= 0 and levels a non-empty tuple of integers >= 1")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        level = levels[i % len(levels)]
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        start = rng.randint(2, 9 if small else 10 * level - 1)
        sentences, answer, ops = _events(rng, level, start, item, name, small)
        question = f"{name} has {start} {item}. " + " ".join(sentences) + f" How many {item} does {name} have now?"
        out.append(Problem(f"arith-{'small-' if small else ''}s{seed}-{i}", "arith", question, str(answer),
                           {"level": level, "name": name, "item": item, "start": start, "ops": ops, "small": small}))
    return out


def arith_steps(problem: Problem, corrupt: tuple[int, int] | None = None) -> list[str] | None:
    """The worked solution of a generated arith problem, one calculation per step, then ``The answer is X.``

    Written like the prompt's example (``Mia buys 3 * 2 = 6 pens.``). ``corrupt=(j, delta)`` adds
    ``delta`` to the result written in step ``j`` and carries the wrong value on: later steps do correct
    arithmetic on it, so step ``j`` is the first wrong one and the final answer changes. Returns None
    when that cannot be done (``j`` is not a calculation step, or a later step would divide unevenly or
    reach a count <= 0).
    """
    m = problem.meta
    if "ops" not in m:
        raise ValueError(f"problem {problem.problem_id} has no recorded operations (not a generated arith problem)")
    name, item, x = m["name"], m["item"], m["start"]
    steps: list[str] = []

    def emit(text: str, result: int) -> int:  # text holds "{r}" where the step's result goes
        if corrupt is not None and corrupt[0] == len(steps):
            result += corrupt[1]
        steps.append(text.replace("{r}", str(result)))
        return result

    for kind, a, b in m["ops"]:
        if kind == "add":
            y = emit(f"{name} has {x} + {a} = {{r}} {item}.", x + a)
        elif kind == "sub":
            y = emit(f"{name} has {x} - {a} = {{r}} {item}.", x - a)
        elif kind == "packs":
            got = emit(f"{name} buys {a} * {b} = {{r}} {item}.", a * b)
            y = emit(f"{name} has {x} + {got} = {{r}} {item}.", x + got)
        elif kind == "share":
            if x % a:
                return None
            y = emit(f"{name} keeps {x} / {a} = {{r}} {item}.", x // a)
        else:  # double
            y = emit(f"{name} has {x} * 2 = {{r}} {item}.", x * 2)
        if y <= 0:
            return None
        x = y
    if corrupt is not None and not 0 <= corrupt[0] < len(steps):
        return None
    return steps + [f"The answer is {x}."]


def load_task_file(path: str | os.PathLike, *, task: str = "gsm8k") -> list[Problem]:
    """Problems of a JSONL file: ``{"question", "gold"[, "problem_id", "task", "meta"]}`` per line.

    ``task`` (a name of ``TASK_NAMES``, selecting the grader) applies to rows without their own;
    ``problem_id`` defaults to ``<file stem>-<line>``. A bad line (unknown field, missing or non-string
    question/gold, unknown task, repeated id) raises ``ValueError("PATH:LINE: ...")``.
    """
    allowed = {"problem_id", "question", "gold", "task", "meta"}
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task file not found: {path}")
    out, seen = [], {}
    for line, r in load_jsonl(path, on_error="raise"):
        unknown = sorted(set(r) - allowed)
        if unknown:
            raise ValueError(f"{path}:{line}: unknown field(s) {unknown}; a task row has {sorted(allowed)} "
                             "(rename or drop the others)")
        for k in ("question", "gold"):
            if not isinstance(r.get(k), (str, int, float)) or isinstance(r.get(k), bool):
                raise ValueError(f"{path}:{line}: {k!r} is missing or not a string")
        t = r.get("task", task)
        if t not in TASK_NAMES:
            raise ValueError(f"{path}:{line}: task must be one of {TASK_NAMES}, got {t!r}")
        pid = str(r.get("problem_id", f"{path.stem}-{line}"))
        if pid in seen:
            raise ValueError(f"{path}:{line}: problem_id {pid!r} repeats line {seen[pid]}")
        seen[pid] = line
        meta = r.get("meta") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"{path}:{line}: 'meta' must be an object")
        out.append(Problem(pid, t, str(r["question"]), str(r["gold"]), meta))
    if not out:
        raise ValueError(f"{path}: no problems")
    return out


def load_task(name: str, *, limit: int | None = None, offset: int = 0, shuffle_seed: int | None = None,
              data_dir: str | os.PathLike | None = None, seed: int = 0,
              levels: tuple[int, ...] = (1, 2, 3, 4), small: bool = False) -> list[Problem]:
    """Problems of task ``name`` (``gsm8k`` = GSM8K test, ``math500``, ``arith`` with ``limit`` problems, default 40)."""
    if name == "gsm8k":
        return load_gsm8k("test", limit=limit, offset=offset, shuffle_seed=shuffle_seed, data_dir=data_dir)
    if name == "math500":
        return load_math500(limit=limit, offset=offset, shuffle_seed=shuffle_seed, data_dir=data_dir)
    if name == "arith":
        probs = make_arith((limit or 40) + offset, seed=seed, levels=levels, small=small)
        return probs[offset:]
    raise ValueError(f"task must be one of {TASK_NAMES}, got {name!r}")

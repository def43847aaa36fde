"""GSM8K solutions as step lists, and corrupted copies whose error propagates to the answer.

GSM8K gold solutions are lines of reasoning with calculator annotations (``<<48/2=24>>``) and a
last line ``#### 72``. ``gold_steps`` turns one into clean steps (annotations removed, the final
line written as "The answer is 72."). ``corrupt`` changes the result of one calculation line by a
small seeded offset and propagates it: every later annotated calculation is re-evaluated with the
new numbers, changed results replace the old ones in the text, and the final answer changes.
Problems where that cannot be done unambiguously (a result that is also a number of the question,
an annotation that does not evaluate to its own result, an error that does not reach the answer)
give None. Used by the demo set, the trainer's small-scale claim and the engine benchmark.
"""

from __future__ import annotations

import ast
import math
import operator
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .io import LineError, iter_jsonl

ANNOT = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
NUM = re.compile(r"\d+(?:\.\d+)?")
_SAFE_EXPR = re.compile(r"^[\d\s+\-*/().]+$")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def data_dir() -> Path:
    """``$FREEPRM_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("FREEPRM_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def read_gsm8k(split: str = "test", limit: int | None = None) -> list[dict]:
    """Raw records ``{question, answer}`` of ``gsm8k_{split}.jsonl`` from ``data_dir()``.

    For evaluation problems (id, task, gold answer) use ``freeprm.eval.tasks.load_gsm8k``.
    """
    path = data_dir() / f"gsm8k_{split}.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found: set FREEPRM_DATA to the folder holding gsm8k_{split}.jsonl")
    out = []
    for lineno, obj in iter_jsonl(path):  # streaming, so a limit reads only that many lines
        if isinstance(obj, LineError):
            raise ValueError(f"{path}:{lineno}: {obj.message}")
        out.append(obj)
        if limit is not None and len(out) >= limit:
            break
    return out


def _eval(expr: str) -> float | None:
    """Value of a calculator expression (digits, + - * / and parentheses only), or None."""
    if not _SAFE_EXPR.match(expr) or "**" in expr:
        return None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(expr)

    try:
        return float(ev(ast.parse(expr, mode="eval")))
    except (SyntaxError, ZeroDivisionError, TypeError, ValueError):
        return None


def _fmt(x: float) -> str | None:
    if not math.isfinite(x):
        return None
    if abs(x - round(x)) < 1e-9:
        return str(int(round(x)))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _sub_numbers(text: str, mapping: dict[str, str]) -> str:
    return NUM.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)


def final_answer(answer: str) -> str:
    return answer.strip().split("####")[-1].strip().replace(",", "")


def gold_response(answer: str) -> tuple[list[str], str] | None:
    """(body lines with annotations kept, final answer) of a GSM8K solution, or None if malformed."""
    lines = [ln for ln in answer.split("\n") if ln.strip()]
    if len(lines) < 2 or not lines[-1].startswith("####"):
        return None
    return lines[:-1], lines[-1].removeprefix("####").strip().replace(",", "")


def render_steps(body: list[str], final: str) -> list[str]:
    """Clean steps: annotations removed, then ``The answer is {final}.``"""
    return [ANNOT.sub("", ln).strip() for ln in body] + [f"The answer is {final}."]


def gold_steps(answer: str) -> list[str]:
    """Clean steps of a GSM8K solution (see ``render_steps``)."""
    g = gold_response(answer)
    if g is None:
        raise ValueError("not a GSM8K solution: expected reasoning lines and a last line '#### <answer>'")
    return render_steps(*g)


def corrupt(question: str, body: list[str], final: str, rng: random.Random) -> tuple[list[str], str, int] | None:
    """Corrupt one calculation's result and propagate it; returns (annotated body, final, step index) or None."""
    protected = set(NUM.findall(question.replace(",", "")))  # numbers of the question are never remapped
    cands = []
    for k, ln in enumerate(body):
        anns = list(ANNOT.finditer(ln))
        if anns and anns[-1].group(2).strip() not in protected and re.fullmatch(r"\d+", anns[-1].group(2).strip()):
            cands.append(k)
    if not cands:
        return None
    k = rng.choice(cands)
    ann = list(ANNOT.finditer(body[k]))[-1]
    old = ann.group(2).strip()
    taken = protected | set(NUM.findall(" ".join(body))) | {final}
    deltas = [d for d in (1, 2, 3, 4, 5, 10, -1, -2, -3, -4, -5, -10) if int(old) + d > 0 and str(int(old) + d) not in taken]
    if not deltas:
        return None
    new = str(int(old) + rng.choice(deltas))
    line = body[k]
    # corrupt the written result only: the annotation's result and the number right after it
    tail = line[ann.end():]
    m = re.match(r"\s*" + re.escape(old), tail)
    if not m:
        return None
    body = list(body)
    body[k] = line[:ann.start()] + f"<<{ann.group(1)}={new}>>" + tail[:m.end()].replace(old, new) + tail[m.end():]
    mapping = {old: new}
    for j in range(k + 1, len(body)):
        out, pos, ln = [], 0, body[j]
        for a in ANNOT.finditer(ln):
            out.append(_sub_numbers(ln[pos:a.start()], mapping))
            expr = _sub_numbers(a.group(1), mapping)
            val = _eval(expr)
            res = a.group(2).strip()
            if val is None:
                return None
            new_res = _fmt(val)
            if new_res is None:
                return None
            orig = _eval(a.group(1))
            if not NUM.fullmatch(res) or orig is None or _fmt(orig) != _fmt(float(res)):
                return None  # the original annotation does not evaluate to its own result: skip
            if new_res != res:
                if res in protected:
                    return None  # ambiguous: the old value is also one of the question's numbers
                mapping[res] = new_res
            out.append(f"<<{expr}={new_res}>>")
            pos = a.end()
        out.append(_sub_numbers(ln[pos:], mapping))
        body[j] = "".join(out)
    new_final = mapping.get(final, final)
    if new_final == final:
        return None  # the error did not reach the answer
    return body, new_final, k


@dataclass
class Corrupted:
    steps: list[str]
    answer: str  # the (wrong) final answer
    step_index: int  # index of the first wrong step


def corrupt_steps(question: str, answer: str, rng: random.Random) -> Corrupted | None:
    """A corrupted copy of a GSM8K solution as clean steps (see ``corrupt``), or None."""
    g = gold_response(answer)
    if g is None:
        return None
    c = corrupt(question, *g, rng)
    if c is None:
        return None
    body, final, k = c
    return Corrupted(render_steps(body, final), final, k)

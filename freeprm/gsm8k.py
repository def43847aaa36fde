"""GSM8K solutions as step lists, and corrupted copies whose error propagates to the answer.

GSM8K gold solutions are lines of reasoning with calculator annotations (``<<48/2=24>>``)
and a last line ``#### 72``. ``gold_steps`` turns one into clean steps (annotations removed,
the final line as "The answer is 72."). ``corrupt_steps`` changes the result of one
calculation and recomputes every later annotated calculation that uses it, so the wrong
number flows on to the final answer; a corruption that does not reach the final answer is
rejected. This gives labeled candidates with a known first wrong step, built honestly
from the gold data (used by the demo, the trainer's small-scale claim and tests).
"""

from __future__ import annotations

import ast
import json
import operator
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

_ANNOT = re.compile(r"<<([^=<>]*)=([^<>]*)>>")
_CUT = "\x01"  # marks where the annotation was, so the corrupted result is placed exactly
_NUM = r"(?<![\d.]){}(?![\d]|\.\d)"
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Pow: operator.pow, ast.Mod: operator.mod}


def data_dir() -> Path:
    """``$FREEPRM_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("FREEPRM_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def load_gsm8k(split: str = "test", limit: int | None = None) -> list[dict]:
    """Records ``{question, answer}`` of ``gsm8k_{split}.jsonl`` from ``data_dir()``."""
    path = data_dir() / f"gsm8k_{split}.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} not found: set FREEPRM_DATA to the folder holding gsm8k_{split}.jsonl")
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
                if limit is not None and len(out) >= limit:
                    break
    return out


def _eval(expr: str) -> float:
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression {expr!r}")

    return float(ev(ast.parse(expr.replace(",", ""), mode="eval")))


def _fmt(x: float) -> str:
    if abs(x - round(x)) < 1e-9:
        return str(int(round(x)))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _strip(line: str) -> str:
    """Visible text of a solution line: annotations removed, thousands separators dropped (80,000 -> 80000)."""
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", _ANNOT.sub("", line)).strip()


def final_answer(answer: str) -> str:
    return answer.strip().split("####")[-1].strip().replace(",", "")


def gold_steps(answer: str) -> list[str]:
    """Clean steps of a GSM8K solution: annotations removed, ``#### X`` as ``The answer is X.``"""
    body, _, _ = answer.rpartition("####")
    steps = [_strip(line) for line in body.strip().split("\n") if _strip(line)]
    return steps + [f"The answer is {final_answer(answer)}."]


@dataclass
class Corrupted:
    steps: list[str]
    answer: str  # the (wrong) final answer
    step_index: int  # index of the first wrong step


def _sub_numbers(text: str, mapping: dict[str, str]) -> str:
    for old in sorted(mapping, key=len, reverse=True):
        text = re.sub(_NUM.format(re.escape(old)), "\0" + mapping[old] + "\0", text)
    return text.replace("\0", "")


def corrupt_steps(answer: str, rng: random.Random, tries: int = 20) -> Corrupted | None:
    """One corrupted copy of a GSM8K solution (see the module docstring), or None if none propagates."""
    body, _, _ = answer.rpartition("####")
    lines = [line for line in body.strip().split("\n") if _strip(line)]
    gold_final = final_answer(answer)
    annotated = [i for i, line in enumerate(lines) if _ANNOT.search(line)]
    for _ in range(tries):
        if not annotated:
            return None
        k = rng.choice(annotated)
        m = rng.choice(list(_ANNOT.finditer(lines[k])))
        try:
            old = _eval(m.group(1))
        except (ValueError, SyntaxError, ZeroDivisionError):
            continue
        new = old + rng.choice([-1, 1]) * rng.choice([1, 2, 3, 5, 10])
        if new < 0 or _fmt(new) == _fmt(old):
            continue
        mapping = {_fmt(old): _fmt(new)}
        out = [_strip(x) for x in lines]
        # step k: the stated result is wrong (the expression stays as written)
        after = lines[k][m.end():]
        res_txt = re.match(r"\s*(\d[\d,]*(?:\.\d+)?)", after)
        if res_txt is None:
            continue
        visible = lines[k][:m.start()] + _CUT + lines[k][m.end():m.end() + res_txt.start(1)] + _fmt(new) \
            + lines[k][m.end() + res_txt.end(1):]
        out[k] = _strip(visible).replace(_CUT, "")
        ok = True
        for j in range(k + 1, len(lines)):
            line = lines[j]
            for a in _ANNOT.finditer(line):
                try:
                    o = _eval(a.group(1))
                    n = _eval(_sub_numbers(a.group(1), mapping))
                except (ValueError, SyntaxError, ZeroDivisionError):
                    ok = False
                    break
                if _fmt(o) != _fmt(n):
                    mapping[_fmt(o)] = _fmt(n)
            out[j] = _sub_numbers(_strip(line), mapping)
        if not ok:
            continue
        wrong_final = mapping.get(gold_final.replace(",", ""))
        if wrong_final is None or wrong_final == gold_final:
            continue
        return Corrupted(out + [f"The answer is {wrong_final}."], wrong_final, k)
    return None

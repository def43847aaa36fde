"""Final-answer extraction and equivalence for best-of-N grading.

Extraction (``extract_answer``), first rule that matches wins:
  1. the **last** ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``), nested braces handled;
  2. the last GSM8K-style ``#### <answer>`` line;
  3. the last ``The answer is <answer>`` / ``The final answer is <answer>`` (case-insensitive),
     up to the end of the line or sentence;
  4. numeric tasks only (``gsm8k``, ``arith``) and ``fallback="last_number"`` (the default for
     them): the last number in the text. Pass ``fallback=None`` for strict extraction.

Equivalence (``is_equiv``):
  * ``math`` (MATH / MATH-500): ``math_verify.verify(parse(gold), parse(pred))`` on both answers
    wrapped as ``$...$``, after a light normalization (``\\dfrac`` -> ``\\frac``, ``^\\circ``,
    ``\\text{ units}``, ``\\!``); if math-verify cannot parse either side, normalized string equality.
  * ``gsm8k`` / ``arith``: numeric equality (commas, ``$``, ``%``, units and trailing dots
    stripped; fractions like ``3/4`` read exactly; relative tolerance 1e-6).

``answer_key`` maps an answer to a hashable key for voting: the canonical number for numeric
answers, else a normalized string. ``group_answers`` merges keys that math-verify finds equal.
"""

from __future__ import annotations

import re
from fractions import Fraction

NUMERIC_TASKS = ("gsm8k", "arith")
MATH_TASKS = ("math", "math500")
TASKS = NUMERIC_TASKS + MATH_TASKS

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_HASH_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(r"(?:final\s+)?answer\s*(?:is|:)\s*:?\s*([^\n]+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return "math" if task in MATH_TASKS else task


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept), or ``None``.

    ``\\boxed 5`` (no braces) yields ``"5"``. An unclosed ``\\boxed{`` yields ``None``.
    """
    matches = list(_BOX_RE.finditer(text))
    for m in reversed(matches):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                c = text[j]
                if c == "\\" and j + 1 < len(text):  # escaped brace \{ or \} does not count
                    j += 2
                    continue
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j].strip()
                j += 1
            continue  # unclosed: try an earlier box
        if i > m.end():  # "\boxed 5": up to whitespace or '$'
            tail = re.match(r"[^\s$]+", text[i:])
            if tail:
                return tail.group(0).rstrip(".")
    return None


def _strip_sentence(ans: str) -> str:
    ans = ans.strip()
    # "The answer is 42. So ..." -> "42"; keep decimal points inside numbers
    m = re.match(r"(.*?)(?:\.\s|\.$|$)", ans)
    ans = (m.group(1) if m else ans).strip()
    return ans.strip(" *:").rstrip(".").strip()


def extract_answer(text: str, task: str = "math", *, fallback: str | None = "auto") -> str | None:
    """The final answer in ``text`` (see the module docstring for the rules), or ``None``.

    ``fallback``: ``"auto"`` (last number for numeric tasks, nothing for ``math``),
    ``"last_number"``, or ``None`` (strict: boxed / #### / "The answer is" only).
    """
    task = _check_task(task)
    if fallback not in ("auto", "last_number", None):
        raise ValueError(f"fallback must be 'auto', 'last_number' or None, got {fallback!r}")
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed:
        return boxed
    hashes = _HASH_RE.findall(text)
    if hashes and hashes[-1].strip():
        return _strip_sentence(hashes[-1])
    said = [a for a in _ANSWER_IS_RE.findall(text) if a.strip()]
    if said:
        ans = _strip_sentence(said[-1])
        if task != "math":  # "The answer is $18 per day" -> the number in it
            nums = _NUMBER_RE.findall(ans)
            if nums:
                return nums[0].strip()
        if ans:
            return ans.strip("$ ")
    if fallback == "last_number" or (fallback == "auto" and task in NUMERIC_TASKS):
        nums = _NUMBER_RE.findall(text)
        if nums:
            return nums[-1].strip()
    return None


def gold_from_gsm8k(solution: str) -> str:
    """The final answer of a GSM8K reference solution (after ``####``, commas removed)."""
    m = _HASH_RE.findall(solution)
    if not m:
        raise ValueError("GSM8K solution has no '#### <answer>' line")
    return m[-1].strip().replace(",", "")


# --------------------------------------------------------------------------- numbers

_UNIT_WORDS = re.compile(r"\s*(?:\\text\{[^}]*\}|\\mbox\{[^}]*\}|[a-zA-Z][a-zA-Z ]*)$")


def parse_number(ans: str | None) -> Fraction | None:
    """``ans`` as an exact number (``Fraction``), or ``None`` if it is not a plain number.

    Accepts ``1,234``, ``$5.50``, ``-3``, ``12%``, ``3/4``, ``\\frac{3}{4}``, ``7 apples``, ``1e3``.
    """
    if ans is None:
        return None
    s = ans.strip().strip("$").strip()
    s = s.replace("\\$", "").replace("\\%", "").replace("%", "").replace("\\!", "").replace("{,}", "")
    s = re.sub(r"\\(?:text|mbox|mathrm)\{\s*\}", "", s)
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    s = _UNIT_WORDS.sub("", s).strip()
    s = s.replace(",", "").replace(" ", "").rstrip(".")
    m = re.fullmatch(r"\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s) or re.fullmatch(r"\\d?frac(\d)(\d)", s)
    if m:
        num, den = (_to_fraction(g) for g in m.groups())
        return None if num is None or not den else num / den
    neg = s.startswith("-\\frac") or s.startswith("-\\dfrac")
    if neg:
        v = parse_number(s[1:])
        return None if v is None else -v
    m = re.fullmatch(r"(-?[\d.]+)/(-?[\d.]+)", s)
    if m:
        num, den = (_to_fraction(g) for g in m.groups())
        return None if num is None or not den else num / den
    return _to_fraction(s)


def _to_fraction(s: str) -> Fraction | None:
    if not re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(a: Fraction, b: Fraction, rel_tol: float = 1e-6) -> bool:
    if a == b:
        return True
    return abs(float(a) - float(b)) <= rel_tol * max(abs(float(a)), abs(float(b)), 1e-12)


# --------------------------------------------------------------------------- LaTeX

def normalize_latex(ans: str) -> str:
    """A light, safe normalization of a LaTeX answer (for string keys and for math-verify input)."""
    s = ans.strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    s = re.sub(r"\\text\{\s*\}", "", s)
    s = s.rstrip(".").strip()
    return s


def _string_key(ans: str) -> str:
    return re.sub(r"\s+", "", normalize_latex(ans))


def answer_key(ans: str | None, task: str = "math") -> str | None:
    """Hashable voting key of an answer: ``"num:<p>/<q>"`` for numbers, else a normalized string."""
    if ans is None or not str(ans).strip():
        return None
    _check_task(task)
    num = parse_number(ans)
    if num is not None:
        return f"num:{num.numerator}/{num.denominator}"
    return "str:" + _string_key(ans)


_MV_CACHE: dict[str, object] = {}


def _mv_parse(ans: str):
    if ans not in _MV_CACHE:
        from math_verify import parse

        text = normalize_latex(ans)
        parsed = parse(f"${text}$") or parse(text)
        if len(_MV_CACHE) > 50_000:
            _MV_CACHE.clear()
        _MV_CACHE[ans] = parsed
    return _MV_CACHE[ans]


def _math_equiv(pred: str, gold: str) -> bool:
    if _string_key(pred) == _string_key(gold):
        return True
    try:
        from math_verify import verify
    except ImportError as e:  # pragma: no cover
        raise ImportError("grading MATH answers needs math-verify: pip install 'freeprm[eval]'") from e
    g, p = _mv_parse(gold), _mv_parse(pred)
    if not g or not p:
        return False
    return bool(verify(g, p))


def is_equiv(pred: str | None, gold: str | None, task: str = "math") -> bool:
    """Whether the extracted answer ``pred`` equals the reference ``gold`` (see the module docstring)."""
    task = _check_task(task)
    if pred is None or gold is None or not str(pred).strip():
        return False
    pred, gold = str(pred), str(gold)
    if task in NUMERIC_TASKS:
        a, b = parse_number(pred), parse_number(gold)
        if a is not None and b is not None:
            return numbers_equal(a, b)
        return _string_key(pred) == _string_key(gold)
    return _math_equiv(pred, gold)


def grade(response: str, gold: str, task: str = "math", *, fallback: str | None = "auto") -> tuple[str | None, bool]:
    """``(extracted answer, correct)`` of a response against the reference answer."""
    ans = extract_answer(response, task, fallback=fallback)
    return ans, is_equiv(ans, gold, task)


def group_answers(answers: list[str | None], task: str = "math") -> list[str | None]:
    """Voting keys for a list of answers, merging keys that are equivalent.

    Numeric tasks: ``answer_key``. ``math``: answers whose keys differ but which math-verify
    finds equal join the group of the first such answer (in list order), so ``\\frac12`` and
    ``0.5`` vote together. ``None`` answers stay ``None`` (they do not vote).
    """
    task = _check_task(task)
    keys = [answer_key(a, task) for a in answers]
    if task in NUMERIC_TASKS:
        return keys
    reps: dict[str, str] = {}  # group key -> representative answer
    merged: dict[str, str] = {}
    out = []
    for a, k in zip(answers, keys):
        if k is None:
            out.append(None)
            continue
        if k not in merged:
            merged[k] = k
            for gk, ga in reps.items():
                if _math_equiv(a, ga):
                    merged[k] = gk
                    break
            else:
                reps[k] = a
        out.append(merged[k])
    return out

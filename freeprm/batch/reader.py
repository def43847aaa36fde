"""Streaming input for ``rerank``: rows from JSONL or Parquet, grouped, validated, chunked.

Nothing here holds more than one chunk of groups (plus one Parquet record batch, plus a
16-byte digest per distinct group id for duplicate detection).

Row kinds (one input line / Parquet row each)::

    {"id": ..., "prompt": str, "candidates": [str | {"response": str} | {"steps": [str]} | both]}   # a group
    {"group": ..., "prompt": str, "response": str}      # flat: one candidate of group "group"
    {"id": ..., "prompt": str, "steps": [str, ...]}     # flat, keyed by "id" when there is no "group"

Flat rows are grouped as they stream: a group is a run of *consecutive* flat rows with the
same key (its prompt is the first row's; a row with another prompt is a bad line). A key that
comes back after its run ended is a duplicate id (see below): sort or cluster flat input by
group first (``sort``, DuckDB, ``pyarrow.Table.sort_by``). Ids are strings or integers and are
written as strings (``1`` and ``"1"`` are the same id).

JSONL lines are read by ``freeprm.io.iter_jsonl`` (its rules: invalid UTF-8, non-standard JSON
such as NaN or a raw CR inside a string, nesting deeper than 200, lone surrogates and non-objects
are bad lines; a UTF-8 BOM is skipped; lines split on ``\\n`` only, so line numbers never shift).
Those, and rows with a missing or mistyped field or a duplicate id, are reported with their
1-based line (Parquet: row) number and skipped; the first occurrence of a duplicate id is kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

FORMATS = ("jsonl", "parquet")


@dataclass
class Group:
    """One group to rerank: ``candidates`` are dicts with ``response`` and/or ``steps``."""

    id: str
    prompt: str
    candidates: list[dict]
    line: int  # 1-based line (or Parquet row) of the group's first row
    lines: list[int] = field(default_factory=list)  # line of each candidate (flat rows) or [line] * n


@dataclass
class BadLine:
    line: int
    message: str


@dataclass
class Chunk:
    """``size`` consecutive groups of the input, in order; part ``index`` of the output."""

    index: int
    groups: list[Group]

    @property
    def ids_digest(self) -> str:
        """sha256 over the chunk's ids, so a resumed run can check the input did not change."""
        h = hashlib.sha256()
        for g in self.groups:
            h.update(g.id.encode("utf-8") + b"\0")
        return h.hexdigest()


def detect_format(path: str, fmt: str | None = None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"input format must be one of {FORMATS}, got {fmt!r}")
        return fmt
    return "parquet" if str(path).endswith((".parquet", ".pq")) else "jsonl"


def _check_strings(obj, depth: int = 0) -> None:
    """Raise ValueError on a lone surrogate anywhere in ``obj`` (it cannot be written as UTF-8)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("a string holds a lone surrogate (e.g. \\ud800); it is not valid Unicode text") from None
    elif isinstance(obj, dict):
        for v in obj.values():
            _check_strings(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check_strings(v, depth + 1)


def iter_jsonl(path: str) -> Iterator[tuple[int, dict | BadLine]]:
    """(line number, parsed object or BadLine) per non-blank line, one line at a time (``freeprm.io``)."""
    from ..io import LineError
    from ..io import iter_jsonl as _iter_jsonl

    for lineno, obj in _iter_jsonl(path):
        yield lineno, BadLine(lineno, obj.message) if isinstance(obj, LineError) else obj


def iter_parquet(path: str, batch_rows: int = 1024) -> Iterator[tuple[int, dict | BadLine]]:
    """(1-based row number, row dict) per Parquet row, one record batch at a time."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for obj in batch.to_pylist():
            row += 1
            yield row, obj


def _as_id(value, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{what} must be a string or an integer, got {type(value).__name__}")
    return str(value)


def _candidate(c, k: int) -> dict:
    if isinstance(c, str):
        return {"response": c}
    if not isinstance(c, dict):
        raise ValueError(f"candidate {k} must be a string or a dict with 'response' and/or 'steps'")
    out = {key: c[key] for key in ("response", "steps") if c.get(key) is not None}
    if not out:
        raise ValueError(f"candidate {k} has neither 'response' nor 'steps'")
    if "response" in out and not isinstance(out["response"], str):
        raise ValueError(f"candidate {k}: 'response' must be a string")
    steps = out.get("steps")
    if steps is not None and (not isinstance(steps, list) or not all(isinstance(s, str) for s in steps)):
        raise ValueError(f"candidate {k}: 'steps' must be a list of strings")
    return out


def parse_row(obj: dict) -> tuple[str, str, str, list[dict]]:
    """``(kind, id, prompt, candidates)`` with kind ``"group"`` or ``"flat"``; ValueError if malformed."""
    if "candidates" in obj:
        if "id" not in obj:
            raise ValueError("a group row needs an 'id'")
        gid = _as_id(obj["id"], "'id'")
        cands = obj["candidates"]
        if not isinstance(cands, list) or not cands:
            raise ValueError("'candidates' must be a non-empty list")
        kind, cands = "group", [_candidate(c, k) for k, c in enumerate(cands)]
    elif obj.get("response") is not None or obj.get("steps") is not None:
        key = "group" if "group" in obj else "id"
        if key not in obj:
            raise ValueError("a flat row (with 'response'/'steps') needs a 'group' or an 'id'")
        gid = _as_id(obj[key], f"'{key}'")
        kind, cands = "flat", [_candidate(obj, 0)]
    else:
        raise ValueError("expected a group row {'id', 'prompt', 'candidates'} or a flat row "
                         "{'group' or 'id', 'prompt', 'response' or 'steps'}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    _check_strings([gid, prompt, cands])
    return kind, gid, prompt, cands


def iter_groups(path: str, fmt: str | None = None) -> Iterator[Group | BadLine]:
    """Groups and bad lines in input order (duplicates are reported as bad lines; first one kept)."""
    fmt = detect_format(path, fmt)
    rows = iter_parquet(path) if fmt == "parquet" else iter_jsonl(path)
    seen: dict[bytes, int] = {}  # 16-byte digest of each id -> its first line (duplicate check)
    cur: Group | None = None

    def close(g: Group) -> Iterator[Group | BadLine]:
        key = hashlib.blake2b(g.id.encode("utf-8"), digest_size=16).digest()
        first = seen.get(key)
        if first is not None:
            yield BadLine(g.line, f"duplicate id {g.id!r} (first at line {first}); kept the first, skipped this one"
                          + ("; flat rows of a group must be consecutive" if len(g.lines) > 0 else ""))
            return
        seen[key] = g.line
        yield g

    for lineno, obj in rows:
        if isinstance(obj, BadLine):
            yield obj
            continue
        try:
            kind, gid, prompt, cands = parse_row(obj)
        except (ValueError, RecursionError) as e:
            msg = "JSON nested too deeply" if isinstance(e, RecursionError) else str(e)
            yield BadLine(lineno, msg)
            continue
        if kind == "flat" and cur is not None and cur.id == gid:
            if prompt != cur.prompt:
                yield BadLine(lineno, f"flat row of group {gid!r} has another prompt than its first row "
                              f"(line {cur.line}); skipped")
                continue
            cur.candidates.extend(cands)
            cur.lines.append(lineno)
            continue
        if cur is not None:
            yield from close(cur)
            cur = None
        if kind == "flat":
            cur = Group(gid, prompt, cands, lineno, [lineno])
        else:
            yield from close(Group(gid, prompt, cands, lineno, []))
    if cur is not None:
        yield from close(cur)


def iter_chunks(path: str, rows_per_part: int, fmt: str | None = None) -> Iterator[Chunk | BadLine]:
    """Bad lines as they come, and chunks of ``rows_per_part`` groups (the last one may be shorter).

    Chunk ``k`` holds groups ``k*rows_per_part ...`` of the sequence of well-formed, non-duplicate
    groups, so chunk boundaries depend only on the input: a resumed run recomputes exactly the
    parts that are missing, with the same batches, hence bitwise the same numbers.
    """
    if rows_per_part < 1:
        raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
    buf: list[Group] = []
    index = 0
    for item in iter_groups(path, fmt):
        if isinstance(item, BadLine):
            yield item
            continue
        buf.append(item)
        if len(buf) == rows_per_part:
            yield Chunk(index, buf)
            index, buf = index + 1, []
    if buf:
        yield Chunk(index, buf)

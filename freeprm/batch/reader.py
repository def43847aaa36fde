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

Extra keys (passed through to the output, ``Group.extra`` / ``Group.cand_extra``): the keys of a
group row other than ``id``, ``prompt``, ``candidates``; of a candidate object other than
``response``, ``steps``; of a flat row other than its key (``group``, else ``id``), ``prompt``,
``response``, ``steps`` (they belong to that row's candidate, so ``id`` is one when the key is
``group``). A reserved name (``id``, ``group``, ``prompt``, ``candidates``, ``response``,
``steps``) whose value is null is not an extra key (a Parquet column of the other row kind).
Values are made plain JSON (``_jsonable``): non-finite floats become null; Parquet timestamps and
dates ISO 8601 text, decimals text, binary base64 text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..io import LineError, check_value, iter_jsonl

FORMATS = ("jsonl", "parquet")


@dataclass
class Group:
    """One group to rerank: ``candidates`` are dicts with ``response`` and/or ``steps``, or ``{"error": why}``
    for a malformed candidate (it is rejected alone; ``score_groups`` scores the others)."""

    id: str
    prompt: str
    candidates: list[dict]
    line: int  # 1-based line (or Parquet row) of the group's first row
    lines: list[int] = field(default_factory=list)  # line of each candidate (flat rows) or [line] * n
    extra: dict | None = None  # the group row's extra keys (None: none, or flat rows)
    cand_extra: list = field(default_factory=list)  # per candidate: its extra keys (dict) or None


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

    @property
    def content_digest(self) -> str:
        """Per group, 8 bytes of blake2b over everything its output row is made of (``group_digest``), base64.

        Stored in the manifest line of the chunk's part, so that a resumed run notices a changed prompt,
        candidate, extra key or line number and can name the first group that differs (``first_change``).
        """
        return base64.b64encode(b"".join(group_digest(g) for g in self.groups)).decode("ascii")

    def where(self) -> list[tuple[str, int]]:
        """``(id, line)`` of each group, for messages."""
        return [(g.id, g.line) for g in self.groups]


def group_digest(g: Group) -> bytes:
    """8-byte blake2b of a group's id, prompt, candidates, line numbers and extra keys (canonical JSON)."""
    text = json.dumps([g.id, g.prompt, g.candidates, g.line, g.lines, g.extra, g.cand_extra],
                      sort_keys=True, ensure_ascii=True, allow_nan=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("ascii"), digest_size=8).digest()


def first_change(stored: str, now: str) -> int | None:
    """Index of the first group whose digest differs between two ``content_digest`` values; None if equal."""
    a, b = base64.b64decode(stored), base64.b64decode(now)
    for k in range(0, max(len(a), len(b)), 8):
        if a[k:k + 8] != b[k:k + 8]:
            return k // 8
    return None


def detect_format(path: str, fmt: str | None = None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"input format must be one of {FORMATS}, got {fmt!r}")
        return fmt
    return "parquet" if str(path).endswith((".parquet", ".pq")) else "jsonl"


def _surrogate(obj) -> str | None:
    """Why ``obj`` cannot be written as UTF-8 (a lone surrogate in a string or key), or None."""
    return check_value(obj, allow_nan=True)


def iter_parquet(path: str, batch_rows: int = 1024) -> Iterator[tuple[int, dict | BadLine]]:
    """(1-based row number, row dict) per Parquet row, one record batch of one row group at a time.

    Page checksums are verified where the file has them. A row group that cannot be read (a corrupted
    data page, a bad checksum) is one ``BadLine`` naming the file, the row group and its unread rows;
    the rows read before it are yielded as usual and reading goes on with the next row group.
    """
    import pyarrow as pa

    pf = open_parquet(path)
    row = 0
    for rg in range(pf.num_row_groups):
        end = row + pf.metadata.row_group(rg).num_rows
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg]):
                for obj in batch.to_pylist():
                    row += 1
                    yield row, obj
        except (pa.ArrowException, OSError) as e:
            yield row + 1, BadLine(row + 1, f"row group {rg} of {path} (rows {row + 1}..{end}) could not be read: "
                                            f"{_first_line(e)} (a corrupted data page?); its unread rows are skipped")
            row = end


def open_parquet(path: str):
    """``pyarrow.parquet.ParquetFile`` (page checksums verified); ``ValueError`` naming the file if it is not Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path} is not a readable Parquet file ({_first_line(e)}); pass a Parquet file, or "
                         "--input-format jsonl for JSONL") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _as_id(value, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{what} must be a string or an integer, got {type(value).__name__}")
    return str(value)


RESERVED = ("id", "group", "prompt", "candidates", "response", "steps")


def _jsonable(v):
    """``v`` as plain JSON types: non-finite float -> None; datetime/date -> ISO text; bytes -> base64; other -> str."""
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(bytes(v)).decode("ascii")
    if hasattr(v, "isoformat"):
        return v.isoformat()
    if hasattr(v, "item"):  # numpy scalars
        return _jsonable(v.item())
    return str(v)


def _extra(obj: dict, consumed: tuple) -> dict | None:
    """The keys of ``obj`` that rerank does not read (see the module doc), as plain JSON; None when there are none."""
    out = {k: v for k, v in obj.items() if k not in consumed and not (k in RESERVED and v is None)}
    return _jsonable(out) if out else None


def _candidate(c) -> dict:
    """A candidate as ``{"response"?, "steps"?}``; ValueError (why, without the index) if malformed."""
    if isinstance(c, str):
        return {"response": c}
    if not isinstance(c, dict):
        raise ValueError(f"must be a string or an object with 'response' and/or 'steps', got {type(c).__name__}")
    out = {key: c[key] for key in ("response", "steps") if c.get(key) is not None}
    if not out:
        raise ValueError("has neither 'response' nor 'steps'")
    if "response" in out and not isinstance(out["response"], str):
        raise ValueError("'response' must be a string")
    steps = out.get("steps")
    if steps is not None and (not isinstance(steps, list) or not all(isinstance(s, str) for s in steps)):
        raise ValueError("'steps' must be a list of strings")
    return out


def _checked_candidate(c, consumed: tuple) -> tuple[dict, dict | None]:
    """``(candidate, its extra keys)``; a malformed one is ``{"error": why}`` (rejected alone, not its group)."""
    problem = _surrogate(c)
    if problem:
        return {"error": problem.replace(" the top-level string", " the candidate's text")}, None
    extra = _extra(c, consumed) if isinstance(c, dict) else None
    try:
        return _candidate(c), extra
    except ValueError as e:
        return {"error": str(e)}, extra


def parse_row(obj: dict) -> tuple[str, str, str, list[dict], dict | None, list]:
    """``(kind, id, prompt, candidates, extra, cand_extra)`` with kind ``"group"`` or ``"flat"``.

    ``candidates``: ``{"response"?, "steps"?}`` each, or ``{"error": why}`` for a malformed one
    (wrong type, a lone surrogate); ``extra``: the row's extra keys (group rows); ``cand_extra``: each
    candidate's (see the module doc). ValueError if the row itself is malformed (no key, no prompt, ...).
    """
    if obj.get("candidates") is not None:  # a null reserved field counts as absent (a Parquet column of the other kind)
        if obj.get("id") is None:
            raise ValueError("a group row needs an 'id'")
        gid = _as_id(obj["id"], "'id'")
        cands_in = obj["candidates"]
        if not isinstance(cands_in, list) or not cands_in:
            raise ValueError("'candidates' must be a non-empty list")
        kind, row = "group", {k: v for k, v in obj.items() if k != "candidates"}
        extra = _extra(obj, ("id", "prompt", "candidates"))
        checked = [_checked_candidate(c, ("response", "steps")) for c in cands_in]
        cands, cand_extra = [c for c, _ in checked], [e for _, e in checked]
    elif obj.get("response") is not None or obj.get("steps") is not None:
        key = "group" if obj.get("group") is not None else "id"
        if obj.get(key) is None:
            raise ValueError("a flat row (with 'response'/'steps') needs a 'group' or an 'id'")
        gid = _as_id(obj[key], f"'{key}'")
        kind, row, extra = "flat", {k: obj.get(k) for k in (key, "prompt")}, None
        cand, ex = _checked_candidate(obj, (key, "prompt", "response", "steps"))
        cands, cand_extra = [cand], [ex]
    else:
        raise ValueError("expected a group row {'id', 'prompt', 'candidates'} or a flat row "
                         "{'group' or 'id', 'prompt', 'response' or 'steps'}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    problem = _surrogate(row)
    if problem:
        raise ValueError(problem)
    return kind, gid, prompt, cands, extra, cand_extra


def iter_groups(path: str, fmt: str | None = None) -> Iterator[Group | BadLine]:
    """Groups and bad lines in input order (duplicates are reported as bad lines; first one kept)."""
    fmt = detect_format(path, fmt)
    if fmt == "parquet":
        rows = iter_parquet(path)
    else:  # lone surrogates are checked by parse_row, per candidate (a bad candidate costs only itself)
        rows = ((n, BadLine(n, obj.message) if isinstance(obj, LineError) else obj)
                for n, obj in iter_jsonl(path, allow_surrogates=True))
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
            kind, gid, prompt, cands, extra, cand_extra = parse_row(obj)
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
            cur.cand_extra.extend(cand_extra)
            cur.lines.append(lineno)
            continue
        if cur is not None:
            yield from close(cur)
            cur = None
        if kind == "flat":
            cur = Group(gid, prompt, cands, lineno, [lineno], None, cand_extra)
        else:
            yield from close(Group(gid, prompt, cands, lineno, [], extra, cand_extra))
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

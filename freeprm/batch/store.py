"""The output directory of ``rerank`` (and ``freeprm search``): numbered parts written atomically, a manifest, a
fingerprint.

Layout::

    DIR/fingerprint.json      what produced the parts (models, beta, steps, aggregation, ...)
    DIR/manifest.jsonl        one line per finished part: {"part", "rows", "ids_sha256", "invalid", ...}
    DIR/part-000000.parquet   (or .jsonl) the output rows of chunk 0, in input order
    DIR/summary.json          totals of the last run that reached the end of the input
    DIR/.lock                 held (flock) while a run writes

Writing part ``k``: the rows go to ``.part-00000k.<ext>.tmp``, fsync; the manifest line is
appended, fsync; the temp file is renamed to ``part-00000k.<ext>`` and the directory fsynced.
A part file therefore exists only complete and only with its manifest line; a manifest line
without its part (a kill between the two) just means the part is redone. A kill at any point
leaves at most one temp file and at most a torn last manifest line: both are removed on the
next start. Rows of a part are the same on every run (chunk boundaries depend only on the
input), so a resumed run yields exactly the rows of an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
from pathlib import Path

from ..engine.scorer import AGGREGATIONS
from ..io import dumps_line, fsync_dir

MANIFEST = "manifest.jsonl"
FINGERPRINT = "fingerprint.json"
SUMMARY = "summary.json"
_PART_RE = re.compile(r"^part-(\d{6,})\.(parquet|jsonl)$")


def _crash_point(stage: str, part: int) -> None:
    """Test hook: ``FREEPRM_BATCH_KILL=stage:part`` SIGKILLs this process at that point."""
    want = os.environ.get("FREEPRM_BATCH_KILL")
    if want and want == f"{stage}:{part}":
        os.kill(os.getpid(), signal.SIGKILL)


def output_schema():
    """Arrow schema of the output rows (Parquet parts); ``extra`` / ``candidate_extra`` hold JSON object text."""
    import pyarrow as pa

    lst = pa.list_(pa.float64())
    fields = [("id", pa.string()), ("line", pa.int64()), ("num_candidates", pa.int64()), ("best", pa.int64()),
              ("best_score", pa.float64()), ("aggregation", pa.string()), ("scores", lst)]
    fields += [(f"score_{a}", lst) for a in AGGREGATIONS]
    fields += [("step_rewards", pa.list_(lst)), ("num_tokens", pa.list_(pa.int64())),
               ("errors", pa.list_(pa.string())), ("extra", pa.string()), ("candidate_extra", pa.list_(pa.string()))]
    return pa.schema(fields)


def _json_text(v):
    return None if v is None else dumps_line(v)[:-1]


def to_arrow_rows(rows: list[dict]) -> list[dict]:
    """Output rows with ``extra`` / ``candidate_extra`` as JSON text (the Parquet representation; JSONL parts and
    ``read_output`` hold them as objects)."""
    out = []
    for r in rows:
        r = dict(r)
        if r.get("extra") is not None:
            r["extra"] = _json_text(r["extra"])
        if r.get("candidate_extra") is not None:
            r["candidate_extra"] = [_json_text(v) for v in r["candidate_extra"]]
        out.append(r)
    return out


def from_arrow_row(r: dict) -> dict:
    """The inverse of ``to_arrow_rows`` for one row read from a Parquet part."""
    if r.get("extra") is not None:
        r["extra"] = json.loads(r["extra"])
    if r.get("candidate_extra") is not None:
        r["candidate_extra"] = [None if v is None else json.loads(v) for v in r["candidate_extra"]]
    return r


class OutputDir:
    """Opens (creating or resuming) a rerank output directory; see the module docstring.

    ``tool``: the command that writes it, named in messages (``"search"`` writes JSONL parts of its own rows).
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict, fmt: str, *, tool: str = "rerank") -> None:
        if fmt not in ("parquet", "jsonl"):
            raise ValueError(f"format must be 'parquet' or 'jsonl', got {fmt!r}")
        self.path, self.fmt, self.tool = Path(path), fmt, tool
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--output {self.path} is a file; {tool} writes a directory of parts")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / ".lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise ValueError(f"another {tool} run is writing to {self.path}; wait for it or use another --output") from None
        self._clean_temps()
        self._check_fingerprint(fingerprint)
        self.done = self._load_manifest()  # part index -> manifest entry, for parts on disk

    def close(self) -> None:
        if not self._lock.closed:
            self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ state on disk
    def _clean_temps(self) -> None:
        for p in self.path.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink()

    def _check_fingerprint(self, fp: dict) -> None:
        fpath = self.path / FINGERPRINT
        fp = json.loads(json.dumps(fp))  # normalise (tuples -> lists) before comparing
        if fpath.exists():
            try:
                old = json.loads(fpath.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                old = None
            if not isinstance(old, dict):
                raise ValueError(f"{fpath} is damaged (not a JSON object), so the parts in {self.path} cannot be "
                                 f"checked against this configuration. Delete {self.path} (or pass another --output) "
                                 "to start over")
            if old.get("version") != fp.get("version"):
                raise ValueError(
                    f"{self.path} was written by another version of freeprm {self.tool} (output format "
                    f"{old.get('version')!r}; this version writes format {fp.get('version')!r}, whose rows have other "
                    f"columns), so its parts cannot be resumed. Read them as they are, or delete {self.path} (or pass "
                    "another --output) to start over")
            if old != fp:
                diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
                details = "; ".join(f"{k}: written with {old.get(k)!r}, now {fp.get(k)!r}" for k in diff)
                raise ValueError(
                    f"{self.path} holds output of another configuration ({details}). Resume only with the same "
                    f"models and options; to start over, delete {self.path} or pass another --output directory")
            return
        if any(_PART_RE.match(p.name) for p in self.path.iterdir()) or (self.path / MANIFEST).exists():
            raise ValueError(f"{self.path} holds parts but no {FINGERPRINT}; it was not written by this version of "
                             f"freeprm {self.tool}. Use an empty or new --output directory")
        self._write_atomic(fpath, json.dumps(fp, indent=1, sort_keys=True) + "\n")

    def _write_atomic(self, path: Path, text: str) -> None:
        tmp = path.parent / f".{path.name}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.path)

    def _load_manifest(self) -> dict[int, dict]:
        mpath = self.path / MANIFEST
        entries: dict[int, dict] = {}
        if mpath.exists():
            data = mpath.read_bytes()
            good = 0  # byte length of the complete, valid lines
            for raw in data.splitlines(keepends=True):
                if not raw.endswith(b"\n"):
                    break
                try:
                    e = json.loads(raw)
                    entries[int(e["part"])] = e
                except (ValueError, KeyError, TypeError):
                    break
                good += len(raw)
            if good < len(data):  # a torn last line (killed while appending): drop it
                with open(mpath, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
        on_disk = {}
        for p in self.path.iterdir():
            m = _PART_RE.match(p.name)
            if m and m.group(2) != self.fmt:
                raise ValueError(f"{self.path} holds {m.group(2)} parts; this run writes {self.fmt}. "
                                 "Pass the same --format to resume, or another --output directory")
            if m:
                on_disk[int(m.group(1))] = p
        missing = sorted(k for k in on_disk if k not in entries)
        if missing:
            raise ValueError(f"{self.path}: part {missing[0]} has no manifest line; the directory was modified by hand. "
                             "Delete the directory (or that part) to recompute it")
        return {k: e for k, e in entries.items() if k in on_disk}

    def part_path(self, index: int) -> Path:
        return self.path / f"part-{index:06d}.{self.fmt}"

    # ------------------------------------------------------------------ writing
    def write_part(self, index: int, rows: list[dict], entry: dict) -> None:
        """Write part ``index`` atomically (temp + fsync + manifest line + rename + dir fsync)."""
        final = self.part_path(index)
        tmp = self.path / f".{final.name}.tmp"
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist(to_arrow_rows(rows), schema=output_schema())
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:  # standard JSON: NaN/Infinity -> null (Parquet keeps them)
                    f.write(dumps_line(row))
                f.flush()
                os.fsync(f.fileno())
        _crash_point("tmp", index)
        entry = dict(entry, part=index, rows=len(rows))
        with open(self.path / MANIFEST, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _crash_point("manifest", index)
        os.replace(tmp, final)
        fsync_dir(self.path)
        _crash_point("rename", index)
        self.done[index] = entry

    def write_summary(self, summary: dict) -> None:
        self._write_atomic(self.path / SUMMARY, json.dumps(summary, indent=1, sort_keys=True) + "\n")


def read_output(path: str | os.PathLike) -> list[dict]:
    """All output rows of a rerank directory, in part order (each part in input order)."""
    path = Path(path)
    parts = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := _PART_RE.match(p.name)))
    rows: list[dict] = []
    for _, p in parts:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(from_arrow_row(r) for r in pq.read_table(p).to_pylist())
        else:
            with open(p, encoding="utf-8") as f:
                rows.extend(json.loads(line) for line in f if line.strip())
    return rows

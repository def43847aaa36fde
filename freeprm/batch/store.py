"""The output directory of ``rerank`` (and ``freeprm search``): numbered parts written atomically, a manifest, a
fingerprint.

Layout::

    DIR/fingerprint.json      what produced the parts (models, beta, steps, aggregation, ...)
    DIR/manifest.jsonl        exactly one line per finished part: {"part", "rows", "ids_sha256", "content", ...}
    DIR/part-000000.parquet   (or .jsonl) the output rows of chunk 0, in input order
    DIR/summary.json          totals of the last run that reached the end of the input
    DIR/.lock                 held (flock) while a run writes

Nothing is written before the first part is: ``OutputDir.check`` (read-only) runs before the models
load, so a refused or failing command leaves no directory, fingerprint or lock behind, and
``fingerprint.json`` is written just before part 0 (or the first part of a resumed run that has
none yet). Writing part ``k``: the rows go to ``.part-00000k.<ext>.tmp``, fsync; the manifest line is
appended, fsync; the temp file is renamed to ``part-00000k.<ext>`` (``io.replace_file``) and the
directory fsynced. A part file therefore exists only complete and only with its manifest line; a
manifest line without its part (a kill between the two) just means the part is redone. Opening
rewrites the manifest (atomically) when it holds a line without its part, two lines for one part or
a torn last line, so that it again holds exactly one line per part on disk. Temporary files are
removed on the next start, but only the names this writer makes (``.part-*.tmp``,
``.fingerprint.json.tmp``, ``.summary.json.tmp``, ``.manifest.jsonl.tmp``) and only in a directory
that holds a manifest or a fingerprint. Rows of a part are the same on every run (chunk boundaries
depend only on the input), so a resumed run yields exactly the rows of an uninterrupted one. All
JSON files are standard JSON (no ``NaN``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path

from ..engine.scorer import AGGREGATIONS
from ..faults import fault_point
from ..io import OutputError, check_output_dir, dumps_line, os_error_message, replace_file

MANIFEST = "manifest.jsonl"
FINGERPRINT = "fingerprint.json"
SUMMARY = "summary.json"
_PART_RE = re.compile(r"^part-(\d{6,})\.(parquet|jsonl)$")
_TEMP_RE = re.compile(r"^\.(part-\d{6,}\.(parquet|jsonl)|fingerprint\.json|summary\.json|manifest\.jsonl)\.tmp$")


def _strict_json(obj, **kw) -> str:
    """``json.dumps`` that refuses NaN/Infinity (a ValueError naming the problem) instead of writing ``NaN``."""
    try:
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        raise ValueError(f"refusing to write non-standard JSON (NaN or Infinity) in {obj!r}") from None


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

    ``OutputDir.check(path, fingerprint, fmt)`` first (read-only, before the models load); the
    constructor then creates the directory, takes the lock, cleans its own temporary files and
    repairs the manifest; the fingerprint is written by the first ``write_part``. ``tool``: the
    command that writes it, named in messages (``"search"`` writes JSONL parts of its own rows).
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict, fmt: str, *, tool: str = "rerank") -> None:
        self.check(path, fingerprint, fmt, tool=tool)
        self.path, self.fmt, self.tool = Path(path), fmt, tool
        self._fingerprint = json.loads(_strict_json(fingerprint))
        check_output_dir(self.path, create=True)
        try:
            self._lock = open(self.path / ".lock", "a")
        except OSError as e:
            raise OutputError(os_error_message(e, self.path)) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise ValueError(f"another {tool} run is writing to {self.path}; wait for it or use another --output") from None
        try:
            self._clean_temps()
            self._has_fingerprint = self._check_fingerprint(self.path, self._fingerprint, tool)
            self.done = self._load_manifest()  # part index -> manifest entry, for parts on disk
        except BaseException:
            self.close()
            raise

    @classmethod
    def check(cls, path: str | os.PathLike, fingerprint: dict, fmt: str, *, tool: str = "rerank") -> None:
        """Everything that can be checked without writing: the path can be a directory, and what it holds
        (fingerprint, part format) can be resumed with this configuration. ``ValueError`` if not."""
        if fmt not in ("parquet", "jsonl"):
            raise ValueError(f"format must be 'parquet' or 'jsonl', got {fmt!r}")
        path = Path(path)
        check_output_dir(path)
        fp = json.loads(_strict_json(fingerprint))  # normalise (tuples -> lists) before comparing
        if not path.is_dir():
            return
        cls._check_fingerprint(path, fp, tool)
        for p in path.iterdir():
            m = _PART_RE.match(p.name)
            if m and m.group(2) != fmt:
                raise ValueError(f"{path} holds {m.group(2)} parts; this run writes {fmt}. "
                                 "Pass the same --format to resume, or another --output directory")

    def close(self) -> None:
        if not self._lock.closed:
            self._lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ state on disk
    def _clean_temps(self) -> None:
        """Remove this writer's temporary files (a killed run's), only in a directory that is a rerank output."""
        if not ((self.path / MANIFEST).exists() or (self.path / FINGERPRINT).exists()):
            return
        for p in self.path.iterdir():
            if _TEMP_RE.match(p.name) and p.is_file() and not p.is_symlink():
                p.unlink()

    @staticmethod
    def _check_fingerprint(path: Path, fp: dict, tool: str = "rerank") -> bool:
        """True when ``path`` holds ``fp``; False when it holds no fingerprint (and no parts); ValueError otherwise."""
        fpath = path / FINGERPRINT
        if fpath.exists():
            try:
                old = json.loads(fpath.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                old = None
            if not isinstance(old, dict):
                raise ValueError(f"{fpath} is damaged (not a JSON object), so the parts in {path} cannot be "
                                 f"checked against this configuration. Delete {path} (or pass another --output) "
                                 "to start over")
            if old.get("version") != fp.get("version"):
                raise ValueError(
                    f"{path} was written by another version of freeprm {tool} (output format "
                    f"{old.get('version')!r}; this version writes format {fp.get('version')!r}, whose rows have other "
                    f"columns), so its parts cannot be resumed. Read them as they are, or delete {path} (or pass "
                    "another --output) to start over")
            if old != fp:
                diff = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
                details = "; ".join(f"{k}: written with {old.get(k)!r}, now {fp.get(k)!r}" for k in diff)
                raise ValueError(
                    f"{path} holds output of another configuration ({details}). Resume only with the same "
                    f"models and options; to start over, delete {path} or pass another --output directory")
            return True
        if any(_PART_RE.match(p.name) for p in path.iterdir()) or (path / MANIFEST).exists():
            raise ValueError(f"{path} holds parts but no {FINGERPRINT}; it was not written by this version of "
                             f"freeprm {tool}. Use an empty or new --output directory")
        return False

    def _write_atomic(self, path: Path, text: str) -> None:
        tmp = path.parent / f".{path.name}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            replace_file(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(os_error_message(e, path)) from None

    def _load_manifest(self) -> dict[int, dict]:
        """The manifest entry of each part on disk; rewrites the manifest when it is not one line per such part."""
        mpath = self.path / MANIFEST
        entries: dict[int, dict] = {}
        lines, good, size = 0, 0, 0
        if mpath.exists():
            data = mpath.read_bytes()
            size = len(data)
            for raw in data.splitlines(keepends=True):
                if not raw.endswith(b"\n"):
                    break  # a torn last line (killed while appending)
                try:
                    e = json.loads(raw)
                    entries[int(e["part"])] = e
                except (ValueError, KeyError, TypeError):
                    break
                lines += 1
                good += len(raw)
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
        done = {k: entries[k] for k in sorted(on_disk)}
        if mpath.exists() and (lines != len(done) or good != size):
            # a line without its part (killed between append and rename), a part's second line, a torn tail
            self._write_atomic(mpath, "".join(self._manifest_line(e) for e in done.values()))
        return done

    @staticmethod
    def _manifest_line(entry: dict) -> str:
        return _strict_json(entry, ensure_ascii=False) + "\n"

    def part_path(self, index: int) -> Path:
        return self.path / f"part-{index:06d}.{self.fmt}"

    # ------------------------------------------------------------------ writing
    def write_part(self, index: int, rows: list[dict], entry: dict) -> None:
        """Write part ``index`` atomically (temp + fsync + manifest line + rename + dir fsync).

        The first part written also writes ``fingerprint.json``. An ``OSError`` (a full disk, ...)
        becomes an ``OutputError`` naming the part; finished parts stay (rerun to resume).
        """
        if index in self.done:
            raise ValueError(f"part {index} of {self.path} is already written")
        final = self.part_path(index)
        tmp = self.path / f".{final.name}.tmp"
        line = self._manifest_line(dict(entry, part=index, rows=len(rows)))
        try:
            if not self._has_fingerprint:
                self._write_atomic(self.path / FINGERPRINT, _strict_json(self._fingerprint, indent=1, sort_keys=True) + "\n")
                self._has_fingerprint = True
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
            fault_point("rerank.tmp", index)
            with open(self.path / MANIFEST, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            fault_point("rerank.manifest", index)
            replace_file(tmp, final)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(os_error_message(e, final) + "; the parts before it are kept, rerun to resume") from None
        fault_point("rerank.rename", index)
        self.done[index] = json.loads(line)

    def write_summary(self, summary: dict) -> None:
        self._write_atomic(self.path / SUMMARY, _strict_json(summary, indent=1, sort_keys=True) + "\n")


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

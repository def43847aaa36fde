"""JSONL in and out: one reader and one atomic writer for every freeprm file.

Reading (``iter_jsonl``) is streaming and per line. Each line is split on ``"\\n"`` only (a raw
``"\\r"`` never starts a new line, so line numbers are those of ``wc -l`` / an editor) and yields
``(line_number, obj)``, where ``obj`` is the parsed JSON object or a ``LineError``. A line is an
error, reported with its number while the rest of the file is read, when it

* is not valid UTF-8 (a UTF-8 BOM at the start of the file is skipped; a UTF-16/32 BOM is a
  file-level ``ValueError``);
* is longer than ``max_line_bytes`` (it is then skipped unparsed, never held whole in memory);
* is not one standard JSON (RFC 8259) value: trailing garbage, raw control characters
  (a raw CR or tab) inside a string, ``NaN`` / ``Infinity`` literals and numbers that overflow
  a float (unless ``allow_nan=True``), integers of more than 4300 digits;
* nests deeper than ``max_depth`` (a ``RecursionError`` in the parser is caught too);
* holds a lone UTF-16 surrogate (``"\\ud800"``) in any string, key or value: such text cannot
  be written back as UTF-8 or tokenized;
* is not an object (``[1, 2]``, ``"text"``, ``3``) when ``objects_only`` (the default).

Blank (whitespace-only) lines are skipped silently and keep their numbers. A ``LineError`` of
the last line of a file that does not end in ``"\\n"`` has ``truncated=True``: the mark of a
write cut by a kill, which append-only files (candidates, scores, metrics) drop with a warning.

What a caller does with an error is its own, explicit policy: ``load_jsonl(..., on_error=...)``
raises (``"raise"``), drops and reports (``"skip"``), or ``freeprm score`` reports and goes on.

Writing (``AtomicJsonlWriter``, ``write_jsonl_atomic``) emits standard JSON only: ``NaN`` and
``±Infinity`` floats become ``null`` (``mark_nonfinite`` also records which keys held them, for
files such as ``metrics.jsonl`` where a diverged value must not read as a missing one); a string holding a lone surrogate is written with
``\\uXXXX`` escapes rather than crashing; U+0085, U+2028 and U+2029 are escaped so that a
reader splitting on any line break (Python's ``str.splitlines``) still sees one row per line.
A file output goes to a temporary file beside it (``.NAME.PID.tmp``), fsynced and renamed into
place on success, removed on failure; temporary files of killed runs (their process is gone)
are removed on the next write. A new file gets mode ``0666 & ~umask`` (what ``open(path, "w")`` or a shell redirection gives); replacing an existing
file keeps that file's mode. An output path that is a symlink is resolved: the file it points
to is replaced, like a shell redirection. ``"-"`` means stdin / stdout (stdout is not atomic).

Outputs (``output_kind``, the one rule every writer follows): atomic replacement is for regular
files only. A character device (``/dev/null``, a terminal) or a FIFO is written directly, not
atomically, the way ``"-"`` writes stdout (the device is never replaced by a file); any other
special file (a socket, a block device) and a directory are refused with a message. Directory
outputs (``rerank -o``, ``bon --out``, ``train --out``) go through ``check_output_dir``. Every
rename into place goes through ``replace_file``, which refuses to replace anything but a regular
file. An ``OSError`` while writing (a full disk, ENOSPC; a file too large, EFBIG; a read-only or
virtual file system such as ``/proc``) becomes an ``OutputError`` (a ``ValueError``) with one line
naming the path and what to do; the temporary file is removed, so nothing half-written is left.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

STDIO = "-"
MAX_DEPTH = 200
_BOM = b"\xef\xbb\xbf"
_WIDE_BOMS = {b"\xff\xfe": "UTF-16/32 (little-endian)", b"\xfe\xff": "UTF-16 (big-endian)",
              b"\x00\x00\xfe\xff": "UTF-32 (big-endian)"}
_SURROGATE = re.compile("[\ud800-\udfff]")
_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


@dataclass(frozen=True)
class LineError:
    """Why line ``line`` of a JSONL file was not read; ``truncated``: a cut last line (no final newline)."""

    line: int
    message: str
    truncated: bool = False

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class _Refused(ValueError):
    pass


def _refuse_constant(name: str):
    raise _Refused(f"non-standard JSON literal {name}; write null (or a string) instead")


def _describe(path: list) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "the top-level value"


def check_value(obj: Any, *, allow_nan: bool = False, max_depth: int = MAX_DEPTH,
                allow_surrogates: bool = False) -> str | None:
    """The first problem of a parsed JSON value (lone surrogate, non-finite float, too deep), or None.

    Iterative, so any depth is walked without recursion. ``allow_surrogates``: do not look for lone
    surrogates (for a caller that checks parts of the value itself, e.g. ``rerank`` per candidate).
    """
    stack: list[tuple[Any, list, int]] = [(obj, [], 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            if allow_surrogates:
                continue
            m = _SURROGATE.search(v)
            if m:
                return f"invalid \\u{ord(m.group()):04x} surrogate in key {_describe(path)!r}" if path else \
                    f"invalid \\u{ord(m.group()):04x} surrogate in the top-level string"
        elif isinstance(v, float):
            if not allow_nan and not math.isfinite(v):
                return f"number out of range (not a finite float) in key {_describe(path)!r}"
        elif isinstance(v, (dict, list)):
            if depth >= max_depth:
                return f"JSON nested deeper than {max_depth} levels"
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if isinstance(k, str) and not allow_surrogates:
                    m = _SURROGATE.search(k)
                    if m:
                        where = f" under {_describe(path)!r}" if path else ""
                        return f"invalid \\u{ord(m.group()):04x} surrogate in a key name{where}"
                stack.append((x, path + [k], depth + 1))
    return None


def parse_line(raw: bytes, *, allow_nan: bool = False, objects_only: bool = True,
               max_depth: int = MAX_DEPTH, allow_surrogates: bool = False) -> Any:
    """One JSONL line (bytes, no newline) -> its value; ``ValueError`` with a message naming the problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
                         "re-encode the file as UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=None if allow_nan else _refuse_constant)
    except _Refused as e:
        raise ValueError(str(e)) from None
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg.startswith("Invalid control character"):
            hint = " (a raw CR, tab or newline inside a string must be escaped: \\r, \\t, \\n)"
        raise ValueError(f"invalid JSON: {e.msg} (column {e.colno}){hint}") from None
    except RecursionError:
        raise ValueError(f"JSON nested too deeply to parse (limit {max_depth} levels)") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"invalid JSON: {e}") from None
    problem = check_value(obj, allow_nan=allow_nan, max_depth=max_depth, allow_surrogates=allow_surrogates)
    if problem:
        raise ValueError(problem)
    if objects_only and not isinstance(obj, dict):
        raise ValueError(f"must be a JSON object ({{...}}), got {_json_type(obj)}")
    return obj


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _lines(f: BinaryIO, max_line_bytes: int | None) -> Iterator[tuple[bytes | None, int, bool]]:
    """(line without its newline or None when over the limit, its byte length, ended by a newline)."""
    limit = -1 if max_line_bytes is None else min(max_line_bytes + 1, sys.maxsize)
    while True:
        raw = f.readline(limit)
        if not raw:
            return
        if raw.endswith(b"\n"):
            yield raw[:-1], len(raw) - 1, True
            continue
        if max_line_bytes is None or len(raw) <= max_line_bytes:
            yield raw, len(raw), False  # the last line, without a final newline
            continue
        n, ended = len(raw), False  # over the limit: skip the rest of the line in bounded chunks
        while True:
            more = f.readline(1 << 20)
            if not more:
                break
            n += len(more)
            if more.endswith(b"\n"):
                n, ended = n - 1, True
                break
        yield None, n, ended


def iter_jsonl(source: str | os.PathLike | BinaryIO, *, allow_nan: bool = False, objects_only: bool = True,
               max_line_bytes: int | None = None, max_depth: int = MAX_DEPTH,
               allow_surrogates: bool = False) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, obj | LineError)`` for each non-blank line of a JSONL file (1-based numbers).

    ``allow_surrogates``: a lone surrogate is not a line error; the caller must check the strings it
    uses (``check_value``) before writing or tokenizing them.

    ``source``: a path, ``"-"`` (stdin) or a binary file object. File-level problems (missing
    file, a directory, a UTF-16 file) raise ``ValueError`` before anything is yielded.
    """
    if isinstance(source, (str, os.PathLike)):
        if str(source) == STDIO:
            yield from iter_jsonl(sys.stdin.buffer, allow_nan=allow_nan, objects_only=objects_only,
                                  max_line_bytes=max_line_bytes, max_depth=max_depth, allow_surrogates=allow_surrogates)
            return
        check_input(source)
        with open(source, "rb") as f:
            yield from iter_jsonl(f, allow_nan=allow_nan, objects_only=objects_only,
                                  max_line_bytes=max_line_bytes, max_depth=max_depth, allow_surrogates=allow_surrogates)
        return
    f = source
    for lineno, (raw, nbytes, ended) in enumerate(_lines(f, max_line_bytes), 1):
        if lineno == 1 and raw is not None:
            for bom, name in _WIDE_BOMS.items():
                if raw.startswith(bom):
                    raise ValueError(f"the input starts with a {name} byte-order mark; re-encode it as UTF-8")
            raw = raw.removeprefix(_BOM)
        if raw is None:
            yield lineno, LineError(lineno, f"line of {nbytes} bytes is longer than the limit of {max_line_bytes} "
                                            "bytes; it was not read", truncated=False)
            continue
        if not raw.strip():
            continue
        try:
            yield lineno, parse_line(raw, allow_nan=allow_nan, objects_only=objects_only, max_depth=max_depth,
                                     allow_surrogates=allow_surrogates)
        except ValueError as e:
            yield lineno, LineError(lineno, str(e), truncated=not ended)


def load_jsonl(path: str | os.PathLike, *, on_error: str = "raise", allow_truncated_tail: bool = False,
               missing_ok: bool = False, warn=None, **kwargs) -> list[tuple[int, Any]]:
    """All ``(line_number, obj)`` of a file, with an explicit error policy.

    ``on_error="raise"``: the first bad line raises ``ValueError("PATH:LINE: why")``;
    ``"skip"``: bad lines are reported through ``warn`` (default: stderr) and dropped.
    ``allow_truncated_tail``: a cut last line (no final newline, not parseable: an interrupted
    append) is dropped with a warning even under ``"raise"``. ``missing_ok``: a missing file reads as empty.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    if missing_ok and str(path) != STDIO and not os.path.exists(path):
        return []
    out = []
    for lineno, obj in iter_jsonl(path, **kwargs):
        if isinstance(obj, LineError):
            if obj.truncated and allow_truncated_tail:
                warn(f"warning: {path}:{lineno}: dropping a cut last line (an interrupted write?): {obj.message}")
                continue
            if on_error == "raise":
                raise ValueError(f"{path}:{lineno}: {obj.message}")
            warn(f"warning: {path}:{lineno}: skipped: {obj.message}")
            continue
        out.append((lineno, obj))
    return out


def check_input(path: str | os.PathLike) -> None:
    """``ValueError`` unless ``path`` is ``"-"`` or a readable file."""
    if str(path) == STDIO:
        return
    if not os.path.exists(path):
        raise ValueError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"input {path} is a directory; give a JSONL file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"input {path} is not readable (permissions)")


class OutputError(ValueError):
    """An output path that cannot be written (a special file, a full disk, ...); the message says what to do."""


_OS_HINTS = {
    errno.ENOSPC: "the disk is full (ENOSPC); free space or write elsewhere, then rerun",
    errno.EFBIG: "the file is too large (EFBIG) for this file system or the file-size limit (ulimit -f); "
                 "write elsewhere or raise the limit, then rerun",
    errno.EDQUOT: "the disk quota is exceeded (EDQUOT); free space or write elsewhere, then rerun",
    errno.EROFS: "the file system is read-only (EROFS); write elsewhere",
    errno.EACCES: "permission denied; write elsewhere or fix the permissions",
    errno.EPERM: "operation not permitted; write elsewhere",
    errno.ENOENT: "it cannot be created there (a virtual file system such as /proc or /sys?); write elsewhere",
    errno.ENOTDIR: "a folder on its path is a file; write elsewhere",
    errno.EISDIR: "it is a directory; give a file name",
}


def os_error_message(e: OSError, path: str | os.PathLike) -> str:
    """One line for an ``OSError`` while writing ``path``: the path, the reason, what to do."""
    hint = _OS_HINTS.get(e.errno, e.strerror or str(e))
    return f"cannot write output {path}: {hint}"


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISSOCK, "socket"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISFIFO, "FIFO")):
        if test(mode):
            return name
    return "special file"


def output_kind(path: str | os.PathLike) -> str:
    """How an output file path is written; the one rule for every freeprm writer.

    ``"stdout"`` for ``"-"``; ``"stream"`` for an existing character device or FIFO (``/dev/null``, a
    terminal, ``mkfifo``): written directly, not atomically, like stdout; ``"file"`` for a regular file
    or a path that does not exist yet: written atomically (temporary file, rename). A directory, a
    socket or a block device raises ``OutputError``. A symlink counts as what it points to.
    """
    if str(path) == STDIO:
        return "stdout"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "file"
    except NotADirectoryError:
        raise OutputError(f"cannot write output {path}: a folder on its path is a file, not a directory") from None
    except OSError as e:
        raise OutputError(os_error_message(e, path)) from None
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return "stream"
    if stat.S_ISDIR(mode):
        raise OutputError(f"output {path} is a directory; give a file name")
    raise OutputError(f"output {path} is a {_file_type(mode)}; write to a regular file, a FIFO, a character "
                      "device or - (stdout)")


def _check_folder(path: str | os.PathLike, folder: Path) -> None:
    """``OutputError`` unless ``folder`` exists as a writable directory or can be created."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create the folder of output {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output {path}: folder {probe} is not writable")


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Check, before any work, that ``path`` can be written and is none of ``inputs``; ``ValueError`` if not.

    Refuses a directory and special files other than character devices and FIFOs (``output_kind``),
    the input file itself (also through a symlink or a hard link), and a parent folder that cannot
    be created or written.
    """
    if output_kind(path) != "file":
        return
    p = Path(os.path.realpath(path))
    for inp in inputs:
        if str(inp) != STDIO and p.exists() and os.path.exists(inp) and os.path.samefile(p, inp):
            raise ValueError(f"output {path} is the input file {inp}; writing it would destroy the input; "
                             "choose another output path")
    _check_folder(path, p.parent)


def check_output_dir(path: str | os.PathLike, *, create: bool = False) -> Path:
    """Check (and with ``create``, create) an output directory; ``OutputError`` with a message if it cannot be one.

    Refuses a path that exists and is not a directory (a file, ``/dev/null``, a FIFO), a folder on its
    path that is a file, and an unwritable parent. ``create`` turns an ``OSError`` of ``mkdir`` (as root
    the permission check passes on ``/proc`` or ``/sys``, then the kernel refuses) into the same message.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise OutputError(f"cannot create output directory {path}: a folder on its path is a file") from None
    except OSError as e:
        raise OutputError(os_error_message(e, path)) from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        what = "file" if stat.S_ISREG(st.st_mode) else _file_type(st.st_mode)
        raise OutputError(f"output {path} is a {what}, not a directory; give a directory path (created if missing)")
    if st is None:
        _check_folder(path, p)
    elif not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write output directory {path}: it is not writable")
    if create:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(os_error_message(e, path)) from None
    return p


def replace_file(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename ``tmp`` over ``final`` and fsync the folder: the one place where freeprm moves an output into place.

    ``final`` must be a regular file or absent: a device, FIFO, socket, directory or symlink there is
    never replaced (``OutputError``; ``tmp`` is left for the caller to remove).
    """
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        what = "symlink" if stat.S_ISLNK(st.st_mode) else _file_type(st.st_mode)
        raise OutputError(f"refusing to replace {final}: it is a {what}, not a regular file; remove it or write "
                          "elsewhere")
    os.replace(tmp, final)
    try:  # make the rename durable
        fsync_dir(Path(final).parent)
    except OSError:
        pass


def _plain(v: Any) -> Any:
    """``v`` with non-finite floats replaced by None (recursively), for standard JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


NONFINITE_KEY = "nonfinite"


def mark_nonfinite(row: dict) -> dict:
    """``row`` with each non-finite float value (top level) set to None and named in ``row["nonfinite"]``.

    ``{"loss": nan, "grad_norm": inf}`` -> ``{"loss": None, "grad_norm": None, "nonfinite": {"loss": "NaN",
    "grad_norm": "Infinity"}}``: standard JSON, and a reader can still tell a diverged value from a missing
    one (``None`` as is). A row without non-finite values is returned unchanged (no ``nonfinite`` key).
    """
    bad = {k: ("NaN" if v != v else "Infinity" if v > 0 else "-Infinity")
           for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)}
    if not bad:
        return row
    if NONFINITE_KEY in row:
        raise ValueError(f"the row already has a key {NONFINITE_KEY!r}; rename it")
    return {k: (None if k in bad else v) for k, v in row.items()} | {NONFINITE_KEY: bad}


def dumps_line(row: Any) -> str:
    """One standard-JSON line (with ``"\\n"``): NaN/Infinity -> null; a lone surrogate is ``\\u``-escaped."""
    try:
        text = json.dumps(row, ensure_ascii=False, allow_nan=False)
    except ValueError:  # NaN / Infinity
        text = json.dumps(_plain(row), ensure_ascii=False, allow_nan=False)
    if _SURROGATE.search(text):  # cannot be encoded as UTF-8: escape everything non-ASCII instead
        text = json.dumps(_plain(row), ensure_ascii=True, allow_nan=False)
    # these only occur inside strings; escaped, a reader splitting on any line break (str.splitlines) sees one row
    return text.translate(_LINE_BREAKS) + "\n"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove ``.NAME.PID.tmp`` files beside ``path`` whose process no longer runs; returns those removed."""
    p = Path(path)
    removed = []
    if not p.parent.is_dir():
        return removed
    pat = re.compile(rf"^\.{re.escape(p.name)}\.(\d+)\.tmp$")
    for q in p.parent.iterdir():
        m = pat.match(q.name)
        if m and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            try:
                q.unlink()
                removed.append(q)
            except OSError:
                pass
    return removed


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so that a rename into it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicJsonlWriter:
    """Write JSONL rows to ``path`` atomically (see the module doc); ``"-"`` writes to stdout.

    Opening checks the output (``check_output``) and creates the temporary file, so an unwritable
    output fails before any model work. A character device or FIFO (``output_kind``) is opened and
    written directly instead. Use as a context manager: the file is committed (fsync, rename) when
    the block ends normally and removed when it raises. ``OSError`` while opening, writing or
    committing becomes ``OutputError`` (the temporary file is removed first).
    """

    def __init__(self, path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = ()) -> None:
        self.path, self.rows = path, 0
        check_output(path, inputs)
        self.kind = output_kind(path)
        self.tmp, self.final = None, None
        if self.kind == "stdout":
            self._f: IO[bytes] = sys.stdout.buffer
            return
        try:
            if self.kind == "stream":  # a device or FIFO: written in place, never replaced by a file
                self._f = io.BufferedWriter(io.FileIO(os.open(path, os.O_WRONLY), "wb"))
                return
            self.final = Path(os.path.realpath(path))
            self.final.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(self.final)
            self.tmp = self.final.with_name(f".{self.final.name}.{os.getpid()}.tmp")
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        except OSError as e:
            raise OutputError(os_error_message(e, path)) from None
        if self.final.is_file():  # replacing a file: keep its permissions
            os.chmod(self.tmp, stat.S_IMODE(self.final.stat().st_mode))
        self._f = io.BufferedWriter(io.FileIO(fd, "wb"))

    def write(self, row: Any) -> None:
        try:
            self._f.write(dumps_line(row).encode("utf-8"))
        except OSError as e:
            self._fail(e)
        self.rows += 1

    def _fail(self, e: OSError):
        self.abort()
        raise OutputError(os_error_message(e, self.path)) from None

    def commit(self) -> None:
        try:
            self._f.flush()
            if self.tmp is None:
                if self.kind == "stream":
                    self._f.close()
                return
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as e:
            self._fail(e)
        try:
            replace_file(self.tmp, self.final)
        except (OSError, OutputError) as e:
            self.abort()
            if isinstance(e, OutputError):
                raise
            raise OutputError(os_error_message(e, self.path)) from None

    def abort(self) -> None:
        if self.tmp is None:
            if self.kind == "stream":
                try:
                    self._f.close()
                except OSError:
                    pass
            return
        try:
            self._f.close()
        except OSError:  # e.g. the flush of a full disk
            pass
        finally:
            if self.tmp.exists():
                self.tmp.unlink()

    def __enter__(self) -> AtomicJsonlWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[Any], *,
                       inputs: Iterable[str | os.PathLike] = ()) -> int:
    """Write ``rows`` as standard JSONL to ``path`` atomically; returns the number of rows."""
    with AtomicJsonlWriter(path, inputs=inputs) as w:
        for row in rows:
            w.write(row)
    return w.rows


def append_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """Append rows (standard JSON, one line each), fsynced; a cut last line (an interrupted write) is dropped first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 1))
            ends = f.read(1) == b"\n"
        if not ends:
            data = path.read_bytes()
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    with open(path, "ab") as f:
        for r in rows:
            f.write(dumps_line(r).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())

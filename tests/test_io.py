"""freeprm.io: the JSONL reader (per-line errors, line numbers) and the atomic standard-JSON writer."""

import io
import json
import os
import subprocess
import sys

import pytest

from freeprm.cliargs import check_device, decode_escapes
from freeprm.io import (
    AtomicJsonlWriter,
    LineError,
    append_jsonl,
    check_output,
    clean_stale_temps,
    dumps_line,
    iter_jsonl,
    load_jsonl,
    write_jsonl_atomic,
)


def read(data: bytes, **kw):
    return list(iter_jsonl(io.BytesIO(data), **kw))


def errors(rows):
    return {n: o.message for n, o in rows if isinstance(o, LineError)}


def goods(rows):
    return [(n, o) for n, o in rows if not isinstance(o, LineError)]


def test_line_numbers_survive_bom_cr_blank_and_bad_bytes():
    data = (b"\xef\xbb\xbf" + b'{"a": 1}\n'  # 1: BOM skipped
            b'{"a": "x\ry"}\n'  # 2: raw CR inside a string: this line's error, not a new line
            b"\n   \n"  # 3, 4: blank, skipped silently
            b'{"a": "\xff\xfe"}\n'  # 5: invalid UTF-8
            b'{"a": 2}\r\n'  # 6: CRLF ending is fine
            b'{"a": "caf\xc3\xa9 \xe3\x80\x82"}\n')  # 7: valid UTF-8
    rows = read(data)
    assert goods(rows) == [(1, {"a": 1}), (6, {"a": 2}), (7, {"a": "café 。"})]
    errs = errors(rows)
    assert sorted(errs) == [2, 5]
    assert "control character" in errs[2] and "\\r" in errs[2]
    assert "invalid UTF-8" in errs[5] and "0xff" in errs[5]


@pytest.mark.parametrize("line, needle", [
    (r'{"prompt": "a\ud800b"}', "invalid \\ud800 surrogate in key 'prompt'"),
    (r'{"meta": {"tags": ["ok", "\udfff"]}}', "surrogate in key 'meta.tags[1]'"),
    (r'{"\ud83d": 1}', "surrogate in a key name"),
    ('{"x": NaN}', "non-standard JSON literal NaN"),
    ('{"x": -Infinity}', "non-standard JSON literal -Infinity"),
    ('{"x": 1e400}', "not a finite float"),
    ('{"x": ' + "9" * 5000 + "}", "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('"text"', "got a string"),
    ('{"a": 1} {"b": 2}', "invalid JSON: Extra data"),
    ('{"a": 1', "invalid JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"a": ' + "[" * 300 + "]" * 300 + "}", "nested deeper than 200"),
])
def test_bad_line_is_reported_and_the_next_line_read(line, needle):
    rows = read(line.encode() + b'\n{"ok": true}\n')
    assert needle in errors(rows)[1]
    assert goods(rows) == [(2, {"ok": True})]


def test_nan_accepted_when_allowed_and_written_as_null():
    rows = read(b'{"x": NaN, "y": [Infinity]}\n', allow_nan=True)
    (n, obj), = rows
    assert n == 1 and obj["x"] != obj["x"]
    line = dumps_line(obj)
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard {c}")) == {"x": None, "y": [None]}


def test_long_line_skipped_unread_and_cut_last_line_flagged():
    data = b'{"a": 1}\n' + b'{"b": "' + b"x" * 5000 + b'"}\n' + b'{"c": 3}\n' + b'{"d": '
    rows = read(data, max_line_bytes=100)
    errs = {n: o for n, o in rows if isinstance(o, LineError)}
    assert "5009 bytes is longer than the limit of 100" in errs[2].message and not errs[2].truncated
    assert errs[4].truncated  # no final newline: an interrupted write
    assert goods(rows) == [(1, {"a": 1}), (3, {"c": 3})]


def test_wide_bom_is_a_file_error():
    with pytest.raises(ValueError, match="UTF-16"):
        read('{"a": 1}\n'.encode("utf-16"))


def test_load_policies(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_bytes(b'{"a": 1}\nnope\n{"a": 3}\n{"a": ')
    with pytest.raises(ValueError, match=rf"{p}:2: invalid JSON"):
        load_jsonl(p)
    seen = []
    assert load_jsonl(p, on_error="skip", warn=seen.append) == [(1, {"a": 1}), (3, {"a": 3})]
    assert any(f"{p}:2:" in m for m in seen) and any(f"{p}:4:" in m for m in seen)
    p.write_bytes(b'{"a": 1}\n{"a": ')
    seen = []
    assert load_jsonl(p, allow_truncated_tail=True, warn=seen.append) == [(1, {"a": 1})]
    assert f"{p}:2: dropping a cut last line" in seen[0]
    with pytest.raises(ValueError, match="not found"):
        load_jsonl(tmp_path / "none.jsonl")
    assert load_jsonl(tmp_path / "none.jsonl", missing_ok=True) == []


def test_writer_is_atomic_standard_and_respects_umask(tmp_path):
    out = tmp_path / "sub" / "o.jsonl"
    old = os.umask(0o027)
    try:
        assert write_jsonl_atomic(out, [{"v": float("nan"), "s": "a\ud800"}, {"v": 1.5}]) == 2
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o640)  # 0666 & ~umask, like open(path, "w")
    lines = out.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"v": None, "s": "a\ud800"} and json.loads(lines[1]) == {"v": 1.5}
    out.chmod(0o600)
    with pytest.raises(RuntimeError):
        with AtomicJsonlWriter(out) as w:
            w.write({"new": 1})
            raise RuntimeError("killed mid-run")
    assert out.read_text(encoding="utf-8").splitlines() == lines  # untouched, and no temp file left
    assert sorted(x.name for x in out.parent.iterdir()) == ["o.jsonl"]
    write_jsonl_atomic(out, [{"new": 1}])
    assert out.stat().st_mode & 0o777 == 0o600  # a replaced file keeps its mode


def test_stale_temp_of_a_dead_process_is_cleaned(tmp_path):
    out = tmp_path / "o.jsonl"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".o.jsonl.{int(dead.stdout)}.tmp"
    live = tmp_path / f".o.jsonl.{os.getppid()}.tmp"  # a running process: left alone
    stale.write_text("half")
    live.write_text("busy")
    assert clean_stale_temps(out) == [stale]
    write_jsonl_atomic(out, [{"a": 1}])
    assert not stale.exists() and live.exists()


def test_output_checks(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"a": 1}\n')
    link = tmp_path / "link.jsonl"
    link.symlink_to(inp)
    hard = tmp_path / "hard.jsonl"
    os.link(inp, hard)
    for bad in (inp, link, hard):
        with pytest.raises(ValueError, match="is the input file"):
            check_output(bad, [inp])
    with pytest.raises(ValueError, match="is a directory"):
        check_output(tmp_path, [inp])
    with pytest.raises(ValueError, match="not a directory"):
        check_output(inp / "x.jsonl", [])
    check_output(tmp_path / "new" / "deeper" / "o.jsonl", [inp])  # folders are created on write
    check_output("-", ["-"])
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            check_output(ro / "o.jsonl", [])
    target = tmp_path / "target.jsonl"
    target.write_text("old\n")
    out_link = tmp_path / "out_link.jsonl"
    out_link.symlink_to(target)
    write_jsonl_atomic(out_link, [{"b": 2}])  # a symlinked output: its target is replaced
    assert out_link.is_symlink() and json.loads(target.read_text()) == {"b": 2}


def test_stdin_and_stdout(monkeypatch, capsysbinary):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"a": 1}\n\xff\n')))
    rows = list(iter_jsonl("-"))
    assert rows[0] == (1, {"a": 1}) and isinstance(rows[1][1], LineError)
    write_jsonl_atomic("-", [{"a": float("inf")}])
    assert capsysbinary.readouterr().out == b'{"a": null}\n'


def test_append_drops_a_cut_line_and_writes_standard_json(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": ')
    append_jsonl(p, [{"a": float("nan")}])
    assert p.read_text() == '{"a": 1}\n{"a": null}\n'


@pytest.mark.parametrize("text, want", [
    ("\\n\\n", "\n\n"), ("。", "。"), ("\u2028", "\u2028"), ("é\\t|", "é\t|"), ("a\\\\b", "a\\b"),
    ("\\u3002\\r", "。\r"), ("Step", "Step"),
])
def test_decode_escapes_keeps_non_ascii(text, want):
    assert decode_escapes(text) == want


@pytest.mark.parametrize("text, needle", [
    ("\\", "lone backslash"), ("ab\\", "lone backslash"), ("\\x41", "unknown escape \\x"),
    ("\\u12", "4 hex digits"), ("\\ud800", "surrogate"),
])
def test_decode_escapes_errors(text, needle):
    with pytest.raises(ValueError, match=needle.replace("\\", "\\\\")):
        decode_escapes(text)


def test_check_device():
    import torch

    check_device(None)
    check_device("cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            check_device("cuda")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_unicode_line_breaks_are_escaped_so_splitlines_sees_one_row(tmp_path):
    out = tmp_path / "o.jsonl"
    write_jsonl_atomic(out, [{"s": "a\u2028b\x85c\u2029d"}, {"s": "é"}])
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"s": "a\u2028b\x85c\u2029d"}, {"s": "é"}]

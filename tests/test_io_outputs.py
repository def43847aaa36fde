"""Output paths (issue 19): devices and FIFOs are written, never replaced; other special files, full disks,
files too large and unwritable places are one message (exit 2) with nothing left behind."""

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest

from freeprm.cli import main
from freeprm.io import AtomicJsonlWriter, OutputError, check_output_dir, output_kind, replace_file, write_jsonl_atomic

ROOT = os.geteuid() == 0


def _mknod(path, major, minor):
    """A character device (a copy of /dev/null 1:3 or /dev/full 1:7) in a temp folder: root only."""
    if not ROOT:
        pytest.skip("needs root (mknod)")
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    except PermissionError:
        pytest.skip("mknod is not permitted here")
    return path


def _input(tmp_path, n=3):
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Q{i}?", "response": f"a {i}.\n\nb."}) + "\n" for i in range(n)))
    return str(p)


def _score(tiny_model_dir, inp, out, *extra):
    return main(["score", "--policy", tiny_model_dir, "-i", inp, "-o", str(out), "--no-progress", *extra])


def _said(err: str, cmd: str = "score") -> list[str]:
    said = [x for x in err.splitlines() if x.startswith(f"freeprm {cmd}:")]
    assert all(x.startswith(f"freeprm {cmd}: error: ") for x in said), said  # the one error format
    return said


def test_output_kind_is_the_one_rule(tmp_path):
    (tmp_path / "f").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    assert output_kind("-") == "stdout"
    assert output_kind(tmp_path / "f") == output_kind(tmp_path / "new") == "file"
    assert output_kind("/dev/null") == output_kind(tmp_path / "fifo") == "stream"
    with pytest.raises(OutputError, match="is a directory"):
        output_kind(tmp_path)
    with pytest.raises(OutputError, match="a folder on its path is a file"):
        output_kind(tmp_path / "f" / "sub")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "sock"))
    try:
        with pytest.raises(OutputError, match="is a socket"):
            AtomicJsonlWriter(tmp_path / "sock")
    finally:
        s.close()
    assert stat.S_ISSOCK(os.lstat(tmp_path / "sock").st_mode)


def test_replace_file_never_replaces_a_special_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "tmp").write_text("new")
    with pytest.raises(OutputError, match="FIFO, not a regular file"):
        replace_file(tmp_path / "tmp", tmp_path / "fifo")
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    (tmp_path / "old").write_text("old")
    replace_file(tmp_path / "tmp", tmp_path / "old")
    assert (tmp_path / "old").read_text() == "new"


def test_a_fifo_gets_the_rows_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    assert write_jsonl_atomic(fifo, [{"a": 1}, {"b": float("nan")}]) == 2
    reader.join(10)
    assert got == [b'{"a": 1}\n{"b": null}\n']
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_score_to_a_character_device_writes_it_and_keeps_it_a_device(tmp_path, tiny_model_dir, capsys):
    # what `-o /dev/null` is, on a private copy: a regression must never replace the machine's /dev/null
    dev = _mknod(tmp_path / "null", 1, 3)
    assert _score(tiny_model_dir, _input(tmp_path), dev) == 0
    assert stat.S_ISCHR(os.lstat(dev).st_mode) and os.major(os.lstat(dev).st_rdev) == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert "scored 3 responses" in capsys.readouterr().err


def test_a_full_device_is_one_message(tmp_path, tiny_model_dir, capsys):
    full = _mknod(tmp_path / "full", 1, 7)  # like /dev/full: every write fails with ENOSPC
    assert _score(tiny_model_dir, _input(tmp_path), full) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and _said(err) == [f"freeprm score: error: cannot write output {full}: the disk is full "
                                                      "(ENOSPC); free space or write elsewhere, then rerun"]
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_a_full_disk_while_committing_leaves_the_old_file(tmp_path, tiny_model_dir, capsys, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    import freeprm.io as fio

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fio.os, "fsync", no_space)
    assert _score(tiny_model_dir, _input(tmp_path), out) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(_said(err)) == 1 and "disk is full (ENOSPC)" in err
    assert out.read_text() == "previous\n" and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_file_too_large_is_one_message(tmp_path, tiny_model_dir):
    inp, out = _input(tmp_path, 40), tmp_path / "out.jsonl"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            "from freeprm.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "score", "--policy", tiny_model_dir, "-i", inp, "-o", str(out),
                        "--no-progress"], capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and len(_said(r.stderr)) == 1 and "too large (EFBIG)" in r.stderr
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("where", ["file_parent", "proc", "sys", "dir"])
def test_score_to_an_impossible_place_is_one_message(tmp_path, tiny_model_dir, capsys, where):
    (tmp_path / "afile").write_text("keep")
    out = {"file_parent": tmp_path / "afile" / "sub", "proc": "/proc/freeprm-x", "sys": "/sys/freeprm-x",
           "dir": tmp_path}[where]
    assert _score(tiny_model_dir, _input(tmp_path), out) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(_said(err)) == 1 and str(out) in _said(err)[0]
    assert (tmp_path / "afile").read_text() == "keep" and not os.path.exists("/proc/freeprm-x")


@pytest.mark.parametrize("cmd", ["train", "bon"])
def test_directory_outputs_refuse_files_and_devices(tmp_path, capsys, cmd):
    (tmp_path / "afile").write_text("keep")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub", "/dev/null"):
        if cmd == "train":
            argv = ["train", "--policy", "/no/such/model", "--data", str(tmp_path / "d.jsonl"), "--out", str(out),
                    "--no-progress"]
        else:
            argv = ["bon", "report", "--out", str(out), "--no-scores"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and ("not a directory" in err or "is a file" in err), err
    assert (tmp_path / "afile").read_text() == "keep"
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b", create=True).is_dir()
    with pytest.raises(OutputError, match="character device, not a directory"):
        check_output_dir("/dev/null")
    if ROOT:
        with pytest.raises(OutputError, match="cannot write output /proc/freeprm-x"):
            check_output_dir("/proc/freeprm-x", create=True)

"""``rerank`` never destroys what is not its own, refuses before writing, and notices changed input (issue 19)."""

import json
import os

import pytest

from freeprm.batch import read_output, rerank
from freeprm.cli import main
from freeprm.engine.scorer import Scorer

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return Scorer(tiny_model_dir, prompt_format="raw")


def _groups(n: int) -> list[dict]:
    return [{"id": f"g{i}", "prompt": f"What is {i} plus one?",
             "candidates": [f"{i} + 1 = {i + 1}.\n\nSo {i + 1}.", f"It is {i}.\n\nDone."]} for i in range(n)]


def _write(path, rows, before=()) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for line in before:
            f.write(line + "\n")
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON literal {c}"))


def test_only_its_own_temp_files_are_removed(tmp_path, scorer):
    inp = _write(tmp_path / "in.jsonl", _groups(3))
    mine = tmp_path / "mydir"  # a folder that was never a rerank output
    mine.mkdir()
    (mine / ".draft.tmp").write_text("precious")
    (mine / ".part-000005.parquet.tmp").write_text("not rerank's: no manifest here")
    rerank(inp, mine, scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    assert (mine / ".draft.tmp").read_text() == "precious"
    assert (mine / ".part-000005.parquet.tmp").exists()
    # a rerank output: a killed run's temp part is removed on the next start, other dot files are kept
    (mine / ".part-000009.parquet.tmp").write_bytes(b"half a part")
    (mine / ".notes.tmp").write_text("mine")
    rerank(inp, mine, scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    assert not (mine / ".part-000009.parquet.tmp").exists()
    assert (mine / ".notes.tmp").read_text() == "mine" and (mine / ".draft.tmp").read_text() == "precious"


@pytest.mark.parametrize("bad", [
    dict(beta=float("nan")), dict(beta=float("inf")), dict(beta=-1.0), dict(beta=0.0), dict(max_length=1),
    dict(policy="/no/such/model"), dict(input_format="parquet"),
])
def test_a_refused_command_writes_nothing_and_the_corrected_one_runs(tmp_path, tiny_model_dir, bad):
    inp = _write(tmp_path / "in.jsonl", _groups(2))
    out = tmp_path / "out"
    kw = dict(policy=tiny_model_dir, prompt_format="raw", rows_per_part=2, progress=False, quiet=True)
    with pytest.raises(ValueError):
        rerank(inp, out, **(kw | bad))
    assert not out.exists()  # no fingerprint, no lock, no directory
    s = rerank(inp, out, **kw)
    assert s.groups == 2
    fp = _strict((out / "fingerprint.json").read_text())
    assert fp["beta"] == 1.0
    for name in ("manifest.jsonl",):
        for line in (out / name).read_text().splitlines():
            _strict(line)
    _strict((out / "summary.json").read_text())


def test_the_fingerprint_waits_for_the_first_part(tmp_path, scorer):
    out = tmp_path / "out"
    inp = _write(tmp_path / "in.jsonl", [], before=["not json", "{}"])  # no group: nothing to write
    s = rerank(inp, out, scorer=scorer, progress=False, quiet=True)
    assert s.groups == 0 and not (out / "fingerprint.json").exists()


def test_a_changed_input_is_refused_naming_the_first_changed_group(tmp_path, scorer):
    out = tmp_path / "out"
    groups = _groups(6)
    kw = dict(scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    rerank(_write(tmp_path / "a.jsonl", groups), out, **kw)
    first = read_output(out)
    # a candidate's text changed in a finished part (same ids)
    changed = json.loads(json.dumps(groups))
    changed[3]["candidates"][1] = "It is 3.\n\nDone!"
    with pytest.raises(ValueError, match=r"input line \(Parquet: row\) 4, id 'g3'.*group 1 of part 1"):
        rerank(_write(tmp_path / "b.jsonl", changed), out, **kw)
    # a prompt changed
    changed = json.loads(json.dumps(groups))
    changed[0]["prompt"] = "What is 0 plus two?"
    with pytest.raises(ValueError, match=r"line \(Parquet: row\) 1, id 'g0'"):
        rerank(_write(tmp_path / "c.jsonl", changed), out, **kw)
    # a bad line inserted above the finished rows: every line number below it moved
    with pytest.raises(ValueError, match=r"line \(Parquet: row\) 2, id 'g0'"):
        rerank(_write(tmp_path / "d.jsonl", groups, before=["a bad line"]), out, **kw)
    # an extra key changed
    changed = json.loads(json.dumps(groups))
    changed[5]["label"] = 1
    with pytest.raises(ValueError, match=r"id 'g5'"):
        rerank(_write(tmp_path / "e.jsonl", changed), out, **kw)
    # the unchanged input resumes, and nothing was modified by the refusals
    s = rerank(_write(tmp_path / "f.jsonl", groups), out, **kw)
    assert (s.parts_written, s.resumed_groups) == (0, 6) and read_output(out) == first


def test_manifest_holds_one_line_per_part_after_a_kill_between_append_and_rename(tmp_path, scorer):
    inp = _write(tmp_path / "in.jsonl", _groups(6))
    out = tmp_path / "out"
    rerank(inp, out, scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "part-000001.parquet").unlink()  # the state a kill between the manifest append and the rename leaves
    (out / "manifest.jsonl").write_text("\n".join(lines + [lines[1]]) + "\n")  # and a second line of part 1
    s = rerank(inp, out, scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    assert s.parts_written == 1
    entries = [_strict(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["part"] for e in entries) == [0, 1, 2] and sum(e["rows"] for e in entries) == 6


def _corrupt_parquet(path, rows, row_group_size):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size, write_page_checksum=True,
                   compression="none")
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)  # the id column of row group 1
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    for k in range(start + col.total_compressed_size - 24, start + col.total_compressed_size - 4):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_parquet_row_group_is_named_and_the_rest_is_scored(tmp_path, scorer, capsys):
    inp = tmp_path / "in.parquet"
    _corrupt_parquet(inp, _groups(9), 3)
    s = rerank(str(inp), tmp_path / "out", scorer=scorer, rows_per_part=2, progress=False)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"row group 1 of {inp} (rows 4..6) could not be read" in err
    assert [r["id"] for r in read_output(tmp_path / "out")] == ["g0", "g1", "g2", "g6", "g7", "g8"]
    assert s.bad_lines == 1
    rc = main(["rerank", "--policy", scorer.policy.name_or_path, "-i", str(inp), "-o", str(tmp_path / "o2"),
               "--strict", "--no-progress", "--prompt-format", "raw"])
    err = capsys.readouterr().err
    said = [x for x in err.splitlines() if x.startswith("freeprm rerank:")]
    assert rc == 2 and "Traceback" not in err and len(said) == 1 and "row group 1" in said[0]


@pytest.mark.parametrize("make", ["file_parent", "file", "devnull"])
def test_output_that_cannot_be_a_directory_is_refused_before_loading(tmp_path, tiny_model_dir, capsys, make):
    inp = _write(tmp_path / "in.jsonl", _groups(1))
    (tmp_path / "afile").write_text("keep")
    out = {"file_parent": tmp_path / "afile" / "sub", "file": tmp_path / "afile", "devnull": "/dev/null"}[make]
    rc = main(["rerank", "--policy", "/no/such/model", "-i", inp, "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "not a directory" in err or "is a file" in err
    assert (tmp_path / "afile").read_text() == "keep"
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


def test_rerank_input_directory_says_so(tmp_path, capsys):
    rc = main(["rerank", "-i", str(tmp_path), "-o", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "is a directory" in err and "not found" not in err

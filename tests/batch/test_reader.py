"""Streaming reader of ``rerank``: row kinds, grouping of flat rows, bad lines, chunking."""

import json

import pytest

from freeprm.batch.reader import BadLine, Group, iter_chunks, iter_groups


def _write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def test_group_and_flat_rows(tmp_path):
    path = _write_lines(tmp_path / "in.jsonl", [
        _j({"id": "a", "prompt": "P", "candidates": ["x", {"response": "y", "label": True}, {"steps": ["s1", "s2"]}],
            "extra": 1}),
        _j({"group": 7, "prompt": "Q", "response": "r1", "id": "c1"}),
        _j({"group": 7, "prompt": "Q", "steps": ["t1", "t2"]}),
        b"",
        _j({"id": "b", "prompt": "R", "response": "only"}),
    ])
    out = list(iter_groups(path))
    assert [type(o) for o in out] == [Group, Group, Group]
    a, g7, b = out
    assert (a.id, a.prompt, a.line) == ("a", "P", 1)
    assert a.candidates == [{"response": "x"}, {"response": "y"}, {"steps": ["s1", "s2"]}]
    assert a.extra == {"extra": 1} and a.cand_extra == [None, {"label": True}, None]
    assert g7.extra is None and g7.cand_extra == [{"id": "c1"}, None] and b.cand_extra == [None]
    assert (g7.id, g7.line, g7.lines) == ("7", 2, [2, 3])
    assert g7.candidates == [{"response": "r1"}, {"steps": ["t1", "t2"]}]
    assert (b.id, b.line, b.candidates) == ("b", 5, [{"response": "only"}])


def test_flat_rows_not_consecutive_are_duplicates_first_kept(tmp_path):
    path = _write_lines(tmp_path / "in.jsonl", [
        _j({"group": "g", "prompt": "P", "response": "1"}),
        _j({"group": "h", "prompt": "P", "response": "2"}),
        _j({"group": "g", "prompt": "P", "response": "3"}),
        _j({"id": "h", "prompt": "P", "candidates": ["4"]}),
    ])
    out = list(iter_groups(path))
    assert [o.id for o in out if isinstance(o, Group)] == ["g", "h"]
    bad = [o for o in out if isinstance(o, BadLine)]
    assert [b.line for b in bad] == [3, 4]
    assert "duplicate id 'g' (first at line 1)" in bad[0].message and "consecutive" in bad[0].message
    assert "duplicate id 'h' (first at line 2)" in bad[1].message


def test_bad_lines_are_reported_with_their_numbers_and_good_lines_kept(tmp_path):
    good = [_j({"id": i, "prompt": "P", "candidates": ["c"]}) for i in range(8)]
    lines = [
        b"\xef\xbb\xbf" + good[0],                                     # 1: BOM: fine
        b'{"id": 1, "prompt": "P\xff", "candidates": ["c"]}',          # 2: invalid UTF-8
        good[1],                                                       # 3
        b'{"id": 2, "prompt": "a\rb", "candidates": ["c"]}',           # 4: raw CR inside: one bad line
        good[3],                                                       # 5
        b'{"id": 9, "prompt": "\\ud800", "candidates": ["c"]}',        # 6: lone surrogate
        b"[" * 100000 + b"]" * 100000,                                 # 7: deep nesting
        b"not json",                                                   # 8
        b"[1, 2]",                                                     # 9: not an object
        _j({"id": 5, "prompt": 3, "candidates": ["c"]}),               # 10: prompt not a string
        _j({"id": 5, "prompt": "P", "candidates": []}),                # 11: no candidates
        _j({"id": 5, "prompt": "P", "candidates": [{"text": "c"}]}),   # 12: candidate without response: rejected alone
        _j({"id": True, "prompt": "P", "candidates": ["c"]}),          # 13: bool id
        _j({"prompt": "P", "response": "c"}),                          # 14: flat row without key
        good[4],                                                       # 15
        b'{"id": 6, "prompt": "P", "candidates": ["ok", "\\udc00", 7]}',  # 16: surrogate / int candidate: rejected alone
    ]
    out = list(iter_groups(_write_lines(tmp_path / "in.jsonl", lines)))
    groups = [o for o in out if isinstance(o, Group)]
    bad = {o.line: o.message for o in out if isinstance(o, BadLine)}
    assert [(g.id, g.line) for g in groups] == [("0", 1), ("1", 3), ("3", 5), ("5", 12), ("4", 15), ("6", 16)]
    assert sorted(bad) == [2, 4, 6, 7, 8, 9, 10, 11, 13, 14]
    assert "UTF-8" in bad[2] and "surrogate" in bad[6] and "nested" in bad[7] and "invalid JSON" in bad[8]
    assert "'prompt'" in bad[10] and "non-empty" in bad[11]
    g5, g6 = groups[3], groups[5]
    assert g5.candidates == [{"error": "has neither 'response' nor 'steps'"}] and g5.cand_extra == [{"text": "c"}]
    assert g6.candidates[0] == {"response": "ok"} and "surrogate" in g6.candidates[1]["error"]
    assert "must be a string or an object" in g6.candidates[2]["error"]


def test_flat_row_with_another_prompt_is_a_bad_line(tmp_path):
    path = _write_lines(tmp_path / "in.jsonl", [
        _j({"group": "g", "prompt": "P", "response": "1"}),
        _j({"group": "g", "prompt": "Q", "response": "2"}),
        _j({"group": "g", "prompt": "P", "response": "3"}),
    ])
    out = list(iter_groups(path))
    assert isinstance(out[0], BadLine) and out[0].line == 2 and "another prompt" in out[0].message
    assert out[1].candidates == [{"response": "1"}, {"response": "3"}] and out[1].lines == [1, 3]


def test_chunks_depend_only_on_the_input(tmp_path):
    lines = [_j({"id": i, "prompt": "P", "candidates": ["c"]}) for i in range(10)]
    lines.insert(4, b"junk")
    out = list(iter_chunks(_write_lines(tmp_path / "in.jsonl", lines), 3))
    chunks = [o for o in out if not isinstance(o, BadLine)]
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert [[g.id for g in c.groups] for c in chunks] == [["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8"], ["9"]]
    assert len({c.ids_digest for c in chunks}) == 4
    with pytest.raises(ValueError, match="rows_per_part"):
        list(iter_chunks(str(tmp_path / "in.jsonl"), 0))


def test_parquet_input_reads_like_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"id": str(i), "prompt": f"P{i}", "candidates": [f"c{i}", f"d{i}"]} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    jl = _write_lines(tmp_path / "in.jsonl", [_j(r) for r in rows])
    a = list(iter_groups(str(tmp_path / "in.parquet")))
    b = list(iter_groups(jl))
    assert a == b and len(a) == 5


def test_parquet_extra_columns_become_plain_json(tmp_path):
    """Parquet-only types in extra keys (timestamps, binary, NaN) become JSON text/null; null columns of the
    other row kind are not extras."""
    pa = pytest.importorskip("pyarrow")
    import datetime

    import pyarrow.parquet as pq

    rows = [{"id": "a", "prompt": "P", "candidates": ["x"], "group": None, "response": None,
             "when": datetime.datetime(2026, 1, 2, 3, 4, 5), "blob": b"\x00\xff", "w": float("nan")},
            {"id": None, "prompt": "P", "candidates": None, "group": "b", "response": "r",
             "when": None, "blob": None, "w": 1.5}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    a, b = iter_groups(str(tmp_path / "in.parquet"))
    assert a.extra == {"when": "2026-01-02T03:04:05", "blob": "AP8=", "w": None}
    assert b.extra is None and b.cand_extra == [{"when": None, "blob": None, "w": 1.5}]

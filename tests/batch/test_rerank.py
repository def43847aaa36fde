"""``rerank`` on the tiny model, in process: output rows, tie rule, formats, resume, fingerprint, errors."""

import json
import os

import pytest

from freeprm.batch import OutputDir, read_output, rerank
from freeprm.engine.scorer import AGGREGATIONS, Scorer

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    return Scorer(tiny_model_dir, prompt_format="raw")


def _groups(n: int, seed: int = 0) -> list[dict]:
    out = []
    for i in range(n):
        k = 1 + (i + seed) % 3
        cands = [f"Step {j}: {i} + {j} = {i + j}.\n\nThe answer is {i + j}." for j in range(k)]
        if i % 4 == 1:
            cands.append({"steps": [f"{i} * 2 = {2 * i}.", "Done."], "label": i % 2 == 0, "src": {"k": [i, "é"]}})
        row = {"id": f"g{i}", "prompt": f"What is {i} plus something?", "candidates": cands}
        if i % 3 == 0:
            row |= {"answer": i, "meta": {"split": "test", "tags": ["a", None, 1.5]}}
        out.append(row)
    return out


def _plain(c) -> dict:
    """A candidate as the scorer takes it (a string, or only its response/steps)."""
    return {"response": c} if isinstance(c, str) else {k: c[k] for k in ("response", "steps") if k in c}


def _write(path, rows, extra_lines=()) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def test_rows_match_the_scorer_per_group(tmp_path, scorer):
    groups = _groups(7)
    flat = [{"group": "flat", "prompt": "Q?", "response": "a.\n\nb."}, {"group": "flat", "prompt": "Q?", "steps": ["c.", "d."]}]
    inp = _write(tmp_path / "in.jsonl", groups + flat)
    s = rerank(inp, tmp_path / "out", scorer=scorer, aggregate="q_mean", rows_per_part=3, progress=False, quiet=True)
    rows = read_output(tmp_path / "out")
    assert [r["id"] for r in rows] == [g["id"] for g in groups] + ["flat"]
    assert (s.groups, s.parts_written, s.bad_lines) == (8, 3, 0)
    expect_groups = [(g["prompt"], [_plain(c) for c in g["candidates"]])
                     for g in groups] + [("Q?", [{"response": "a.\n\nb."}, {"steps": ["c.", "d."]}])]
    assert s.candidates == sum(len(c) for _, c in expect_groups)
    for row, (prompt, cands) in zip(rows, expect_groups):
        res = scorer.score([{"prompt": prompt, **c} for c in cands])  # one group alone: other batches
        assert row["num_candidates"] == len(cands) and row["aggregation"] == "q_mean"
        for agg in AGGREGATIONS:
            assert row[f"score_{agg}"] == pytest.approx([r.aggregate(agg) for r in res], rel=1e-5, abs=1e-5)
        assert row["scores"] == row["score_q_mean"]
        for got, r in zip(row["step_rewards"], res):
            assert got == pytest.approx(r.step_rewards.tolist(), rel=1e-5, abs=1e-5)
        assert row["num_tokens"] == [len(r.input_ids) for r in res]
        best = max(row["scores"])
        assert row["best"] == row["scores"].index(best) and row["best_score"] == best
        assert row["errors"] == [None] * len(cands)
    for row, g in zip(rows, groups):  # extra keys pass through, per group row and per candidate object
        assert row["extra"] == ({k: v for k, v in g.items() if k not in ("id", "prompt", "candidates")} or None)
        assert row["candidate_extra"] == [{k: v for k, v in c.items() if k not in ("response", "steps")} or None
                                          if isinstance(c, dict) else None for c in g["candidates"]]
    assert any(r["extra"] for r in rows) and any(c for r in rows for c in r["candidate_extra"])
    assert rows[-1]["extra"] is None and rows[-1]["candidate_extra"] == [None, None]


def test_ties_pick_the_lowest_index(tmp_path, scorer):
    cands = ["x = 1.\n\nSo 1.", "The answer is 42.", "Hmm.\n\nMaybe 7."]
    scores = [r.score for r in scorer.score([{"prompt": "P", "response": c} for c in cands])]
    top = cands[scores.index(max(scores))]
    others = [c for c in cands if c != top]
    inp = _write(tmp_path / "in.jsonl", [{"id": 1, "prompt": "P", "candidates": [others[0], top, others[1], top]}])
    rerank(inp, tmp_path / "out", scorer=scorer, progress=False, quiet=True)
    (row,) = read_output(tmp_path / "out")
    assert row["scores"][1] == row["scores"][3] == row["best_score"]
    assert row["best"] == 1


def test_jsonl_and_parquet_outputs_hold_the_same_rows(tmp_path, scorer):
    inp = _write(tmp_path / "in.jsonl", _groups(5))
    rerank(inp, tmp_path / "pq", scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    rerank(inp, tmp_path / "jl", scorer=scorer, rows_per_part=2, format="jsonl", progress=False, quiet=True)
    assert {"fingerprint.json", "manifest.jsonl", "part-000000.parquet", "part-000002.parquet"} <= set(os.listdir(tmp_path / "pq"))
    assert read_output(tmp_path / "pq") == read_output(tmp_path / "jl")


def test_resume_recomputes_only_missing_parts_and_cleans_up(tmp_path, scorer):
    inp = _write(tmp_path / "in.jsonl", _groups(9))
    out = tmp_path / "out"
    rerank(inp, out, scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    full = read_output(out)
    manifest = (out / "manifest.jsonl").read_text()
    # what a kill can leave: a missing part (killed before its rename), its temp file, a torn manifest line
    (out / "part-000002.parquet").unlink()
    (out / ".part-000002.parquet.tmp").write_bytes(b"half a parquet file")
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"part": 7, "ro')
    s = rerank(inp, out, scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    assert (s.parts_written, s.resumed_parts, s.groups, s.resumed_groups) == (1, 4, 2, 7)
    assert read_output(out) == full
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    lines = (out / "manifest.jsonl").read_text().splitlines()
    # exactly one line per part: part 2's old line (its part is gone) is dropped, its new one appended
    assert lines[:-1] == [x for x in manifest.splitlines() if json.loads(x)["part"] != 2]
    assert json.loads(lines[-1])["part"] == 2 and len(lines) == 5
    again = rerank(inp, out, scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    assert (again.parts_written, again.resumed_groups) == (0, 9)


def test_another_configuration_is_refused(tmp_path, scorer, tiny_model_dir):
    inp = _write(tmp_path / "in.jsonl", _groups(3))
    out = tmp_path / "out"
    rerank(inp, out, policy=tiny_model_dir, prompt_format="raw", rows_per_part=2, progress=False, quiet=True)
    for kwargs, key in [({"aggregate": "last"}, "aggregate"), ({"beta": 2.0}, "beta"), ({"rows_per_part": 3}, "rows_per_part"),
                        ({"step_delimiter": "\n"}, "step_delimiter"), ({"format": "jsonl"}, "format"),
                        ({"dtype": "bfloat16"}, "dtype"), ({"prompt_format": "chat"}, "prompt_format")]:
        opts = dict(policy=tiny_model_dir, prompt_format="raw", rows_per_part=2, progress=False, quiet=True) | kwargs
        with pytest.raises(ValueError, match=f"another configuration.*{key}.*delete"):
            rerank(inp, out, **opts)
    with pytest.raises(ValueError, match="another configuration.*policy"):  # same options, other weights
        rerank(inp, out, scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    # the same configuration resumes (here: nothing left to do)
    s = rerank(inp, out, policy=tiny_model_dir, prompt_format="raw", rows_per_part=2, progress=False, quiet=True)
    assert s.resumed_groups == 3 and s.parts_written == 0


def test_changed_input_is_refused(tmp_path, scorer):
    out = tmp_path / "out"
    rerank(_write(tmp_path / "a.jsonl", _groups(4)), out, scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    changed = _groups(4)
    changed[1]["id"] = "other"
    with pytest.raises(ValueError, match="input changed"):
        rerank(_write(tmp_path / "b.jsonl", changed), out, scorer=scorer, rows_per_part=2, progress=False, quiet=True)


def test_bad_lines_are_skipped_and_counted(tmp_path, scorer, capsys):
    groups = _groups(4)
    inp = _write(tmp_path / "in.jsonl", groups, extra_lines=['{"id": "x", "prompt": "P"', json.dumps(groups[0])])
    s = rerank(inp, tmp_path / "out", scorer=scorer, rows_per_part=2, progress=False)
    err = capsys.readouterr().err
    assert f"{inp}:5: invalid JSON" in err and f"{inp}:6: duplicate id 'g0'" in err
    assert (s.groups, s.bad_lines, s.invalid_candidates, s.unscored_groups) == (4, 2, 0, 0)
    assert [r["id"] for r in read_output(tmp_path / "out")] == ["g0", "g1", "g2", "g3"]
    again = rerank(inp, tmp_path / "out", scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    assert (again.bad_lines, again.resumed_groups) == (2, 4)


# rejected candidates: zero steps, empty, a lone surrogate (raw \ud800 escape in the JSONL), not a string, no response
_MIXED = ('{"id": "mix", "prompt": "Q?", "candidates": ["fine.\\n\\nok.", "   ", "\\ud800 x", 7, '
          '{"steps": ["a.", "b."], "label": 1}, {"text": "no response"}, "also fine."], "k": "v"}')
_ALL_BAD = '{"id": "none", "prompt": "Q?", "candidates": ["", "  "]}'


def test_a_rejected_candidate_costs_only_itself(tmp_path, scorer, capsys):
    """One bad candidate no longer loses its group: the good ones are scored, best is picked among them."""
    lines = [json.dumps({"id": "ok", "prompt": "Q?", "candidates": ["a.\n\nb."]}), _MIXED, _ALL_BAD,
             json.dumps({"group": "flat", "prompt": "Q?", "response": "x."}),
             json.dumps({"group": "flat", "prompt": "Q?", "response": " ", "id": "c1"})]
    inp = str(tmp_path / "in.jsonl")
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    s = rerank(inp, tmp_path / "pq", scorer=scorer, rows_per_part=2, progress=False)
    err = capsys.readouterr().err
    rows = read_output(tmp_path / "pq")
    assert [r["id"] for r in rows] == ["ok", "mix", "none", "flat"]
    mix, none, flat = rows[1], rows[2], rows[3]
    good = {0: {"response": "fine.\n\nok."}, 4: {"steps": ["a.", "b."]}, 6: {"response": "also fine."}}
    res = dict(zip(good, scorer.score([{"prompt": "Q?", **c} for c in good.values()])))
    assert mix["num_candidates"] == 7
    for agg in AGGREGATIONS:
        got = mix[f"score_{agg}"]
        assert [k for k, v in enumerate(got) if v is not None] == [0, 4, 6]
        assert [got[k] for k in good] == pytest.approx([res[k].aggregate(agg) for k in good], rel=1e-5, abs=1e-5)
    assert [k for k, v in enumerate(mix["step_rewards"]) if v is not None] == [0, 4, 6]
    assert [k for k, v in enumerate(mix["num_tokens"]) if v is not None] == [0, 4, 6]
    top = max(good, key=lambda k: (mix["scores"][k], -k))
    assert mix["best"] == top and mix["best_score"] == mix["scores"][top]
    errs = mix["errors"]
    assert [k for k, e in enumerate(errs) if e] == [1, 2, 3, 5]
    assert errs[1].startswith("group 'mix': candidate 1:") and "empty response" in errs[1]
    assert errs[2].startswith("group 'mix': candidate 2:") and "surrogate" in errs[2]
    assert "candidate 3: must be a string or an object" in errs[3] and "candidate 5: has neither" in errs[5]
    assert mix["extra"] == {"k": "v"} and mix["candidate_extra"][4] == {"label": 1}
    assert mix["candidate_extra"][5] == {"text": "no response"}
    assert none["best"] is None and none["best_score"] is None and none["scores"] == [None, None]
    assert none["errors"][0].startswith("group 'none': candidate 0:") and none["errors"][1]
    assert flat["best"] == 0 and flat["scores"][1] is None and flat["candidate_extra"] == [None, {"id": "c1"}]
    assert f"{inp}:5: group 'flat': candidate 1:" in err  # a flat row's own line
    assert f"{inp}:2: group 'mix': candidate 2:" in err
    assert (s.groups, s.candidates, s.invalid_candidates, s.unscored_groups) == (4, 5, 7, 1)
    # the same rows in JSONL parts, and on resume (counts come back from the manifest)
    rerank(inp, tmp_path / "jl", scorer=scorer, rows_per_part=2, format="jsonl", progress=False, quiet=True)
    assert read_output(tmp_path / "jl") == rows
    again = rerank(inp, tmp_path / "pq", scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    assert (again.resumed_groups, again.invalid_candidates, again.unscored_groups) == (4, 7, 1)
    with pytest.raises(ValueError, match=r"in.jsonl:2: group 'mix': candidate 1.*--strict"):
        rerank(inp, tmp_path / "strict", scorer=scorer, rows_per_part=2, progress=False, strict=True)


def test_extra_keys_in_parquet_and_jsonl_parts_and_after_resume(tmp_path, scorer):
    import pyarrow.parquet as pq

    inp = _write(tmp_path / "in.jsonl", _groups(6))
    rerank(inp, tmp_path / "pq", scorer=scorer, rows_per_part=2, progress=False, quiet=True)
    rerank(inp, tmp_path / "jl", scorer=scorer, rows_per_part=2, format="jsonl", progress=False, quiet=True)
    full = read_output(tmp_path / "pq")
    assert full[0]["extra"] == {"answer": 0, "meta": {"split": "test", "tags": ["a", None, 1.5]}}
    assert full[1]["candidate_extra"][-1] == {"label": False, "src": {"k": [1, "é"]}}
    raw = pq.read_table(tmp_path / "pq" / "part-000000.parquet").to_pylist()  # Parquet: JSON object text
    assert json.loads(raw[0]["extra"]) == full[0]["extra"] and raw[1]["extra"] is None
    jl = [json.loads(x) for x in (tmp_path / "jl" / "part-000000.jsonl").read_text().splitlines()]
    assert jl[0]["extra"] == full[0]["extra"] and jl[1]["candidate_extra"] == full[1]["candidate_extra"]
    for d in ("pq", "jl"):
        (p,) = [p for p in os.listdir(tmp_path / d) if p.startswith("part-000001")]
        os.unlink(tmp_path / d / p)
        fmt = "parquet" if d == "pq" else "jsonl"
        s = rerank(inp, tmp_path / d, scorer=scorer, rows_per_part=2, format=fmt, progress=False, quiet=True)
        assert s.parts_written == 1 and read_output(tmp_path / d) == full


def test_output_of_an_older_version_or_a_damaged_fingerprint_is_refused_clearly(tmp_path, scorer):
    inp = _write(tmp_path / "in.jsonl", _groups(2))
    out = tmp_path / "out"
    rerank(inp, out, scorer=scorer, progress=False, quiet=True)
    fp = json.loads((out / "fingerprint.json").read_text())
    (out / "fingerprint.json").write_text(json.dumps(fp | {"version": 1}))
    with pytest.raises(ValueError, match=r"another version of freeprm rerank \(output format 1; this version writes "
                                         r"format 2.*cannot be resumed.*delete"):
        rerank(inp, out, scorer=scorer, progress=False, quiet=True)
    (out / "fingerprint.json").write_text('{"version": 2, "pol')
    with pytest.raises(ValueError, match=r"fingerprint.json is damaged.*Delete"):
        rerank(inp, out, scorer=scorer, progress=False, quiet=True)


def test_one_writer_per_directory_and_bad_arguments(tmp_path, scorer):
    inp = _write(tmp_path / "in.jsonl", _groups(2))
    fp = {"x": 1}
    with OutputDir(tmp_path / "out", fp, "parquet"):
        with pytest.raises(ValueError, match="another rerank run is writing"):
            OutputDir(tmp_path / "out", fp, "parquet")
    with pytest.raises(ValueError, match="input file not found"):
        rerank(tmp_path / "missing.jsonl", tmp_path / "o", scorer=scorer)
    with pytest.raises(ValueError, match="is the input file"):
        rerank(inp, inp, scorer=scorer)
    with pytest.raises(ValueError, match="aggregate"):
        rerank(inp, tmp_path / "o", scorer=scorer, aggregate="median")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        rerank(inp, tmp_path / "file", scorer=scorer, progress=False, quiet=True)


def test_cli(tmp_path, tiny_model_dir, capsys):
    from freeprm.cli import main

    inp = _write(tmp_path / "in.jsonl", _groups(3))
    args = ["rerank", "--policy", tiny_model_dir, "--input", inp, "--output", str(tmp_path / "out"),
            "--format", "jsonl", "--rows-per-part", "2", "--no-progress", "--aggregate", "last"]
    assert main(args) == 0
    assert "3 groups" in capsys.readouterr().err
    rows = read_output(tmp_path / "out")
    assert [r["id"] for r in rows] == ["g0", "g1", "g2"] and rows[0]["aggregation"] == "last"
    assert main(args[:-1] + ["min"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_slow_step_pattern_is_bounded_per_candidate(tmp_path, tiny_model_dir, capsys):
    """--pattern-timeout: a catastrophic regex on one candidate rejects that candidate only; the rest is scored."""
    scorer = Scorer(tiny_model_dir, prompt_format="raw", step_pattern="(a+)+$|X")
    rows_in = [{"id": "ok1", "prompt": "Q?", "candidates": ["one X two"]},
               {"id": "slow", "prompt": "Q?", "candidates": ["fine X", "a" * 40 + "!"]},
               {"id": "ok2", "prompt": "Q?", "candidates": ["three X four", "five"]}]
    inp = _write(tmp_path / "in.jsonl", rows_in)
    s = rerank(inp, tmp_path / "out", scorer=scorer, rows_per_part=10, progress=False, pattern_timeout=0.2)
    rows = read_output(tmp_path / "out")
    assert [r["id"] for r in rows] == ["ok1", "slow", "ok2"]
    assert rows[1]["best"] == 0 and rows[1]["scores"][1] is None and "took over 0.2 s" in rows[1]["errors"][1]
    assert s.invalid_candidates == 1
    assert "group 'slow': candidate 1: --step-pattern took over 0.2 s" in capsys.readouterr().err

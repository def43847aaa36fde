"""Ray Data engine on a local 2-CPU Ray instance: same parts as the local engine; resume by anti-join.

One Ray start for the module (it costs seconds); actors take fractional CPUs so the read task
is not starved on 2 cores.
"""

import json
import shutil

import pytest

from freeprm.batch import read_output, rerank

pa = pytest.importorskip("pyarrow")
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


def _input(path) -> str:
    with open(path, "w") as f:
        for i in range(30):
            cands = [f"{i} - {j} = {i - j}.\n\nAnswer: {i - j}." for j in range(1 + i % 4)]
            if i == 7:
                cands.append("")  # a rejected candidate (empty response): the others are scored
            if i == 9:
                cands = ["  ", {"text": "no response", "label": 0}]  # no valid candidate: best is null
            row = {"id": f"q{i}", "prompt": f"Subtract from {i}.", "candidates": cands}
            if i % 5 == 0:
                row["meta"] = {"i": i, "name": f"q{i}"}  # extra keys pass through
            f.write(json.dumps(row) + "\n")
            if i == 12:
                f.write('{"id": "broken", \n')
        f.write(json.dumps({"group": "flat", "prompt": "P", "response": "x.\n\ny."}) + "\n")
        f.write(json.dumps({"group": "flat", "prompt": "P", "steps": ["z.", "w."]}) + "\n")
    return str(path)


def test_ray_engine_resumes_a_local_run_and_writes_identical_parts(tmp_path, tiny_model_dir, ray_local):
    inp = _input(tmp_path / "in.jsonl")
    opts = dict(policy=tiny_model_dir, prompt_format="raw", rows_per_part=4, progress=False, quiet=True)
    local = rerank(inp, tmp_path / "local", **opts)
    assert (local.groups, local.parts_written, local.bad_lines, local.invalid_candidates, local.unscored_groups) == \
        (31, 8, 1, 3, 1)
    # a half-finished job: only parts 1 and 5 survive; Ray finishes it (anti-join on the written parts)
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    for k in (0, 2, 3, 4, 6, 7):
        (tmp_path / "ray" / f"part-{k:06d}.parquet").unlink()
    s = rerank(inp, tmp_path / "ray", engine="ray", workers=2, num_cpus_per_worker=0.5, torch_threads=1, **opts)
    assert (s.parts_written, s.resumed_parts, s.resumed_groups) == (6, 2, 8)  # part 1 holds q7
    assert (s.bad_lines, s.invalid_candidates, s.unscored_groups) == (1, 3, 1)
    assert s.groups + s.resumed_groups == 31
    rows = read_output(tmp_path / "ray")
    assert rows == read_output(tmp_path / "local")  # bitwise, all parts
    q7, q9 = rows[7], rows[9]
    assert q7["scores"][-1] is None and None not in q7["scores"][:-1] and "candidate 4: empty" in q7["errors"][-1]
    assert q9["best"] is None and q9["candidate_extra"] == [None, {"text": "no response", "label": 0}]
    assert rows[10]["extra"] == {"meta": {"i": 10, "name": "q10"}}
    man = lambda d: {e["part"]: e for e in map(json.loads, open(d / "manifest.jsonl"))}  # noqa: E731
    assert man(tmp_path / "ray") == man(tmp_path / "local")


def test_rerank_udf_on_user_batches(tiny_model_dir):
    from freeprm.batch import RerankUDF
    from freeprm.engine.scorer import Scorer

    udf = RerankUDF(tiny_model_dir, prompt_format="raw", aggregate="last")
    batch = pa.Table.from_pylist([{"id": "a", "prompt": "P", "candidates": ["1.\n\n2.", "3."], "x": None},
                                  {"id": "b", "prompt": "P", "candidates": ["", "ok."], "x": 5},
                                  {"id": "c", "prompt": None, "candidates": ["ok."], "x": None}])
    out = udf(batch).to_pylist()
    assert [r["id"] for r in out] == ["a", "b", "c"]
    assert out[0]["error"] is None and out[0]["errors"] == [None, None] and json.loads(out[0]["extra"]) == {"x": None}
    assert out[1]["error"] is None and out[1]["best"] == 1 and out[1]["scores"][0] is None
    assert out[1]["errors"][0].startswith("group 'b': candidate 0: empty") and json.loads(out[1]["extra"]) == {"x": 5}
    assert "'prompt' must be a string" in out[2]["error"] and out[2]["best"] is None
    ref = Scorer(tiny_model_dir, prompt_format="raw", aggregate="last").score(
        [{"prompt": "P", "response": "1.\n\n2."}, {"prompt": "P", "response": "3."}])
    assert out[0]["scores"] == pytest.approx([r.score for r in ref], rel=1e-5, abs=1e-5)
    assert out[0]["best"] == max(range(2), key=lambda i: (out[0]["scores"][i], -i))

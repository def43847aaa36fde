"""``freeprm search``: resumable output (kill -9 at every write stage and from outside, then resume = an uninterrupted
run), a changed configuration refused, bad lines skipped, task input graded."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from freeprm.cli import main
from freeprm.search import SearchConfig
from freeprm.search.run import read_prompts, read_search_output, run_search

N_PROMPTS, PER_PART = 16, 2  # 8 parts
OPTS = ["--n", "4", "--beam-width", "2", "--max-steps", "3", "--max-step-tokens", "6", "--temperature", "1.0",
        "--prompt-format", "raw", "--prompts-per-part", str(PER_PART), "--no-progress"]


def _inputs(tmp_path):
    inp = tmp_path / "prompts.jsonl"
    with open(inp, "w") as f:
        for i in range(N_PROMPTS):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + {i}?", "tag": i}) + "\n")
            if i == 3:
                f.write("not json\n")
    return str(inp)


def _env(**extra):
    # FREEPRM_CPU_EXT=0: the pure-torch LM head here and in the in-process reference run (same values; and no
    # subprocess waits on another process building the optional C++ kernel)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", FREEPRM_CPU_EXT="0")
    env.pop("FREEPRM_FAULT", None)
    env.update(extra)
    return env


def _parts(out):
    try:
        return sum(1 for p in os.listdir(out) if p.startswith("part-"))
    except FileNotFoundError:
        return 0


def test_kill9_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, tiny_ref_dir, monkeypatch):
    monkeypatch.setenv("FREEPRM_CPU_EXT", "0")
    inp, out = _inputs(tmp_path), str(tmp_path / "out")
    cmd = [sys.executable, "-m", "freeprm.cli", "search", "--policy", tiny_model_dir, "--reference", tiny_ref_dir,
           "--input", inp, "--output", out, *OPTS]
    # from outside, once the first part is on disk (mid-way through the second chunk's search)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while proc.poll() is None and _parts(out) < 1 and time.monotonic() - t0 < 240:
        time.sleep(0.005)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    k = _parts(out)  # parts 0 .. k-1 are on disk
    assert 1 <= k <= N_PROMPTS // PER_PART - 3
    for stage, part in [("tmp", k), ("manifest", k + 1), ("rename", k + 2)]:  # inside a part's write sequence
        r = subprocess.run(cmd, env=_env(FREEPRM_FAULT=f"rerank.{stage}:{part}"), capture_output=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
    # on disk: 0 .. k + 2 (part k + 1 was redone by the third run: its manifest line was there, its file was not)
    assert _parts(out) == k + 3
    assert not os.path.exists(os.path.join(out, "summary.json"))
    r = subprocess.run(cmd, env=_env(), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert ":5: invalid JSON" in r.stderr.decode() and "1 bad lines skipped" in r.stderr.decode()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    resumed = read_search_output(out)
    assert [row["id"] for row in resumed] == [f"q{i}" for i in range(N_PROMPTS)]
    # the uninterrupted run, in this process
    rows, bad = read_prompts(inp, quiet=True)
    assert bad == 1
    cfg = SearchConfig(n=4, beam_width=2, max_steps=3, max_step_tokens=6, temperature=1.0)
    ref_out = tmp_path / "ref"
    run_search(rows, ref_out, config=cfg, policy=tiny_model_dir, reference=tiny_ref_dir, prompts_per_part=PER_PART,
               source={"input": "jsonl"}, progress=False, quiet=True, prompt_format="raw")
    assert read_search_output(ref_out) == resumed
    assert resumed[0]["extra"] == {"tag": 0} and resumed[0]["candidates"]


def test_changed_configuration_is_refused_and_bad_options(tmp_path, tiny_model_dir, capsys):
    inp, out = _inputs(tmp_path), str(tmp_path / "out")
    base = ["search", "--policy", tiny_model_dir, "--input", inp, "--output", out, *OPTS]
    assert main(base) == 0
    before = sorted(os.listdir(out))
    assert main(base[:-1] + ["--max-steps", "4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "search.max_steps: written with 3, now 4" in err
    assert sorted(os.listdir(out)) == before
    assert main(base) == 0  # the same command again: everything already done
    assert f"{N_PROMPTS} prompts already done" in capsys.readouterr().err
    for extra, msg in [(["--beam-width", "3"], "multiple of beam_width"), (["--step-pattern", "x"], "not supported")]:
        assert main(base + extra) == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # --aggregate has choices (generated from ScoringConfig): the parser refuses
        main(base + ["--aggregate", "max"])
    assert e.value.code == 2 and "invalid choice: 'max'" in capsys.readouterr().err
    assert main(["search", "--policy", tiny_model_dir, "--output", out]) == 2
    assert "exactly one of --task or --input" in capsys.readouterr().err


def test_task_input_is_graded(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    assert main(["search", "--policy", tiny_model_dir, "--task", "arith", "--limit", "2", "--output", str(out),
                 "--method", "best_of_n", "--n", "2", "--max-steps", "2", "--max-step-tokens", "4",
                 "--no-progress"]) == 0
    rows = read_search_output(out)
    assert [r["id"] for r in rows] == ["arith-s0-0", "arith-s0-1"]
    for r in rows:
        assert r["gold"] and len(r["correct"]) == len(r["candidates"]) == 2
        assert r["best_correct"] in (True, False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["graded"] == 2 and summary["prompts"] == 2


@pytest.mark.parametrize("line,why", [('{"prompt": ""}', "non-empty string"), ('{"id": [1], "prompt": "x"}', "'id'"),
                                      ('{"id": "a", "prompt": "x"}', "duplicate id")])
def test_prompt_reader_bad_lines(tmp_path, line, why, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "a", "prompt": "ok"}\n' + line + "\n")
    rows, bad = read_prompts(str(p))
    assert bad == 1 and [r.id for r in rows] == ["a"]
    assert "p.jsonl:2: " in capsys.readouterr().err

"""``kill -9`` at many points, rerun until done: exactly one row per input id, equal to an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from freeprm.batch import read_output, rerank

pytest.importorskip("pyarrow")

N_GROUPS, ROWS_PER_PART = 240, 12  # 20 parts


def _cmd(inp, out, model):
    return [sys.executable, "-m", "freeprm.cli", "rerank", "--policy", model, "--input", inp, "--output", out,
            "--rows-per-part", str(ROWS_PER_PART), "--prompt-format", "raw", "--no-progress"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("FREEPRM_FAULT", None)
    env.update(extra)
    return env


def _parts(out) -> int:
    try:
        return sum(1 for p in os.listdir(out) if p.startswith("part-"))
    except FileNotFoundError:
        return 0


def test_repeated_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    rng = random.Random(1234)
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        for i in range(N_GROUPS):
            cands = [f"{i} + {j} = {i + j}.\n\nSo {i + j}." for j in range(1 + i % 3)]
            f.write(json.dumps({"id": i, "prompt": f"Add to {i}.", "candidates": cands}) + "\n")
            if i == 100:
                f.write("a bad line\n")
    inp = str(inp)
    out = str(tmp_path / "out")
    cmd = _cmd(inp, out, tiny_model_dir)
    kills = 0
    # 1) kills injected inside the write sequence: after the temp file, after the manifest line, after the rename
    for stage, part in [("tmp", 2), ("manifest", 5), ("rename", 8)]:
        t0 = time.monotonic()
        r = subprocess.run(cmd, env=_env(FREEPRM_FAULT=f"rerank.{stage}:{part}"), capture_output=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
        if stage == "tmp":
            # start-up plus two parts on this machine: a random delay below it lands before the 12 parts left are done
            # (a fixed 0.5-4 s delay outlived the whole run on a quiet machine, so no kill happened)
            short_run = time.monotonic() - t0
        kills += 1
    assert any(p.endswith(".tmp") for p in os.listdir(out)) or _parts(out) >= 8
    # 2) kills from outside: after a random delay, and when a random number of parts exists
    for mode in ("delay", "parts"):
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start_parts, t0 = _parts(out), time.monotonic()
        delay, target = rng.uniform(0.2, 1.0) * short_run, start_parts + rng.randint(1, 3)
        while proc.poll() is None and time.monotonic() - t0 < 240:
            if (mode == "delay" and time.monotonic() - t0 > delay) or (mode == "parts" and _parts(out) >= target):
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    # 3) rerun until it finishes
    r = subprocess.run(cmd, env=_env(), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert "a bad line" not in r.stderr.decode() and ":102: invalid JSON" in r.stderr.decode()
    assert kills >= 4
    resumed = read_output(out)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    # the uninterrupted run, in this process (same single-thread setting)
    ref_out = tmp_path / "ref"
    rerank(inp, ref_out, policy=tiny_model_dir, prompt_format="raw", rows_per_part=ROWS_PER_PART, progress=False,
           quiet=True)
    reference = read_output(ref_out)
    ids = [r["id"] for r in resumed]
    assert len(ids) == len(set(ids)) == N_GROUPS
    assert resumed == reference  # bitwise: same chunks, same batches
    manifest = [json.loads(line) for line in open(os.path.join(out, "manifest.jsonl"))]
    # exactly one line per part, although a kill fell between a manifest append and its rename
    assert sorted(m["part"] for m in manifest) == list(range(N_GROUPS // ROWS_PER_PART))
    assert sum(m["rows"] for m in manifest) == N_GROUPS

"""bench/gpu_checklist.sh and gpu_checklist_more.sh: their plans fit the budget, a stuck step is cut and the archive
still written, and the --dry-run (CPU, tiny shapes) runs every step of the first GPU run and records its rows."""

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("gpu_checklist", "gpu_checklist_more")
WALL_LIMIT_S = 480  # one device call of at most 8 minutes


def _plan(script: str) -> list[tuple[str, int]]:
    text = (ROOT / "bench" / f"{script}.sh").read_text()
    plan = re.search(r'^PLAN="([^"]+)"', text, re.M)[1]
    return [(e.split(":")[0], int(e.split(":")[1])) for e in plan.split()]


def _run(args, out, timeout=600, **env):
    full = {**os.environ, "OUT": str(out), "PY": sys.executable, **env}
    full.pop("TRITON_INTERPRET", None)  # the script sets what it needs
    return subprocess.run(["bash", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_plan_fits_the_wall_limit(script, tmp_path):
    plan = _plan(script)
    proc = _run([f"bench/{script}.sh", "--plan"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    budget = int(re.search(r"budget (\d+)s", proc.stdout)[1])
    reserve = int(re.search(r"reserve (\d+)s", proc.stdout)[1])
    assert sum(s for _, s in plan) + reserve <= budget <= WALL_LIMIT_S - 30, (plan, budget)
    assert not (tmp_path / "results.jsonl").exists()  # --plan runs nothing
    # a budget the plan does not fit is refused before anything runs
    proc = _run([f"bench/{script}.sh", "--plan"], tmp_path, BUDGET="100")
    assert proc.returncode == 3 and "does not fit" in proc.stderr


def test_a_stuck_step_is_cut_and_the_archive_written(tmp_path):
    script = tmp_path / "mini.sh"
    script.write_text(f'set -u\ncd {ROOT}\nPLAN="stuck:6 after:6"\n. bench/checklist_lib.sh\n'
                      'checklist_begin mini "$@"\nstep stuck sleep 30\nstep after echo fine\nchecklist_end\n')
    t0 = time.monotonic()
    proc = _run([str(script)], tmp_path / "out", BUDGET="30", RESERVE="5")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 25
    steps = {r["step"]: r for r in _rows(tmp_path / "out") if r["kind"] == "step"}
    assert steps["stuck"]["status"] == "timeout" and steps["after"]["status"] == "ok"
    assert (tmp_path / "out" / "mini.tar.gz").exists()
    assert "fine" in (tmp_path / "out" / "checklist.log").read_text()


def test_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "out"
    proc = _run(["bench/gpu_checklist.sh", "--dry-run"], out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(out)
    assert rows[0]["kind"] == "plan" and rows[0]["dry_run"] == 1
    steps = {r["step"]: r["status"] for r in rows if r["kind"] == "step"}
    assert steps == {name: "ok" for name, _ in _plan("gpu_checklist")}, steps
    env = next(r for r in rows if r["kind"] == "env" and "tag" not in r)
    assert env["device"].startswith("CPU") and "torch" in env
    for tag in ("bf16_n4096", "bf16_n16384"):
        head = {r["provider"]: r for r in rows if r.get("tag") == tag and r["kind"] == "head"}
        assert set(head) == {"gemm", "liger", "cce", "freeprm"}, head
        assert head["freeprm"]["status"] == "ok" and head["gemm"]["status"] == "ok"
        assert head["freeprm"]["err_logp"] < 0.1 and "full_x_gemm" in head["freeprm"]
        assert head["liger"]["status"].startswith(("skipped", "ok")), head["liger"]
    assert len([r for r in rows if r.get("tag") == "compile_cold" and r["kind"] == "compile_sweep"]) == 2
    fused = {r["provider"]: r for r in rows if r.get("tag") == "fused_rewards" and r["kind"] == "policy_ref"}
    assert fused["freeprm fused"]["status"] == "ok" and fused["freeprm fused"]["err_reward"] < 1e-3
    # only a few files under $OUT (the device tool returns 8), the bench files in the archive
    assert sorted(p.name for p in out.iterdir()) == ["checklist.log", "gpu_checklist.tar.gz", "results.jsonl"]
    with tarfile.open(out / "gpu_checklist.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith(".md") and "bf16_n16384" in n for n in names), names


def test_docs_list_the_scripts_steps():
    doc = (ROOT / "docs" / "kernels.md").read_text()
    section = doc[doc.index("## GPU checklist"):]
    section = section[:section.find("\n## ", 4)] if "\n## " in section[4:] else section
    for script in SCRIPTS:
        assert f"bench/{script}.sh" in section
        for name, limit in _plan(script):
            assert re.search(rf"`{name}`[^\n]*\b{limit} s\b", section), f"{script}: step {name} ({limit} s) not in docs"

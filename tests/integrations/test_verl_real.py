"""FreePRMRewardManager inside a real verl, where one is importable (optional; skipped otherwise, with the reason).

Light requirements (the ``verl-test`` extra): tensordict, omegaconf, aiohttp, codetiming, orjson. verl itself
pulls vLLM and more, so it is not installed; point ``FREEPRM_VERL_PATHS`` at unpacked wheels instead
(``pip download --no-deps verl==0.5.0 -d w && unzip w/verl-0.5.0-*.whl -d w/verl-0.5.0``; several roots
separated by ``:``), or install one with ``pip install --no-deps verl==0.9.1``. Each verl runs in its own
subprocess (``verl_real_check.py``).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def _roots() -> list[str]:
    roots = [r for r in os.environ.get("FREEPRM_VERL_PATHS", "").split(os.pathsep) if r]
    return roots or ["<installed>"]


@pytest.mark.parametrize("root", _roots())
def test_verl_real_dataproto(root):
    missing = [m for m in ("tensordict", "omegaconf") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"real verl test skipped: {', '.join(missing)} not installed (pip install '.[verl-test]')")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if root == "<installed>":
        if importlib.util.find_spec("verl") is None:
            pytest.skip("real verl test skipped: verl is not importable; set FREEPRM_VERL_PATHS to unpacked verl "
                        "wheels (see this file's docstring) or pip install --no-deps verl")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    else:
        if not (Path(root) / "verl" / "__init__.py").is_file():
            pytest.skip(f"real verl test skipped: no verl package under {root}")
        env["PYTHONPATH"] = os.pathsep.join([root, str(ROOT)])
    proc = subprocess.run([sys.executable, str(HERE / "verl_real_check.py")], env=env, capture_output=True,
                          text=True, timeout=600, cwd=str(ROOT))
    if proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr and "freeprm" not in proc.stderr.splitlines()[-1]:
        pytest.skip(f"real verl test skipped: {proc.stderr.strip().splitlines()[-1]} (pip install '.[verl-test]')")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("OK ")

"""Helpers of bench/gpu_checklist.sh: the environment row and the test summary row, appended to a JSONL file.

    python bench/checklist_tools.py env RESULTS.jsonl          # device, versions, optional baselines
    python bench/checklist_tools.py junit TESTS.xml RESULTS.jsonl

Each appends one JSON line (flushed and fsynced) and prints it.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# optional baselines of bench_kernels.py: import name -> distribution (carried as wheels to the GPU machine)
BASELINES = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}


def append(path: str, row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return getattr(mod, "__version__", "installed")


def env_row() -> dict:
    import torch

    row = dict(kind="env", python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
               triton_interpret=os.environ.get("TRITON_INTERPRET", "0"))
    for m in ("triton", "transformers", "freeprm", *BASELINES):
        row[m] = _version(m)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        row.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}")
    else:
        row["device"] = f"CPU ({platform.machine()})"
    try:
        row["git_sha"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        row["git_sha"] = "unknown (no git here: see the archive's name)"
    return row


def junit_row(xml_path: str) -> dict:
    """Counts of a pytest --junitxml report, and the first failing test ids."""
    import xml.etree.ElementTree as ET

    if not Path(xml_path).exists():
        return dict(kind="tests", status="no report (the run was cut before pytest wrote it)")
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return dict(kind="tests", **counts, time_s=sum(float(s.get("time", 0)) for s in suites), failed=failed[:20])


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "env":
        append(args[1], env_row())
    elif len(args) == 3 and args[0] == "junit":
        append(args[2], junit_row(args[1]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

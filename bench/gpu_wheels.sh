#!/usr/bin/env bash
# Fetch, on a machine with internet, the wheels of the optional GPU baselines into .whl/ (ignored by git),
# for the GPU machine, which has no internet: bench/gpu_checklist.sh installs whatever .whl/ holds into /tmp
# (pip --no-index --no-deps --target) before its first benchmark. Both are pure-Python wheels (~1 MB
# together, far under the 64 MiB a device call carries) that need only torch and triton, which the GPU
# image has. Without them the liger and cce rows say "skipped: not installed".
#     bash bench/gpu_wheels.sh      # then name ".whl" in the device call's carry list
set -eu
cd "$(dirname "$0")/.."
PY=${PY:-python3}
$PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
ls -la .whl

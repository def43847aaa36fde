#!/usr/bin/env bash
# The GPU list of issue 10 (docs/kernels.md, "GPU checklist") as ONE command for a lent GPU machine,
# sized for the 15 minutes of device time a session gets (one run of at most 10 minutes, then a rerun).
#
# Not yet run on a GPU: no GPU has been lent to this work so far. Prepared so that the session that
# gets one spends its device time measuring, not typing. Each step has its own time limit and writes
# its log under $OUT (the device tool brings back $OUT), so a step that fails or runs long costs only
# its own budget. Results then go, with the device name and versions printed by step 0, into
# bench/results/ (by hand, in the session that ran it).
#
# Usage on the device machine (its image has torch, triton, transformers, pytest; nothing is fetched):
#     bash bench/gpu_checklist.sh            # all steps, about 8 minutes
#     STEPS="0 1" bash bench/gpu_checklist.sh
# Liger and Apple CCE are optional providers: carry their wheels (`.whl`, see the device README) and
# install them with --target /tmp/site first; bench_kernels.py skips a provider it cannot import.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/freeprm_gpu}
W="$OUT/gpu_results"  # everything lands here and is packed into one archive at the end (the tool returns <= 8 files)
mkdir -p "$W"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
STEPS=${STEPS:-"0 1 2 3 6"}

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, never stop the script
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$W/$name.log" 2>&1
    echo "=== $name: rc=$? ($(tail -n 1 "$W/$name.log" | cut -c1-160))"
}

for s in $STEPS; do
    case $s in
    0) step env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
        $PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())'; date -u" ;;
    1) step tests 150 env FREEPRM_TEST_GPU=1 $PY -m pytest tests/kernels -q -x -p no:cacheprovider ;;
    2) step bench_bf16 240 $PY bench/bench_kernels.py --shapes 4096:128256,5376:262208 --tokens 1024,4096,8192,16384 \
        --dtype bf16 --out "$W/bf16" ;;
    3) step bench_fp32 90 $PY bench/bench_kernels.py --shapes 4096:128256 --tokens 4096 --dtype fp32 --no-policy-ref \
        --out "$W/fp32" ;;
    6) step compile_sweep 90 $PY bench/bench_kernels.py --shapes 4096:128256 --tokens 1024 --no-policy-ref \
        --compile-sweep 1000,1024,3000,4096,5000,8192,16384,20000 --out "$W/sweep" ;;
    *) echo "unknown step $s" ;;
    esac
done
tar czf "$OUT/gpu_results.tar.gz" -C "$OUT" gpu_results && rm -rf "$W" && ls -la "$OUT"

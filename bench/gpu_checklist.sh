#!/usr/bin/env bash
# The first GPU run: the numbers that matter most, in ONE command of at most 7.5 minutes.
#
#     bash bench/gpu_checklist.sh             # on the GPU machine (OUT=... names where results go)
#     bash bench/gpu_checklist.sh --dry-run   # the same steps on CPU: tiny shapes, interpreter (CI runs this)
#
# Steps, most important first (limits in PLAN below; their sum plus a 20 s reserve fits the 450 s
# budget, so the archive is always written; a step that overruns is cut and the next one starts):
#   wheels        install carried wheels from .whl/ (liger-kernel, cut-cross-entropy) into /tmp; none: skip
#   env           device, SMs, torch / triton / transformers versions, which baselines import
#   tests         the Triton kernel tests compiled on the GPU (FREEPRM_TEST_GPU=1; pytest-xdist if there;
#                 -v: one line per test in the log as it finishes, in case the step is cut)
#   bf16_n4096    bf16 forward, backward, forward+backward and peak extra memory at D=4096, V=128256,
#   bf16_n16384   N=4096 / 16384: bare GEMM (the roofline), Liger, CCE, freeprm
#   compile_cold  first-call vs steady time over N with an EMPTY Triton cache (fresh TRITON_CACHE_DIR)
#   fused_rewards policy - reference rewards: fused kernel vs two passes vs naive, N=4096
# Every result row is appended to $OUT/results.jsonl as soon as it exists, every step's output to
# $OUT/checklist.log; the rest (bench JSON / markdown, the JUnit report) is packed into
# $OUT/gpu_checklist.tar.gz at the end. The rest of the GPU list: bench/gpu_checklist_more.sh.
# Runs under the GPU image's own python3 (torch 2.11, triton 3.6 there); nothing is fetched.
set -u
cd "$(dirname "$0")/.."
PLAN="wheels:10 env:30 tests:140 bf16_n4096:90 bf16_n16384:90 compile_cold:35 fused_rewards:35"
. bench/checklist_lib.sh
checklist_begin gpu_checklist "$@"

SITE=/tmp/freeprm_site
step wheels bash -c "if ls .whl/*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target $SITE .whl/*.whl && ls $SITE; \
    else echo 'no .whl/: the liger and cce rows will say skipped (docs/kernels.md says how to carry them)'; fi"
[ -d "$SITE" ] && export PYTHONPATH="$SITE:$PYTHONPATH"

step env bash -c "{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv || true; } && \
    $PY bench/checklist_tools.py env '$RESULTS'"

KERNEL_TESTS="tests/kernels/test_linear_logprobs.py tests/kernels/test_linear_logprobs_paths.py \
    tests/kernels/test_token_rewards.py tests/kernels/test_segment.py"
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 4"
step tests env FREEPRM_TEST_GPU=1 $PY -m pytest $KERNEL_TESTS -v -p no:cacheprovider -o addopts="-ra" \
    --maxfail=20 --junitxml="$WORK/tests.xml" $(pick "$XDIST" --collect-only)
[ "$DRY" = 1 ] || $PY bench/checklist_tools.py junit "$WORK/tests.xml" "$RESULTS" >>"$LOG" 2>&1

SHAPE=$(pick 4096:128256 32:256)
BENCH="$PY bench/bench_kernels.py --dtype bf16 --shapes $SHAPE --small-ops 0 --jsonl $RESULTS $(pick '' --smoke)"
step bf16_n4096 $BENCH --tokens "$(pick 4096 32)" --providers gemm,liger,cce,freeprm --no-policy-ref \
    --tag bf16_n4096 --out "$WORK/bf16_n4096"
step bf16_n16384 $BENCH --tokens "$(pick 16384 48)" --providers gemm,liger,cce,freeprm --no-policy-ref \
    --tag bf16_n16384 --out "$WORK/bf16_n16384"

FRESH=$(mktemp -d "${TMPDIR:-/tmp}/triton_cache.XXXXXX")
step compile_cold env TRITON_CACHE_DIR="$FRESH" $BENCH --tokens 1 --providers "" --no-policy-ref \
    --compile-sweep "$(pick 1000,4096,16384,20000 16,40)" --tag compile_cold --out "$WORK/compile_cold"
rm -rf "$FRESH"

step fused_rewards $BENCH --tokens "$(pick 4096 32)" --providers "" --tag fused_rewards --out "$WORK/fused_rewards"

checklist_end

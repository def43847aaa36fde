#!/usr/bin/env bash
# The rest of the GPU list (after bench/gpu_checklist.sh), ONE command of at most 7.5 minutes.
#
#     bash bench/gpu_checklist_more.sh             # on the GPU machine
#     bash bench/gpu_checklist_more.sh --dry-run   # the same steps on CPU, tiny shapes (CI runs this)
#
# Steps (limits in PLAN; same budget rules, outputs and archive as gpu_checklist.sh):
#   wheels, env      as in gpu_checklist.sh
#   gemma_bf16       the 262k vocabulary (D=5376, V=262208), N=4096 / 16384: GEMM, Liger, CCE, freeprm
#   baselines_bf16   D=4096, V=128256, N=4096: GEMM, naive, torch.compile of naive, chunked torch
#   fp32             D=4096, V=128256, N=4096, fp32: IEEE dots (torch's default) and TF32 ("high")
#   bwd_memory       N=16384: the default vocab-split backward vs the row split (peak extra memory)
#   small_ops        token_rewards / segment_* Triton vs torch, 1M values in 8192 segments
#   configs          each of triton_common.GPU_CONFIGS pinned in turn, N=4096, freeprm only
# Results: $OUT/results.jsonl (row by row), $OUT/checklist.log, $OUT/gpu_checklist_more.tar.gz.
set -u
cd "$(dirname "$0")/.."
PLAN="wheels:10 env:30 gemma_bf16:100 baselines_bf16:85 fp32:70 bwd_memory:40 small_ops:30 configs:65"
. bench/checklist_lib.sh
checklist_begin gpu_checklist_more "$@"

SITE=/tmp/freeprm_site
step wheels bash -c "if ls .whl/*.whl >/dev/null 2>&1; then $PY -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target $SITE .whl/*.whl && ls $SITE; else echo 'no .whl/: liger / cce skipped'; fi"
[ -d "$SITE" ] && export PYTHONPATH="$SITE:$PYTHONPATH"
step env $PY bench/checklist_tools.py env "$RESULTS"

BENCH="$PY bench/bench_kernels.py --small-ops 0 --jsonl $RESULTS $(pick '' --smoke)"
LLAMA=$(pick 4096:128256 32:256)
N4=$(pick 4096 32)
step gemma_bf16 $BENCH --dtype bf16 --shapes "$(pick 5376:262208 48:512)" --tokens "$(pick 4096,16384 32,48)" \
    --providers gemm,liger,cce,freeprm --no-policy-ref --tag gemma_bf16 --out "$WORK/gemma_bf16"
step baselines_bf16 $BENCH --dtype bf16 --shapes "$LLAMA" --tokens "$N4" \
    --providers "$(pick gemm,naive,compile,chunked gemm,naive,chunked)" \
    --no-policy-ref --tag baselines_bf16 --out "$WORK/baselines_bf16"
step fp32 bash -c "for p in highest high; do $BENCH --dtype fp32 --fp32-precision \$p --shapes $LLAMA --tokens $N4 \
    --providers gemm,freeprm --no-policy-ref --tag fp32_\$p --out $WORK/fp32_\$p || exit; done"
step bwd_memory $BENCH --dtype bf16 --shapes "$LLAMA" --tokens "$(pick 16384 48)" --providers freeprm,freeprm_rows \
    --no-policy-ref --tag bwd_memory --out "$WORK/bwd_memory"
step small_ops $PY bench/bench_kernels.py --shapes "$LLAMA" --tokens 1 --providers "" --no-policy-ref \
    --small-ops "$(pick 1048576:8192 64:4)" --jsonl "$RESULTS" $(pick '' --smoke) --tag small_ops --out "$WORK/small_ops"
CONFIGS=$($PY -c "from freeprm.kernels.triton_common import GPU_CONFIGS as C
print(' '.join(','.join([f'{k}={v}' for k, v in c.kwargs.items()] + [f'num_warps={c.num_warps}', f'num_stages={c.num_stages}']) for c in C))")
step configs bash -c "for c in $CONFIGS; do $BENCH --dtype bf16 --shapes $LLAMA --tokens $N4 --providers freeprm \
    --no-policy-ref --config \$c --tag config:\$c --out $WORK/configs || exit; done"

checklist_end

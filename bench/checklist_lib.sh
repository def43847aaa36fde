# Shared by bench/gpu_checklist.sh and bench/gpu_checklist_more.sh (sourced, not run).
#
# A checklist is a PLAN ("name:seconds ...") and one `step NAME COMMAND...` per entry. checklist_begin
# prints the plan and refuses one whose step limits plus RESERVE exceed BUDGET, so the final archive is
# always written inside the run's wall limit. Each step runs under `timeout`, clipped to what the
# budget has left; its output is appended to $OUT/checklist.log as it runs and its outcome to
# $OUT/results.jsonl (the benchmarks append their rows there too, one by one). Bulky files go to
# $WORK and are packed into $OUT/<name>.tar.gz at the end (the device tool returns at most 8 files).
#
# --dry-run: the same steps on CPU (CUDA hidden, Triton interpreter, the pure-torch CPU path, tiny
# shapes, one timed call per measurement); `DRY` is 1 then, and the scripts pick their tiny arguments
# with `pick REAL TINY`; the plan is checked as written, then every limit and the budget are
# stretched by DRY_TIME_SCALE (default 4): a dry run tests the logic, on a CPU that may be busy.
# --plan: print the plan, check that it fits, run nothing.

checklist_begin() {  # checklist_begin NAME "$@"
    CHECKLIST=$1; shift
    DRY=0
    local plan_only=0
    for a in "$@"; do
        case $a in
        --dry-run) DRY=1 ;;
        --plan) plan_only=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//;/^set -u/d'; exit 0 ;;
        *) echo "unknown argument: $a (--dry-run, --plan)" >&2; exit 2 ;;
        esac
    done
    BUDGET=${BUDGET:-450}    # seconds for the whole run: under the device call's 480 s
    RESERVE=${RESERVE:-20}   # kept back for timeout's kill grace (5 s) and the archive
    OUT=${OUT:-/tmp/freeprm_gpu}
    if [ "$plan_only" = 1 ]; then OUT=$(mktemp -d); fi
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/${CHECKLIST}.XXXXXX")
    LOG="$OUT/checklist.log"
    RESULTS="$OUT/results.jsonl"
    mkdir -p "$OUT"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    PY=${PY:-python3}
    if [ "$DRY" = 1 ]; then
        export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1 FREEPRM_CPU_EXT=0
    fi
    SCALE=1
    [ "$DRY" = 1 ] && SCALE=${DRY_TIME_SCALE:-4}
    START=$(date +%s)
    DEADLINE=$((START + BUDGET * SCALE))
    local total=0 entry
    echo "== $CHECKLIST$([ "$DRY" = 1 ] && echo ' (dry run: CPU, tiny shapes)'): budget ${BUDGET}s, reserve ${RESERVE}s" | tee -a "$LOG"
    for entry in $PLAN; do
        printf '   %-22s %4ss\n' "${entry%%:*}" "${entry##*:}" | tee -a "$LOG"
        total=$((total + ${entry##*:}))
    done
    echo "   total of step limits ${total}s + reserve ${RESERVE}s, budget ${BUDGET}s" | tee -a "$LOG"
    jsonl "{\"kind\": \"plan\", \"checklist\": \"$CHECKLIST\", \"dry_run\": $DRY, \"budget_s\": $BUDGET, \"reserve_s\": $RESERVE, \"steps_total_s\": $total, \"plan\": \"$PLAN\"}"
    if [ $((total + RESERVE)) -gt "$BUDGET" ]; then
        echo "plan does not fit: ${total}s of steps + ${RESERVE}s reserve > ${BUDGET}s" | tee -a "$LOG" >&2
        exit 3
    fi
    if [ "$plan_only" = 1 ]; then rm -rf "$OUT" "$WORK"; exit 0; fi
}

jsonl() {  # append one line to $RESULTS now
    printf '%s\n' "$1" >>"$RESULTS"
    sync "$RESULTS" 2>/dev/null || true
}

pick() {  # pick REAL TINY: the argument for this run
    if [ "$DRY" = 1 ]; then echo "$2"; else echo "$1"; fi
}

step() {  # step NAME COMMAND...: the plan's limit for NAME, clipped to the budget left; never stops the script
    local name=$1; shift
    local entry limit="" left t0 rc status
    for entry in $PLAN; do [ "${entry%%:*}" = "$name" ] && limit=${entry##*:}; done
    if [ -z "$limit" ]; then echo "step $name is not in the plan" >&2; exit 4; fi
    limit=$((limit * SCALE))
    left=$((DEADLINE - RESERVE - $(date +%s)))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 5 ]; then
        echo "=== $name: skipped, ${left}s left" | tee -a "$LOG"
        jsonl "{\"kind\": \"step\", \"step\": \"$name\", \"status\": \"skipped: no time left\"}"
        return 0
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    echo "=== $name: $status rc=$rc in $(($(date +%s) - t0))s" | tee -a "$LOG"
    jsonl "{\"kind\": \"step\", \"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"limit_s\": $limit}"
}

checklist_end() {  # pack $WORK into $OUT/NAME.tar.gz, print the step table
    cp "$RESULTS" "$LOG" "$WORK/" 2>/dev/null
    tar czf "$OUT/$CHECKLIST.tar.gz" -C "$WORK" . && rm -rf "$WORK"
    echo "== $CHECKLIST done in $(($(date +%s) - START))s (budget ${BUDGET}s); in $OUT:"
    ls -la "$OUT"
    grep '"kind": "step"' "$RESULTS" | sed 's/[{}"]//g'
}

#!/usr/bin/env bash
# One GPU session, time-boxed (issue 7): choose the 10-epoch recipe on a validation split,
# reproduce with it (seed 0 alone, for clean timings), seeds 1 and 2 side by side, then the
# throughput benchmark, each stage only if time is left. The small logs are packed into
# OUT_DIR/results.tgz after every stage, so a session cut short still brings back what it did.
#
#   benchmarks/gpu_session.sh DATA_DIR WORK_DIR OUT_DIR [SECONDS_BUDGET]
#
# Runs and their checkpoints go under WORK_DIR; OUT_DIR gets results.tgz alone (the device
# tool brings back a few small files). The recipe is chosen by val_accuracy on the last 5,000
# training images (--validation 5000), never by test accuracy. The variants run concurrently
# on one GPU, so their timings are not quoted. A variant is "FLAGS" or "FLAGS | TEACHER_FLAGS":
# flags after the bar (label smoothing) reach the teacher alone, those before every run. The
# grid is the one of 2026-11-26 (docs/RESULTS.md), whose pick became the defaults.
set -uo pipefail
DATA=$1; WORK=$2; OUT=$3; BUDGET=${4:-480}
START=$SECONDS
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK/sweep" "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
log() { echo "== $(date -u +%T) [$((SECONDS - START))s] $*"; }
left() { local l=$((BUDGET - (SECONDS - START))); echo $((l > 1 ? l : 1)); }  # for timeout
pack() {  # every small file under WORK (no checkpoints) into OUT/results.tgz
  (cd "$WORK" && find . -name checkpoints -prune -o \( -name '*.json' -o -name '*.jsonl' \
     -o -name '*.png' -o -name '*.log' -o -name '*.txt' \) -print | tar -czf "$OUT/results.tgz" -T -)
}

declare -A VARIANTS=(
  [lr0.4]="--learning-rate 0.4 | --label-smoothing 0"
  [lr0.8]="--learning-rate 0.8 | --label-smoothing 0"
  [lr1.2]="--learning-rate 1.2 | --label-smoothing 0"
  [lr1.6]="--learning-rate 1.6 | --label-smoothing 0"
  [lr2.4]="--learning-rate 2.4 | --label-smoothing 0"
  [lr0.8-wd1e-3]="--learning-rate 0.8 --weight-decay 1e-3 | --label-smoothing 0"
  [lr1.6-wd2.5e-4]="--learning-rate 1.6 --weight-decay 2.5e-4 | --label-smoothing 0"
  [lr2.4-wd1e-4]="--learning-rate 2.4 --weight-decay 1e-4 | --label-smoothing 0"
  [lr0.8-ls0.1]="--learning-rate 0.8 | --label-smoothing 0.1"
  [lr0.8-ls0.2]="--learning-rate 0.8 | --label-smoothing 0.2"
  [lr1.6-ls0.2]="--learning-rate 1.6 | --label-smoothing 0.2"
  [lr0.8-wu1]="--learning-rate 0.8 --warmup-epochs 1 | --label-smoothing 0"
  [lr1.6-wu3]="--learning-rate 1.6 --warmup-epochs 3 | --label-smoothing 0"
  [b256-lr0.4]="--batch-size 256 --learning-rate 0.4 | --label-smoothing 0"
  [b256-lr0.8]="--batch-size 256 --learning-rate 0.8 | --label-smoothing 0"
  [b128-lr0.4]="--batch-size 128 --learning-rate 0.4 | --label-smoothing 0"
)
if [ "${KD_SMOKE:-0}" = 1 ]; then
  SMOKE="--train-subset 1024 --validation 256 --epochs 1 --width 4 --eval-batch-size 500"
  VARIANTS=([b128-lr0.1]="--batch-size 128 --learning-rate 0.1"
            [b64-lr0.05]="--batch-size 64 --learning-rate 0.05 | --label-smoothing 0.1")
fi

log "sweep of ${#VARIANTS[@]} teacher variants: ${!VARIANTS[*]}"
for name in "${!VARIANTS[@]}"; do
  spec=${VARIANTS[$name]}
  # shellcheck disable=SC2086  # flag lists on purpose
  timeout "$(left)" python train_teacher.py --data-dir "$DATA" --workdir "$WORK/sweep/$name" \
      --validation 5000 --no-progress ${spec/|/} ${SMOKE:-} > "$WORK/sweep/$name.log" 2>&1 &
done
wait
BEST=$(python - "$WORK/sweep" <<'PY'
import json, pathlib, sys
rows = []
for summary in sorted(pathlib.Path(sys.argv[1]).glob("*/summary.json")):
    s = json.loads(summary.read_text())
    rows.append((s["val_accuracy"], s["test_accuracy"], summary.parent.name))
for val, test, name in sorted(rows, reverse=True):
    print(f"{name:>16}  val {100 * val:.2f}%  test {100 * test:.2f}%", file=sys.stderr)
print(sorted(rows, reverse=True)[0][2] if rows else "")
PY
)
log "best by val_accuracy: ${BEST:-none}"
pack
SPEC=""  # no finished variant: the defaults
[ -n "$BEST" ] && SPEC=${VARIANTS[$BEST]}
SHARED=${SPEC%%|*}; TEACHER_ONLY=""
[[ $SPEC == *"|"* ]] && TEACHER_ONLY=${SPEC#*|}
echo "all runs: $SHARED / teacher only: $TEACHER_ONLY" > "$WORK/chosen_flags.txt"
export KD_FLAGS="$SHARED" KD_TEACHER_FLAGS="$TEACHER_ONLY"
[ -n "${SMOKE:-}" ] && export KD_SMOKE=1

log "seed 0 alone"
KD_SKIP_BENCH=1 timeout "$(left)" "$HERE/gpu_reproduce.sh" "$DATA" "$WORK" 0 2>&1 \
    | tee "$WORK/seed0.log"
pack
if [ "$(left)" -gt 120 ]; then
  log "seeds 1 and 2 side by side"
  for seed in 1 2; do
    KD_NO_SMALL=1 KD_SKIP_BENCH=1 timeout "$(left)" "$HERE/gpu_reproduce.sh" "$DATA" "$WORK" \
        "$seed" > "$WORK/seed$seed.log" 2>&1 &
  done
  wait
  tail -n 30 "$WORK/seed1.log" "$WORK/seed2.log"
  pack
else
  log "no time left for seeds 1 and 2"
fi
for dtype in bfloat16 float32; do
  if [ "$(left)" -gt 60 ]; then
    log "throughput, $dtype"
    KD_BENCH_ONLY=$dtype timeout "$(left)" "$HERE/gpu_reproduce.sh" "$DATA" "$WORK" 2>&1 \
        | tee "$WORK/throughput-$dtype.log"
    pack
  else
    log "no time left for the $dtype throughput benchmark"
  fi
done
log "done: $OUT/results.tgz"

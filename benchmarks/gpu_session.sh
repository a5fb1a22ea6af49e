#!/usr/bin/env bash
# One GPU session, time-boxed (issue 7): choose the teacher recipe on a validation split,
# reproduce with it (seed 0 alone, for clean timings), then seeds 1 and 2 side by side if
# time allows; small logs packed into OUT_DIR/results.tgz.
#
#   benchmarks/gpu_session.sh DATA_DIR OUT_DIR [SECONDS_BUDGET]
#
# The recipe is chosen by val_accuracy on the last 5,000 training images (--validation 5000),
# never by test accuracy. Variants run concurrently on one GPU (their timings are not quoted).
set -uo pipefail
DATA=$1; OUT=$2; BUDGET=${3:-420}
START=$SECONDS
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT/sweep"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
log() { echo "== $(date -u +%T) [$((SECONDS - START))s] $*"; }

declare -A VARIANTS=(
  [b512-lr0.4]="--batch-size 512 --learning-rate 0.4"
  [b512-lr0.2]="--batch-size 512 --learning-rate 0.2"
  [b256-lr0.2]="--batch-size 256 --learning-rate 0.2"
  [b256-lr0.1]="--batch-size 256 --learning-rate 0.1"
  [b128-lr0.1]="--batch-size 128 --learning-rate 0.1"
  [b128-lr0.05]="--batch-size 128 --learning-rate 0.05"
  [b512-lr0.4-f32]="--batch-size 512 --learning-rate 0.4 --dtype float32"
)
[ "${KD_SMOKE:-0}" = 1 ] && SMOKE="--train-subset 1024 --validation 256 --epochs 1 --width 4 --eval-batch-size 500" \
  && VARIANTS=([b128-lr0.1]="--batch-size 128 --learning-rate 0.1" \
               [b64-lr0.05]="--batch-size 64 --learning-rate 0.05")
log "sweep: ${!VARIANTS[*]}"
for name in "${!VARIANTS[@]}"; do
  # shellcheck disable=SC2086
  python train_teacher.py --data-dir "$DATA" --workdir "$OUT/sweep/$name" --validation 5000 \
      --no-progress ${VARIANTS[$name]} ${SMOKE:-} > "$OUT/sweep/$name.log" 2>&1 &
done
wait
BEST=$(python - "$OUT/sweep" <<'PY'
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
FLAGS=${VARIANTS[$BEST]:-}
[ -n "${SMOKE:-}" ] && FLAGS="$FLAGS --train-subset 1024 --epochs 1 --eval-batch-size 500"
echo "$FLAGS" > "$OUT/chosen_flags.txt"
export KD_FLAGS="$FLAGS"

[ -n "${SMOKE:-}" ] && export KD_SMOKE=1
"$HERE/gpu_reproduce.sh" "$DATA" "$OUT" 0
if [ $((SECONDS - START)) -lt $((BUDGET * 2 / 3)) ]; then
  KD_NO_SMALL=1 "$HERE/gpu_reproduce.sh" "$DATA" "$OUT" 1 > "$OUT/seed1.log" 2>&1 &
  KD_NO_SMALL=1 "$HERE/gpu_reproduce.sh" "$DATA" "$OUT" 2 > "$OUT/seed2.log" 2>&1 &
  wait
  tail -n 30 "$OUT/seed1.log" "$OUT/seed2.log"
else
  log "no time left for seeds 1 and 2"
fi
(cd "$OUT" && find . -name checkpoints -prune -o \( -name '*.json' -o -name '*.jsonl' \
   -o -name '*.png' -o -name '*.log' -o -name '*.txt' \) -print | tar -czf results.tgz -T -)
log "done: $OUT/results.tgz"

#!/usr/bin/env bash
# One GPU session, time-boxed (issue 17): screen the recipe levers at full size on a validation
# split, one seed each, then reproduce the pick (seed 0 alone, for clean timings), seeds 1 and 2
# side by side, then the throughput benchmark and the ensemble layouts' step cost (issue 19),
# each stage only if time is left. The small logs
# are packed into OUT_DIR/results.tgz after every stage, so a session cut short still brings back
# what it did.
#
#   benchmarks/gpu_session.sh DATA_DIR WORK_DIR OUT_DIR [SECONDS_BUDGET]
#   KD_SMOKE=1 benchmarks/gpu_session.sh DATA_DIR /tmp/w /tmp/o 600   # the same code, CPU-sized
#
# Runs and their checkpoints go under WORK_DIR; OUT_DIR gets results.tgz alone (the device
# tool brings back a few small files). The recipe is chosen by val_accuracy on the last 5,000
# training images (--validation 5000), never by test accuracy. The variants run concurrently
# on one GPU, so their timings are not quoted. A variant is "FLAGS" or "FLAGS | TEACHER_FLAGS":
# flags after the bar (label smoothing) reach the teacher alone, those before every run. The
# grid is the CPU screen's levers (docs/RECIPE.md), each against the defaults (the CPU proxy's
# best recipe: no translation, alternating flips, ghost BatchNorm over 32 images with SiLU,
# frozen BN scales with BN biases at 16x), the defaults before issue 17 (old), each new lever
# taken back alone (translation by 4, or by 2 as in the proxy's "light" recipe, which full
# width may need more; learned BN scales at 4x: bn-scale; plain BatchNorm, and with it ReLU
# and learned scales: crop0, the proxy's recipe before ghost BatchNorm), airbench's BN-bias
# rate (bn-lr64) and lookahead with airbench's ramp (la5-ramp), and the step-size
# combinations the screen pointed at; every run also reports flip+translate test-time
# augmentation at the end (--tta, beside the plain figures).
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

# before issue 17:
OLD="--crop-pad 4 --pad-mode zeros --no-alternating-flip --bn-lr-factor 1 --ghost-batch-size 0 --activation relu --bn-scale"
declare -A VARIANTS=(
  [base]=""
  [old]="$OLD"
  [crop4]="--crop-pad 4"
  [randflip]="--no-alternating-flip"
  [bn-lr1]="--bn-lr-factor 1"
  [crop2]="--crop-pad 2"
  [lr2.4]="--learning-rate 2.4"
  [lr3.2]="--learning-rate 3.2"
  [ls0]="| --label-smoothing 0"
  [bn-scale]="--bn-scale"
  [bn-lr64]="--bn-lr-factor 64"
  [b256]="--batch-size 256"
  [head-bn-lr0.25]="--head-lr-factor 0.25 --bn-lr-factor 0.25"
  [wd1e-3]="--weight-decay 1e-3"
  [ema0.99]="--ema-decay 0.99"
  [whiten2]="--whiten-patch 2"
  [no-ghost]="--ghost-batch-size 0"
  [crop0]="--ghost-batch-size 0 --activation relu --bn-scale"
  [cutout12]="--cutout 12"
  [keller]="--learning-rate 0.2 $OLD --pad-mode reflect --cutout 12 | --label-smoothing 0"
  [la5-ramp]="--lookahead-steps 5 --lookahead-alpha 0.226 --lookahead-ramp"
)
COMMON="--validation 5000 --tta flip_translate"
if [ "${KD_SMOKE:-0}" = 1 ]; then
  SMOKE="--train-subset 1024 --epochs 1 --width 4 --eval-batch-size 500"
  COMMON="--validation 256 --tta flip_translate"
  VARIANTS=([b128-lr0.1]="--batch-size 128 --learning-rate 0.1 --ema-decay 0.9"
            [b64-lr0.05]="--batch-size 64 --learning-rate 0.05 --cutout 8 | --label-smoothing 0.1")
fi

log "sweep of ${#VARIANTS[@]} teacher variants: ${!VARIANTS[*]}"
for name in "${!VARIANTS[@]}"; do
  spec=${VARIANTS[$name]}
  # shellcheck disable=SC2086  # flag lists on purpose
  timeout "$(left)" python train_teacher.py --data-dir "$DATA" --workdir "$WORK/sweep/$name" \
      $COMMON --no-progress ${spec/|/} ${SMOKE:-} > "$WORK/sweep/$name.log" 2>&1 &
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
if [ "$(left)" -gt 60 ]; then
  # bfloat16 and float32 in one process; beside PyTorch eager, torch.compile and channels_last
  # + bf16 autocast where torch is installed (the comparison users will make).
  BENCH=(--batch-size 512 --steps-per-dispatch 10 --steps 50)
  [ -n "${SMOKE:-}" ] && BENCH=(--width 8 --batch-size 64 --steps 3)
  TORCH=()
  python -c "import torch" 2>/dev/null \
      && TORCH=(--compare-torch --torch-variants eager,compile,channels_last+bf16)
  log "throughput ${TORCH[*]:-(no torch here: JAX alone)}"
  timeout "$(left)" python benchmarks/throughput.py --dtype bfloat16,float32 \
      --json "$WORK/throughput.json" "${BENCH[@]}" "${TORCH[@]}" 2>&1 | tee "$WORK/throughput.log"
  pack
else
  log "no time left for the throughput benchmark"
fi
if [ "$(left)" -gt 45 ]; then
  # Issue 19: which ensemble layout pays on the GPU (auto stacks there; the CPU loops).
  ENS=(--teacher-width 64 --student-width 32 --batch-size 512 --steps 5)
  [ -n "${SMOKE:-}" ] && ENS=(--teacher resnet8 --teacher-width 4 --student resnet8 \
      --student-width 2 --batch-size 32 --teachers 1,2 --steps 1 --repeats 1)
  log "ensemble step: stacked vs loop"
  timeout "$(left)" python benchmarks/ensemble_step.py "${ENS[@]}" \
      --json "$WORK/ensemble_step.json" 2>&1 | tee "$WORK/ensemble_step.log"
  pack
else
  log "no time left for the ensemble step"
fi
log "done: $OUT/results.tgz"

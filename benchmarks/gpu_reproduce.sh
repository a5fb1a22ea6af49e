#!/usr/bin/env bash
# The full-scale reproduction (issue 7): teacher, label-free ResNet-18 student, a smaller
# student, and the throughput benchmark; small logs, summaries and plots collected in OUT_DIR.
#
#   benchmarks/gpu_reproduce.sh DATA_DIR OUT_DIR [SEED ...]      (default seed: 0)
#
# KD_FLAGS="--learning-rate 0.2 ..." adds flags to every run, KD_TEACHER_FLAGS to the teacher's
# alone; KD_NO_SMALL=1 skips the small student, KD_SKIP_BENCH=1 the benchmark, and
# KD_BENCH_ONLY=DTYPE runs the benchmark alone, in that dtype; KD_SMOKE=1 shrinks every run to a
# CPU-sized one that runs exactly the same commands.
# Each step logs and carries on if an earlier one failed, so one failure never costs the rest.
set -uo pipefail
DATA=$1; OUT=$2; shift 2
SEEDS=("$@")
[ $# -eq 0 ] && SEEDS=(0)
DTYPES=(float32 bfloat16)
[ -n "${KD_BENCH_ONLY:-}" ] && SEEDS=() && DTYPES=("$KD_BENCH_ONLY")
read -r -a FLAGS <<< "${KD_FLAGS:-}"
read -r -a TEACHER_FLAGS <<< "${KD_TEACHER_FLAGS:-}"
mkdir -p "$OUT/runs"
log() { echo "== $(date -u +%T) $*"; }
run() { log "$*"; "$@" || log "FAILED ($?): $*"; }

if [ "${KD_SMOKE:-0}" = 1 ]; then
  SHRINK=(--train-subset 1024 --epochs 1 --batch-size 128 --eval-batch-size 500)
  TEACHER=(--width 8); STUDENT=(--student-width 4); SMALL=(--student-width 2)
  BENCH=(--width 8 --batch-size 64 --steps 3)
else
  SHRINK=(); TEACHER=(); STUDENT=(); SMALL=(--student-width 32)
  BENCH=(--batch-size 512 --steps-per-dispatch 10 --steps 50)
fi
SHRINK+=("${FLAGS[@]}")

python - <<'PY'
import platform, jax, flax, optax, orbax.checkpoint as ocp
print("python", platform.python_version(), "| jax", jax.__version__, "| flax", flax.__version__,
      "| optax", optax.__version__, "| orbax", ocp.__version__)
print("devices:", jax.devices())
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

for seed in "${SEEDS[@]}"; do
  T="$OUT/runs/teacher-s$seed"
  run python train_teacher.py --data-dir "$DATA" --workdir "$T" --seed "$seed" --no-progress \
      "${SHRINK[@]}" "${TEACHER[@]}" "${TEACHER_FLAGS[@]}"
  run python distill.py --temperature 4 --data-dir "$DATA" --teacher-dir "$T" --seed "$seed" \
      --workdir "$OUT/runs/student-r18-s$seed" --no-progress "${SHRINK[@]}" "${STUDENT[@]}"
  if [ "$seed" = "${SEEDS[0]}" ] && [ "${KD_NO_SMALL:-0}" != 1 ]; then
    run python distill.py --temperature 4 --data-dir "$DATA" --teacher-dir "$T" --seed "$seed" \
        --workdir "$OUT/runs/student-r18w32-s$seed" --no-progress "${SHRINK[@]}" "${SMALL[@]}"
  fi
done

if [ -f benchmarks/throughput.py ] && [ "${KD_SKIP_BENCH:-0}" != 1 ]; then
  for dtype in "${DTYPES[@]}"; do
    run python benchmarks/throughput.py --dtype "$dtype" --json "$OUT/throughput-$dtype.json" \
        "${BENCH[@]}"
  done
fi

log "done${SEEDS[*]:+: seeds ${SEEDS[*]}}"

#!/usr/bin/env bash
# Every MNIST row of Hinton et al. (2015, sec. 3), with the same entry points as CIFAR-10:
# the teacher and the hard-label student first (side by side), then from that teacher the
# distilled student at T = 20, the omit-3 and only-7-and-8 students and the temperature sweep
# (side by side), then the table (benchmarks/mnist_report.py). Logs and runs go to $RUNS.
#
#   benchmarks/mnist_reproduce.sh                                       # the full schedule
#   TEACHER_EPOCHS=2 STUDENT_EPOCHS=1 SWEEP_EPOCHS=1 SWEEP_T="2 20" \
#       EXTRA="--train-subset 2048" benchmarks/mnist_reproduce.sh       # a smoke run
#
# LIMIT (seconds, 0 = none) stops any one run that outlasts it; a stopped teacher's latest
# epoch checkpoint still serves the distillation runs (the report says how far each got).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs/mnist}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-200}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-100}
SWEEP_EPOCHS=${SWEEP_EPOCHS:-20}
SWEEP_T=${SWEEP_T:-1 2 3 4 8 12 20}
EXTRA=${EXTRA:-}
LIMIT=${LIMIT:-0}
PY=${PYTHON:-python}
mkdir -p "$RUNS"

run() {  # run NAME COMMAND...: the command's output to $RUNS/NAME.log, wall time appended
  local name=$1 start=$SECONDS
  shift
  echo "start $name: $*"
  timeout "$LIMIT" "$@" > "$RUNS/$name.log" 2>&1
  local rc=$?
  echo "wall_seconds $((SECONDS - start)) exit $rc" >> "$RUNS/$name.log"
  echo "done $name: exit $rc after $((SECONDS - start)) s"
}
[ "$LIMIT" = 0 ] && LIMIT=1000000d

# shellcheck disable=SC2086  # EXTRA and SWEEP_T are word lists on purpose
run teacher "$PY" train_teacher.py --config configs/mnist_teacher.yaml --data-dir "$DATA" \
  --epochs "$TEACHER_EPOCHS" --workdir "$RUNS/teacher" --overwrite --no-progress $EXTRA &
run student-hard "$PY" train_teacher.py --config configs/mnist_student_hard.yaml \
  --data-dir "$DATA" --epochs "$STUDENT_EPOCHS" --workdir "$RUNS/student-hard" --overwrite \
  --no-progress $EXTRA &
wait

common=(--data-dir "$DATA" --teacher-dir "$RUNS/teacher" --epochs "$STUDENT_EPOCHS" --overwrite
        --no-progress)
run distill-T20 "$PY" distill.py --config configs/mnist_distill.yaml "${common[@]}" \
  --workdir "$RUNS/distill-T20" $EXTRA &
run omit3 "$PY" distill.py --config configs/mnist_omit3.yaml "${common[@]}" \
  --workdir "$RUNS/omit3" $EXTRA &
run only78 "$PY" distill.py --config configs/mnist_only78.yaml "${common[@]}" \
  --workdir "$RUNS/only78" $EXTRA &
for width in 30 800; do
  run "sweep-$width" "$PY" benchmarks/mnist_temperature_sweep.py --teacher-dir "$RUNS/teacher" \
    --data-dir "$DATA" --out "$RUNS/sweep" --widths "$width" --temperatures $SWEEP_T \
    --epochs "$SWEEP_EPOCHS" --no-progress $EXTRA &
done
wait
"$PY" benchmarks/mnist_report.py "$RUNS" | tee "$RUNS/report.md"

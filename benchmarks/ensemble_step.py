"""What a distillation step costs against the number of teachers: 1, 2, 4, 8 of one architecture.

Times exactly what training runs (``kd_jax.core.steps.run_steps``: the batch gathered from
device-resident uint8 images, augmented inside jit, every teacher's forward on that batch,
the student's step), after compilation, on random data, in each of kd-jax's ensemble
layouts (``kd_jax.core.teachers``): ``stacked``, the teachers' variables stacked and one
``vmap``ped forward, and ``loop``, one forward after the other in the same jitted step; the
table marks the one ``auto`` picks on this backend. Medians over ``--repeats`` rounds, the
layouts interleaved so that machine load hits them alike.

    python benchmarks/ensemble_step.py                                  # CPU-sized defaults
    python benchmarks/ensemble_step.py --teacher-width 64 --batch-size 512 --teachers 1,2,4,8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax.cli import runtime
from kd_jax.core.augment import Augmentation
from kd_jax.core.conv import CpuConv
from kd_jax.core.data import CIFAR10_MEAN, CIFAR10_STD
from kd_jax.core.devices import make_mesh
from kd_jax.core.losses import make_loss
from kd_jax.core.models import create_model, init_variables
from kd_jax.core.optim import Recipe, make_optimizer
from kd_jax.core.steps import create_state, epoch_order, make_distill_step, run_steps
from kd_jax.core.teachers import Teacher, make_ensemble, resolve_layout

SHAPE = (32, 32, 3)


def case(a: argparse.Namespace, count: int, layout: str):
    """A compiled dispatch of one distillation step with ``count`` teachers."""
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    conv = CpuConv if jax.default_backend() == "cpu" else None
    teacher = create_model(a.teacher, 10, a.teacher_width, conv=conv)
    student = create_model(a.student, 10, a.student_width, conv=conv)
    teachers = [Teacher(teacher.apply, jax.device_put(init_variables(teacher, SHAPE, s),
                                                      replicated)) for s in range(count)]
    step = make_distill_step(make_ensemble(teachers, layout), make_loss("kd", 4.0))
    tx, _ = make_optimizer(Recipe(0.1, warmup_fraction=0), 10**6)
    state = jax.device_put(create_state(student, init_variables(student, SHAPE, 99), tx),
                           replicated)
    images = jax.device_put(np.random.default_rng(0).integers(
        0, 256, (a.batch_size, *SHAPE), np.uint8), replicated)
    key = jax.random.key(0)
    args = (step, state, (images,), epoch_order(key, 0, a.batch_size, a.batch_size, 1),
            np.int32(1), np.int32(0), key)
    start = time.perf_counter()
    compiled = run_steps.lower(*args, length=1, mesh=mesh,
                               augmentation=Augmentation(4, True, CIFAR10_MEAN, CIFAR10_STD)
                               ).compile()
    holder = {"state": state, "compile_seconds": time.perf_counter() - start}

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            holder["state"], metrics = compiled(step, holder["state"], *args[2:])
        jax.block_until_ready((holder["state"], metrics))
        return (time.perf_counter() - start) / steps

    return run, holder


def main(argv: list[str] | None = None) -> int:
    runtime.configure()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="resnet18")
    p.add_argument("--teacher-width", type=int, default=16)
    p.add_argument("--student", default="resnet18")
    p.add_argument("--student-width", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--teachers", default="1,2,4,8")
    p.add_argument("--layouts", default="stacked,loop")
    p.add_argument("--steps", type=int, default=5, help="steps timed per round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    cases = {(n, layout): case(a, n, layout) for n in map(int, a.teachers.split(","))
             for layout in a.layouts.split(",") if not (n == 1 and layout == "loop")}
    seconds = {key: [] for key in cases}
    for run, _ in cases.values():
        run(1)  # warm-up
    for _ in range(a.repeats):
        for key, (run, _) in cases.items():
            seconds[key].append(run(a.steps))
    auto = resolve_layout("auto")
    one = statistics.median(seconds[(1, "stacked")])
    rows = [{"teachers": n, "layout": layout, "images_per_second": a.batch_size / median,
             "step_ms": 1e3 * median, "relative_to_one_teacher": median / one,
             "compile_seconds": cases[(n, layout)][1]["compile_seconds"]}
            for (n, layout), times in seconds.items() for median in [statistics.median(times)]]
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
          f"{platform.processor() or platform.machine()}; teachers {a.teacher} width "
          f"{a.teacher_width}, student {a.student} width {a.student_width}, batch {a.batch_size}")
    print(f"{'teachers':>8} {'layout':>8} {'img/s':>9} {'step ms':>9} {'x 1 teacher':>12} "
          f"{'compile s':>10}  (* what auto picks on {jax.default_backend()})")
    for r in rows:
        print(f"{r['teachers']:>8} {r['layout']:>8} {r['images_per_second']:>9.1f} "
              f"{r['step_ms']:>9.1f} {r['relative_to_one_teacher']:>12.2f} "
              f"{r['compile_seconds']:>10.1f}  {'*' if r['layout'] == auto else ''}")
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "auto": auto,
                                      "backend": jax.default_backend(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

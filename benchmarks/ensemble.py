"""Train N teachers of different seeds, then distill students from their ensemble and from one of
them, in one command (Hinton et al. 2015, sec. 4); one job per core, finished jobs skipped.

    python benchmarks/ensemble.py --out runs/mnist-ensemble --data-dir ../shared/data \\
        --teacher-config configs/mnist_teacher.yaml --student-config configs/mnist_distill.yaml \\
        --teachers 5 --students 3 --teacher-flags "--epochs 50" --student-flags "--epochs 50"

Teachers ``teacher-s0`` .. ``teacher-s{N-1}`` (seeds 0..N-1); students ``ensemble-s{k}`` from
all of them and ``single-s{k}`` from ``teacher-s0`` alone, student seeds 0..M-1, same schedule.
The table at the end gives each run's last-epoch test accuracy and errors, the ensemble's own
(the teacher figure of an ensemble student) and the students' agreement with their teachers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sweep  # noqa: E402


def ensemble_sweep(teachers: int, students: int, teacher_flags: list[str],
                   student_flags: list[str]) -> dict:
    names = [f"teacher-s{s}" for s in range(teachers)]
    runs = {name: {"job": "teacher", "flags": ["--seed", str(s)]} for s, name in enumerate(names)}
    for k in range(students):
        runs[f"ensemble-s{k}"] = {"job": "distill", "flags": ["--seed", str(k)], "teacher": names}
        runs[f"single-s{k}"] = {"job": "distill", "flags": ["--seed", str(k)],
                                "teacher": names[0]}
    return {"common": {"teacher": teacher_flags, "distill": student_flags}, "runs": runs}


def report(spec: dict, out: Path) -> str:
    lines = ["| run | test acc. | test errors | teacher (ensemble) acc. | agreement |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name in spec["runs"]:
        path = out / name / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        errors = round((1 - s["test_accuracy"]) * s["test_images"])
        teacher = s.get("teacher_test_accuracy")
        lines.append(f"| {name} | {100 * s['test_accuracy']:.2f} % | {errors} | "
                     + (f"{100 * teacher:.2f} %" if teacher is not None else "") + " | "
                     + (f"{100 * s['agreement']:.2f} %" if "agreement" in s else "") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--teachers", type=int, default=5)
    p.add_argument("--students", type=int, default=3, help="student seeds per target")
    p.add_argument("--teacher-config", help="YAML config of every teacher")
    p.add_argument("--student-config", help="YAML config of every student")
    p.add_argument("--teacher-flags", default="", help="more train_teacher.py flags, one string")
    p.add_argument("--student-flags", default="", help="more distill.py flags, one string")
    p.add_argument("--cores", default=None, help="comma list of cores (default: all)")
    a = p.parse_args(argv)
    config = lambda path: ["--config", path] if path else []
    spec = ensemble_sweep(a.teachers, a.students,
                          [*config(a.teacher_config), *shlex.split(a.teacher_flags)],
                          [*config(a.student_config), *shlex.split(a.student_flags)])
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "sweep.json").write_text(json.dumps(spec, indent=2) + "\n")
    cores = [int(c) for c in a.cores.split(",")] if a.cores else sweep.all_cores()
    sweep.run_all(spec, a.out, a.data_dir, cores)
    print(report(spec, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

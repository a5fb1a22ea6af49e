"""Run a sweep on CPU: named train_teacher.py / distill.py jobs, one per core.

Each variant is a job name plus flags. Jobs run side by side, each pinned to one core with one
single-threaded XLA device (``taskset`` + ``XLA_FLAGS``), so two 2-core jobs never fight over
the cores; a job whose ``summary.json`` exists is skipped, so a killed sweep resumes where it
stopped (``--resume`` continues a job's own checkpoints). Accuracy does not depend on how
busy the machine is; the epoch times of these runs are not speed measurements.

    python benchmarks/sweep.py run SWEEP.json --out runs/ablation --data-dir DATA
    python benchmarks/sweep.py table SWEEP.json --out runs/ablation
    python benchmarks/sweep.py plot SWEEP.json --out runs/ablation --png curves.png

A sweep file is a JSON object: ``{"common": {"teacher": [...], "distill": [...]},
"runs": {"NAME": {"job": "teacher" | "distill", "flags": [...], "teacher": "NAME"}}}``; a
distill run names the run (or a list of runs: an ensemble) whose workdir is its teacher, and
waits for them to finish. This project's sweeps lie beside the logs they made:
``docs/results/*/sweep.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"teacher": "train_teacher.py", "distill": "distill.py"}
ONE_CORE_XLA = "--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false"


def load_sweep(path: Path) -> dict:
    sweep = json.loads(path.read_text())
    for name, run in sweep["runs"].items():
        if run["job"] not in SCRIPTS:
            raise SystemExit(f"{path}: run {name}: job must be teacher or distill")
        unknown = [t for t in teachers_of(run) if t not in sweep["runs"]]
        if run["job"] == "distill" and (unknown or not teachers_of(run)):
            raise SystemExit(f"{path}: run {name}: teacher {unknown or None} is not a run")
    return sweep


def teachers_of(run: dict) -> list[str]:
    """The names of a distill run's teachers (one, or a list: an ensemble)."""
    teacher = run.get("teacher", [])
    return [teacher] if isinstance(teacher, str) else list(teacher)


def command(sweep: dict, name: str, out: Path, data_dir: str) -> list[str]:
    run = sweep["runs"][name]
    flags = [*sweep.get("common", {}).get(run["job"], []), *run["flags"]]
    for teacher in teachers_of(run):
        flags += ["--teacher-dir", str(out / teacher)]
    workdir = out / name
    resume = ["--resume"] if (workdir / "config.json").exists() else []
    return [sys.executable, str(REPO / SCRIPTS[run["job"]]), "--data-dir", data_dir,
            "--workdir", str(workdir), "--no-progress", *resume, *flags]


def all_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def finished(out: Path, name: str) -> bool:
    return (out / name / "summary.json").is_file()


def finished_runs(sweep: dict, out: Path) -> list[str]:
    """The names of the runs with a summary, in the sweep file's order."""
    return [name for name in sweep["runs"] if finished(out, name)]


def run_all(sweep: dict, out: Path, data_dir: str, cores: list[int],
            poll_seconds: float = 5.0) -> None:
    """Start each unfinished run on a free core once its teacher (if any) has finished.

    Runs start in the sweep file's order; the one that fails is reported and the sweep goes
    on with the runs that do not need it."""
    out.mkdir(parents=True, exist_ok=True)
    waiting = [n for n in sweep["runs"] if not finished(out, n)]
    busy: dict[int, tuple[str, subprocess.Popen]] = {}
    while waiting or busy:
        for core, (name, process) in list(busy.items()):
            if process.poll() is not None:
                del busy[core]
                state = "done" if finished(out, name) else f"FAILED (exit {process.returncode})"
                print(f"{time.strftime('%H:%M:%S')} {name}: {state}", flush=True)
        ready = [n for n in waiting
                 if all(finished(out, t) for t in teachers_of(sweep["runs"][n]))]
        for core in [c for c in cores if c not in busy]:
            if not ready:
                break
            name = ready.pop(0)
            waiting.remove(name)
            log = open(out / f"{name}.log", "a")  # noqa: SIM115 - closed with the process
            env = {**os.environ, "XLA_FLAGS": ONE_CORE_XLA, "JAX_PLATFORMS": "cpu"}
            busy[core] = (name, subprocess.Popen(
                ["taskset", "-c", str(core), *command(sweep, name, out, data_dir)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
            print(f"{time.strftime('%H:%M:%S')} {name}: started on core {core}", flush=True)
        if waiting and not ready and not busy:
            raise SystemExit(f"cannot start {waiting}: their teachers failed")
        time.sleep(poll_seconds)


COLUMNS = [("val_accuracy", "val acc."), ("val_accuracy_tta", "val TTA"),
           ("test_accuracy", "test acc."), ("test_accuracy_tta", "test TTA"),
           ("train_accuracy", "train acc."), ("agreement", "agreement")]


def table(sweep: dict, out: Path) -> str:
    """A markdown table of every finished run's last-epoch figures."""
    rows = []
    for name in finished_runs(sweep, out):
        run = sweep["runs"][name]
        summary = json.loads((out / name / "summary.json").read_text())
        cells = [f"{100 * summary[key]:.2f} %" if key in summary else "" for key, _ in COLUMNS]
        rows.append(f"| {name} | `{' '.join(run['flags']) or '(defaults)'}` | "
                    + " | ".join(cells) + " |")
    header = "| run | flags | " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "| --- | --- |" + " ---: |" * len(COLUMNS)
    return "\n".join([header, rule, *rows])


def plot(sweep: dict, out: Path, runs: list[str] | None = None) -> bytes:
    """A PNG of validation (else test) and training accuracy against epoch for the finished
    ``runs`` (default: all): where the curves part tells more than the last row does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = runs or finished_runs(sweep, out)
    fig, (held_out, training) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    if len(names) > 10:  # past the default cycle's 10 colours
        for ax in (held_out, training):
            ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for name in names:
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").open()]
        key = "val_accuracy" if "val_accuracy" in rows[0] else "test_accuracy"
        epochs = [row["epoch"] for row in rows]
        line, = held_out.plot(epochs, [100 * row[key] for row in rows], marker=".", label=name)
        if "train_accuracy" in rows[0]:
            training.plot(epochs, [100 * row["train_accuracy"] for row in rows], marker=".",
                          color=line.get_color(), label=name)
    held_out.set(xlabel="epoch", ylabel="accuracy (%)", title="validation (else test) accuracy")
    training.set(xlabel="epoch", title="accuracy on its own training batches")
    for ax in (held_out, training):
        ax.grid(alpha=0.3)
    # Every run has a held-out line (a student may have no training one); the training
    # panel's lower right is free, its curves only rise.
    training.legend(*held_out.get_legend_handles_labels(), fontsize="small", loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["run", "table", "plot"])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", default=os.environ.get("KD_JAX_DATA_DIR", ""))
    parser.add_argument("--cores", default=",".join(map(str, all_cores())),
                        help="comma list of cores, one run on each (default: all)")
    parser.add_argument("--png", type=Path, help="plot: the file to write")
    parser.add_argument("--runs", help="plot: comma list of the runs to draw (default: all)")
    a = parser.parse_args()
    sweep = load_sweep(a.sweep)
    if a.action == "run":
        run_all(sweep, a.out, a.data_dir, [int(c) for c in a.cores.split(",")])
    elif a.action == "table":
        print(table(sweep, a.out))
    else:
        if a.png is None:
            parser.error("plot needs --png FILE")
        a.png.write_bytes(plot(sweep, a.out, a.runs.split(",") if a.runs else None))


if __name__ == "__main__":
    main()

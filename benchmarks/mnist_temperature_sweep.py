"""Test errors of distilled MNIST students against the temperature (Hinton et al. 2015, sec. 3).

The paper: with 300 or more units per hidden layer every T above 8 gave about the same result;
with 30 units per layer T between 2.5 and 4 was clearly best. This runs ``kd_jax.jobs.distill``
(the code behind ``distill.py``) once per (width, T), from ``configs/mnist_distill.yaml`` unless
``--config`` names another, and writes ``sweep.json`` and ``sweep.png`` (test errors out of
10,000 against T, one line per width) under ``--out``. A finished run (its ``summary.json``
exists) is not run again, so an interrupted sweep resumes, and several processes may share one
``--out`` (each plots every run finished so far).

    python benchmarks/mnist_temperature_sweep.py --teacher-dir runs/mnist/teacher \\
        --data-dir ../shared/data --widths 30 800 --epochs 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd_jax.cli.config import DistillConfig, build_parser, resolve  # noqa: E402
from kd_jax.cli.jobs import distill  # noqa: E402
from kd_jax.errors import KdError  # noqa: E402

TEMPERATURES = (1.0, 2.0, 3.0, 4.0, 8.0, 12.0, 20.0)


def run_dir(out: Path, width: int, temperature: float) -> Path:
    return out / f"w{width}-T{temperature:g}"


def sweep(base: DistillConfig, out: Path, widths: list[int], temperatures: list[float]) -> None:
    """Distill one student per (width, T) that has no finished run under ``out`` yet."""
    for width in widths:
        for temperature in temperatures:
            workdir = run_dir(out, width, temperature)
            if (workdir / "summary.json").is_file():
                continue
            config = dataclasses.replace(base, student_width=width, temperature=temperature,
                                         workdir=str(workdir), overwrite=True)
            config.validate()
            distill(config)


def collect(out: Path) -> list[dict]:
    """Every finished run under ``out``: width, T, test errors, wall time."""
    rows = []
    for path in sorted(out.glob("w*-T*/summary.json")):
        summary = json.loads(path.read_text())
        config = json.loads((path.parent / "config.json").read_text())
        rows.append({"width": config["student_width"], "temperature": summary["temperature"],
                     "epochs": summary["epoch"],
                     "test_errors": round((1 - summary["test_accuracy"]) * 10_000),
                     "train_seconds": summary["train_seconds"]})
    return sorted(rows, key=lambda r: (r["width"], r["temperature"]))


def plot(rows: list[dict], path: Path) -> None:
    """Test errors against T (log axis), one line per hidden-layer width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for width in sorted({r["width"] for r in rows}):
        mine = [r for r in rows if r["width"] == width]
        ax.plot([r["temperature"] for r in mine], [r["test_errors"] for r in mine], marker="o",
                label=f"784-{width}-{width}-10")
    ax.set(xscale="log", xlabel="temperature T", ylabel="test errors (of 10,000)",
           title="MNIST distilled students")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Any other flag is a distill.py flag (--teacher-dir, --epochs, ...); --config "
               "defaults to configs/mnist_distill.yaml.")
    parser.add_argument("--out", default="runs/mnist-temperature-sweep")
    parser.add_argument("--widths", type=int, nargs="+", default=[30, 800])
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES))
    args, rest = parser.parse_known_args(argv)
    if "--config" not in rest:
        rest = ["--config", "configs/mnist_distill.yaml", *rest]
    out = Path(args.out)
    try:
        base = resolve(DistillConfig, build_parser(DistillConfig, "distill").parse_args(rest))
        sweep(base, out, args.widths, args.temperatures)
    except KdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = collect(out)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, out / "sweep.png")
    for r in rows:
        print(f"width {r['width']:4d}  T {r['temperature']:5g}  test errors {r['test_errors']:5d}"
              f"  ({r['epochs']} epochs, {r['train_seconds']:.0f} s)")
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

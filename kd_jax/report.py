"""Deployment report: what each run costs and delivers once exported to ONNX.

    python -m kd_jax.report RUN [RUN ...] [--plot deployment_report.png]

For each run (teacher or student): parameters, FLOPs per image (as XLA counts them for the
inference function: a multiply-add is 2 FLOPs), the ONNX file's size, top-1 accuracy of the
ONNX model on the whole test set, its top-1 agreement with the run's teacher (a teacher agrees
with itself), the median onnxruntime CPU latency of one image, and the throughput at batch 256
while classifying the test set (its first batch, the warm-up, and a partial last batch are not
timed). A run without ``export/model.onnx`` is exported (and checked) first. Prints a table
and writes a PNG of accuracy against latency: the picture that says why one distills.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.core import metrics
from kd_jax.core.models import count_params
from kd_jax.core.rundir import format_table
from kd_jax.errors import KdError, run_guarded
from kd_jax.export import FORMATS, export_run, load_inference_model
from kd_jax.onnx_model import OnnxClassifier

THROUGHPUT_BATCH = 256
COLUMNS = ["run", "model", "params", "mflops", "file_mb", "test_accuracy", "teacher_agreement",
           "latency_ms", "images_per_second"]


@dataclass(frozen=True)
class Measured:
    """An exported run on the test set: its logits and how fast onnxruntime produced them."""

    logits: np.ndarray
    images_per_second: float | None  # at batch THROUGHPUT_BATCH; None with < 2 full batches
    latency_ms: float  # median over single-image runs


def timed_logits(classifier: OnnxClassifier, images: np.ndarray,
                 batch_size: int = THROUGHPUT_BATCH) -> tuple[np.ndarray, float | None]:
    """Logits of ``images`` and images per second over the full batches after the first."""
    outputs, seconds, timed = [], 0.0, 0
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        start = time.perf_counter()
        outputs.append(classifier.run(batch))
        if i > 0 and len(batch) == batch_size:
            seconds += time.perf_counter() - start
            timed += len(batch)
    return np.concatenate(outputs), (timed / seconds if timed else None)


def latency_ms(classifier: OnnxClassifier, image: np.ndarray, runs: int, warmup: int = 5) -> float:
    """Median wall time of classifying one image, in milliseconds."""
    batch = image[None]
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        classifier.run(batch)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def flops_per_image(apply, image_shape: Sequence[int]) -> float | None:  # noqa: ANN001
    """XLA's FLOP count for one uint8 image through ``apply`` (None where XLA gives none)."""
    spec = jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8)
    cost = jax.jit(apply).lower(spec).cost_analysis() or {}
    return cost.get("flops")


def teacher_of(run: Path, config: dict) -> Path:
    """The run's teacher: the first of a student's ``teachers``, the run itself for a teacher."""
    teacher = (config.get("teachers") or [None])[0]
    if not teacher:
        return run
    teacher = Path(teacher)
    if not (teacher / "config.json").is_file():
        raise KdError(f"{run}: its teacher {teacher} is not found (the teacher run is needed "
                      "for the agreement column)")
    return teacher


class Report:
    """Measures runs once each (a teacher shared by several students is measured once)."""

    def __init__(self, data_dir: str | None, threads: int, latency_runs: int):
        self.data_dir, self.threads, self.latency_runs = data_dir, threads, latency_runs
        self.measured: dict[Path, Measured] = {}

    def onnx_file(self, run: Path) -> Path:
        path = run / "export" / FORMATS["onnx"]
        if not path.is_file():
            path, comparison = export_run(run, "onnx", data_dir=self.data_dir)
            print(f"exported {path}: {comparison.describe('onnxruntime')}", flush=True)
            if not comparison.passed:
                raise KdError(f"{path} does not reproduce the JAX model closely enough")
        return path

    def measure(self, run: Path, test_images: np.ndarray) -> Measured:
        key = run.resolve()
        if key not in self.measured:
            classifier = OnnxClassifier(self.onnx_file(run), self.threads)
            logits, throughput = timed_logits(classifier, test_images)
            latency = latency_ms(classifier, test_images[0], self.latency_runs)
            self.measured[key] = Measured(logits, throughput, latency)
        return self.measured[key]

    def row(self, run: Path) -> dict:
        model = load_inference_model(run, self.data_dir)
        dataset = model.dataset
        measured = self.measure(run, dataset.test_images)
        teacher = self.measure(teacher_of(run, model.frozen.config), dataset.test_images)
        flops = flops_per_image(model.apply, dataset.image_shape)
        return {
            "run": run.name, "model": f"{model.name} w{model.width}",
            "params": count_params(model.frozen.variables["params"]),
            "mflops": flops / 1e6 if flops is not None else "",
            "file_mb": self.onnx_file(run).stat().st_size / 1e6,
            "test_accuracy": metrics.classification_metrics(
                measured.logits, dataset.test_labels)["test_accuracy"],
            "teacher_agreement": metrics.agreement(measured.logits, teacher.logits),
            "latency_ms": measured.latency_ms,
            "images_per_second": measured.images_per_second or "",
        }


def hardware() -> str:
    """The CPU's model name (Linux) or what ``platform`` knows, and its logical core count."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} logical cores"


def load_average() -> str:
    """The 1-minute load average: other work on the machine skews every timing."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "unknown"


def plot_report(rows: list[dict], path: Path) -> None:
    """Test accuracy against batch-1 latency, one labelled point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for row in rows:
        x, y = row["latency_ms"], 100 * row["test_accuracy"]
        ax.scatter(x, y, s=40)
        ax.annotate(f"{row['run']}\n{row['model']}, {row['params']:,} params", (x, y),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlim(0, 1.5 * max(row["latency_ms"] for row in rows))  # room for the labels
    ax.margins(y=0.15)
    ax.set(xlabel="onnxruntime CPU latency, batch 1 (ms, median)", ylabel="test accuracy (%)",
           title="accuracy vs latency of the exported models")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_jax.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="teacher or student run dirs")
    parser.add_argument("--data-dir", help="dataset folder (default: $KD_JAX_DATA_DIR, else "
                                           "each run's)")
    parser.add_argument("--plot", default="deployment_report.png", help="PNG to write")
    parser.add_argument("--json", help="also write the table's rows to this JSON file")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads (0: its default, one per core)")
    parser.add_argument("--latency-runs", type=int, default=100,
                        help="single-image runs whose median is the latency")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)

    def job() -> None:
        if args.latency_runs < 1 or args.threads < 0:
            raise KdError("--latency-runs must be >= 1 and --threads >= 0")
        report = Report(args.data_dir, args.threads, args.latency_runs)
        load_before = load_average()
        rows = [report.row(Path(run)) for run in args.runs]
        import onnxruntime

        print(f"onnxruntime {onnxruntime.__version__} on CPU: {hardware()}; "
              f"threads {args.threads or 'default'}; 1-minute load average "
              f"{load_before} before, {load_average()} after")
        print(format_table(rows, COLUMNS))
        plot_report(rows, Path(args.plot))
        print(f"plot: {args.plot}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")

    return run_guarded(job, args.debug)


if __name__ == "__main__":
    sys.exit(main())

"""Deployment report: what each run costs and delivers on a CPU, for each way of shipping it.

    python -m kd_jax.report RUN [RUN ...] [--threads N] [--plot deployment_report.png]

For each run (teacher or student), one row per runtime, all measured in this one process:

- ``onnxruntime float32``: the exported ``RUN/export/model.onnx``;
- ``onnxruntime int8``: ``RUN/export/model.int8.onnx`` (:mod:`kd_jax.quantize`); either file
  is exported, and checked, first when it is missing;
- ``pytorch eager float32``: :mod:`kd_jax.torch_resnet`'s twin holding the run's weights, fed
  the same uint8 images and normalizing them as the graph does (rows skipped, with a note,
  when PyTorch is not installed or the model has no twin);
- ``jax jit float32``: the exported function itself, jitted, on the CPU.

Columns: parameters; MFLOPs per image (XLA's count for the float inference function: a
multiply-add is 2 FLOPs); the file's size; top-1 accuracy on the whole test set; top-1
agreement with the run's own float ONNX model and with its teacher's (a teacher agrees with
itself); the median latency of one image; the median throughput at batch 256.

Timing: the process is pinned to the first ``--threads`` cores it may use (all by default)
before any runtime starts, and onnxruntime and PyTorch are told to use that many threads
(XLA's CPU thread pool cannot be sized from Python; the pinning confines it to those cores).
Every runtime is warmed up, then all runtimes of all runs are timed in turns for
``--repeats`` rounds, each round giving every runtime one untimed single-image call (the calls
before it were another runtime's), then timing ``--latency-runs`` single-image calls and one
batch of 256: a change in machine load hits every row alike. Each runtime keeps its own
defaults otherwise (onnxruntime's threads spin while waiting for work, as deployed). Prints
the table under the CPU's name and writes a PNG of accuracy against latency.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import quantize
from kd_jax.core import metrics
from kd_jax.core.devices import cpu_cores
from kd_jax.core.models import count_params, model_options
from kd_jax.core.rundir import format_table
from kd_jax.errors import KdError, run_guarded
from kd_jax.export import FORMATS, InferenceModel, check_set, export_model, load_inference_model
from kd_jax.onnx_model import OnnxClassifier

THROUGHPUT_BATCH = 256
WARMUP_CALLS = 3
FLOAT_ONNX, INT8_ONNX = "onnxruntime float32", "onnxruntime int8"
COLUMNS = ["run", "model", "runtime", "params", "mflops", "file_mb", "test_accuracy",
           "float_agreement", "teacher_agreement", "latency_ms", "images_per_second"]


@dataclass(frozen=True)
class Runtime:
    """One way of running a run's model: logits of a uint8 NHWC batch, and the file shipped."""

    name: str
    run: Callable[[np.ndarray], np.ndarray]
    file: Path | None = None


def batched_logits(runtime: Runtime, images: np.ndarray,
                   batch_size: int = THROUGHPUT_BATCH) -> np.ndarray:
    """The runtime's logits of all ``images``, untimed."""
    return np.concatenate([runtime.run(images[i:i + batch_size])
                           for i in range(0, len(images), batch_size)])


# --------------------------------------------------------------------------- runtimes
def jax_runtime(model: InferenceModel) -> Runtime:
    """The exported function jitted, its weights arguments (not constants baked in)."""
    forward = jax.jit(model.forward)
    variables = jax.device_put(model.frozen.variables)
    return Runtime("jax jit float32", lambda images: np.asarray(forward(variables, images)))


def torch_runtime(model: InferenceModel, threads: int) -> Runtime | str:
    """The PyTorch twin with the run's weights, or why there is none."""
    options = model_options(model.frozen.config)
    if options["whiten_patch"]:
        return "the PyTorch twin has no whitening layer: no PyTorch row"
    if options["logit_scale"] != 1:
        return "the PyTorch twin has no logit scale: no PyTorch row"
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed: no PyTorch rows (pip install torch)"
    from kd_jax import torch_resnet

    if model.name not in torch_resnet.STAGES:
        return f"{model.name} has no PyTorch twin: no PyTorch row"
    torch.set_num_threads(threads)
    net = torch_resnet.from_flax(model.name, model.width, model.frozen.variables,
                                 options["bn_epsilon"], options["activation"])
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                 for v in (model.dataset.mean, model.dataset.std))

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 255
            return net((x - mean) / std).numpy()

    return Runtime("pytorch eager float32", run)


# --------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    latency_ms: float  # median of single-image calls
    images_per_second: float  # batch size / median time of a batch


def _seconds(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> float:
    start = time.perf_counter()
    run(images)
    return time.perf_counter() - start


def time_runtimes(cases: Sequence[tuple[Runtime, np.ndarray]], repeats: int,
                  latency_runs: int) -> list[Timing]:
    """Latency and throughput of each runtime on its test images, timed in turns (see the
    module docstring)."""
    inputs = [(images[:1], images[:THROUGHPUT_BATCH]) for _, images in cases]
    for (runtime, _), (single, batch) in zip(cases, inputs, strict=True):
        for _ in range(WARMUP_CALLS):
            runtime.run(single)
        runtime.run(batch)
    singles: list[list[float]] = [[] for _ in cases]
    batches: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for i, ((runtime, _), (single, batch)) in enumerate(zip(cases, inputs, strict=True)):
            runtime.run(single)  # untimed: the calls before were another runtime's
            singles[i] += [_seconds(runtime.run, single) for _ in range(latency_runs)]
            batches[i].append(_seconds(runtime.run, batch))
    return [Timing(1e3 * statistics.median(s), len(batch) / statistics.median(b))
            for s, b, (_, batch) in zip(singles, batches, inputs, strict=True)]


@contextlib.contextmanager
def pinned(threads: int) -> Iterator[str]:
    """Bind this process to its first ``threads`` allowed cores while measuring (restored
    after); yields how, for the table's header."""
    if not hasattr(os, "sched_setaffinity"):
        yield "not pinned (no sched_setaffinity here)"
        return
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:threads])
    try:
        yield f"pinned to cores {','.join(map(str, allowed[:threads]))}"
    finally:
        os.sched_setaffinity(0, allowed)


# --------------------------------------------------------------------------- the report
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


@dataclass(frozen=True)
class RunFigures:
    """What every row of one run shares."""

    run: Path
    model: InferenceModel
    mflops: float | None
    float_logits: np.ndarray  # its float ONNX model's, on the test set
    teacher_logits: np.ndarray  # its teacher's float ONNX model's


@dataclass(frozen=True)
class Entry:
    """One row before timing: a run's runtime and its logits on the test set."""

    figures: RunFigures
    runtime: Runtime
    logits: np.ndarray

    def row(self, timing: Timing) -> dict:
        figures, model = self.figures, self.figures.model
        return {
            "run": figures.run.name, "model": f"{model.name} w{model.width}",
            "runtime": self.runtime.name,
            "params": count_params(model.frozen.variables["params"]),
            "mflops": "" if figures.mflops is None else figures.mflops,
            "file_mb": self.runtime.file.stat().st_size / 1e6 if self.runtime.file else "",
            "test_accuracy": metrics.classification_metrics(
                self.logits, model.dataset.test_labels)["test_accuracy"],
            "float_agreement": metrics.agreement(self.logits, figures.float_logits),
            "teacher_agreement": metrics.agreement(self.logits, figures.teacher_logits),
            "latency_ms": timing.latency_ms,
            "images_per_second": timing.images_per_second,
        }


class Report:
    """Exports what is missing, then measures every runtime of every run (each run once)."""

    def __init__(self, data_dir: str | None, threads: int):
        self.data_dir, self.threads = data_dir, threads
        self.float_logits: dict[Path, np.ndarray] = {}  # per run: its float ONNX model's

    def float_file(self, run: Path, model: InferenceModel) -> Path:
        path = run / "export" / FORMATS["onnx"]
        if not path.is_file():
            comparison = export_model(model, "onnx", path, model.dataset.test_images)
            print(f"exported {path}: {comparison.describe('onnxruntime')}", flush=True)
            if not comparison.passed:
                raise KdError(f"{path} does not reproduce the JAX model closely enough")
        return path

    def int8_file(self, model: InferenceModel, float_path: Path) -> Path:
        path = quantize.int8_path(float_path)
        if not path.is_file():
            images, labels = check_set(model, None)
            int8 = quantize.export_int8(float_path, quantize.calibration_images(model),
                                        images, labels)
            print(f"exported {path}: {int8.check.describe()}", flush=True)
            if not int8.check.passed:
                raise KdError(int8.check.failure(path))
        return path

    def float_model_logits(self, run: Path, model: InferenceModel,
                           images: np.ndarray) -> np.ndarray:
        """The run's float ONNX logits of the test ``images``, computed once per run."""
        key = run.resolve()
        if key not in self.float_logits:
            classifier = OnnxClassifier(self.float_file(run, model), self.threads)
            self.float_logits[key] = classifier.logits(images)
        return self.float_logits[key]

    def runtimes(self, run: Path, model: InferenceModel) -> tuple[list[Runtime], list[str]]:
        """The run's runtimes, exporting what is missing; notes on the ones skipped."""
        float_path = self.float_file(run, model)
        found = [Runtime(name, OnnxClassifier(path, self.threads).run, path) for name, path in
                 ((FLOAT_ONNX, float_path), (INT8_ONNX, self.int8_file(model, float_path)))]
        twin = torch_runtime(model, self.threads)
        if isinstance(twin, str):
            return [*found, jax_runtime(model)], [f"{run.name}: {twin}"]
        return [*found, twin, jax_runtime(model)], []

    def entries(self, run: Path) -> tuple[list[Entry], list[str]]:
        model = load_inference_model(run, self.data_dir)
        images = model.dataset.test_images
        runtimes, notes = self.runtimes(run, model)
        teacher = teacher_of(run, model.frozen.config).resolve()
        teacher_logits = self.float_model_logits(
            teacher, model if teacher == run else load_inference_model(teacher, self.data_dir),
            images)
        flops = flops_per_image(model.apply, model.dataset.image_shape)
        figures = RunFigures(run, model, None if flops is None else flops / 1e6,
                             self.float_model_logits(run, model, images), teacher_logits)
        return [Entry(figures, r, batched_logits(r, images)) for r in runtimes], notes

    def measure(self, runs: Sequence[Path], repeats: int,
                latency_runs: int) -> tuple[list[dict], list[str]]:
        """The table's rows, runs in order and each run once, and the notes on skipped rows."""
        entries, notes = [], []
        for run in dict.fromkeys(run.resolve() for run in runs):
            found, skipped = self.entries(run)
            entries += found
            notes += skipped
        timings = time_runtimes([(e.runtime, e.figures.model.dataset.test_images)
                                 for e in entries], repeats, latency_runs)
        return [e.row(t) for e, t in zip(entries, timings, strict=True)], notes


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


def versions() -> str:
    import onnxruntime

    try:
        import torch

        pytorch = f"torch {torch.__version__}"
    except ImportError:
        pytorch = "torch not installed"
    return f"onnxruntime {onnxruntime.__version__}, {pytorch}, jax {jax.__version__}"


def plot_report(rows: list[dict], path: Path) -> None:
    """Test accuracy against batch-1 latency: a colour per run, a marker per runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(row["run"] for row in rows))
    runtimes = list(dict.fromkeys(row["runtime"] for row in rows))
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        ax.scatter(row["latency_ms"], 100 * row["test_accuracy"], s=50,
                   color=f"C{runs.index(row['run'])}", marker="osD^v"[runtimes.index(
                       row["runtime"]) % 5])
    for i, run in enumerate(runs):
        ax.scatter([], [], color=f"C{i}", label=run)
    for i, runtime in enumerate(runtimes):
        ax.scatter([], [], color="grey", marker="osD^v"[i % 5], label=runtime)
    ax.legend(fontsize=8)
    ax.margins(x=0.1, y=0.15)
    ax.set(xlabel="CPU latency, batch 1 (ms, median)", ylabel="test accuracy (%)",
           title="accuracy vs latency of each run, each runtime")
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
    parser.add_argument("--threads", type=int, default=cpu_cores(),
                        help="cores to pin to and threads per runtime (default: all the "
                             "process may use, %(default)s)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="rounds of timing, every runtime in turn (default: %(default)s)")
    parser.add_argument("--latency-runs", type=int, default=10,
                        help="single-image calls per runtime and round (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)

    def job() -> None:
        if args.repeats < 1 or args.latency_runs < 1:
            raise KdError("--repeats and --latency-runs must be >= 1")
        if not 1 <= args.threads <= cpu_cores():
            raise KdError(f"--threads must be in [1, {cpu_cores()}], got {args.threads}")
        load_before = load_average()
        with pinned(args.threads) as pinning:
            report = Report(args.data_dir, args.threads)
            rows, notes = report.measure([Path(run) for run in args.runs], args.repeats,
                                         args.latency_runs)
        print(f"CPU: {hardware()}; threads per runtime: {args.threads}, {pinning}; "
              f"{versions()}; medians of {args.repeats} x {args.latency_runs} single-image "
              f"and {args.repeats} batch-{THROUGHPUT_BATCH} calls per row, runtimes in turns; "
              f"1-minute load average {load_before} before, {load_average()} after")
        print(format_table(rows, COLUMNS))
        for note in notes:
            print(f"note: {note}")
        plot_report(rows, Path(args.plot))
        print(f"plot: {args.plot}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")

    return run_guarded(job, args.debug)


if __name__ == "__main__":
    sys.exit(main())

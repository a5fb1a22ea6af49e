"""Images per second of kd-jax's teacher step, distill step and evaluation, beside PyTorch.

Times exactly what training runs: ``kd_jax.core.steps.run_steps`` (batch gathered from
device-resident uint8 images, augmented and normalised inside jit, then the step) and
``make_predict``, on random data, after compilation; compile time is reported apart.
``--compare-torch`` times the same ResNet in PyTorch eager (optionally channels_last / bf16
autocast / torch.compile) in the same process, interleaved with the JAX cases repeat by repeat so
that both see the same machine load, and prints JAX's ratio to each. Needs no dataset, no
tensorflow-datasets and no network.

CPU ms/img is this process's CPU time (all threads) per image and "cores" the CPU time over the
wall time: how many cores a case kept busy, and on a loaded machine a steadier measure of the
work done than the wall clock. FLOPs are XLA's cost analysis of one step (before optimisation,
so fusion does not hide any), per image; achieved FLOP/s is that times images per second. The
PyTorch side runs no augmentation and no gather: the comparison favours PyTorch slightly.

``--net`` picks the JAX networks: ``plain`` is ``create_model``'s (ReLU, BatchNorm over the
whole batch with learned scales: the PyTorch twin's network, which the ratios compare against),
``recipe`` the one ``train_teacher.py`` and ``distill.py`` train by default (SiLU, ghost
BatchNorm over groups of 32, frozen scales; ``kd_jax.cli.config.with_model_recipe``): what the
default recipe costs in images per second.

    python benchmarks/throughput.py --compare-torch                      # CPU defaults
    python benchmarks/throughput.py --batch-size 512 --steps-per-dispatch 1,10 --compare-torch
    python benchmarks/throughput.py --model resnet8 --width 4 --batch-size 32  # dispatch cost
    python benchmarks/throughput.py --dtype float32,bfloat16 --what teacher  # both, one run
    python benchmarks/throughput.py --net plain,recipe --batch-size 512 --what teacher
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from kd_jax.cli import runtime  # noqa: E402
from kd_jax.cli.config import TeacherConfig, with_model_recipe  # noqa: E402
from kd_jax.core.augment import Augmentation  # noqa: E402
from kd_jax.core.conv import CpuConv  # noqa: E402
from kd_jax.core.data import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from kd_jax.core.devices import check_divisible, compute_dtype, make_mesh  # noqa: E402
from kd_jax.core.evaluation import make_predict  # noqa: E402
from kd_jax.core.models import create_model, init_variables, model_options  # noqa: E402
from kd_jax.core.optim import Recipe, make_optimizer  # noqa: E402
from kd_jax.core.steps import (  # noqa: E402
    create_state,
    epoch_order,
    hinton_step,
    make_teacher_step,
    run_steps,
)

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
TEMPERATURE = 4.0
KINDS = ("teacher", "distill", "eval")
# kd: kd_jax's CPU convolution (im2col kernel gradient, bf16 matrix products); xla: XLA's own
CONVS = {"kd": CpuConv, "xla": nn.Conv}
NETS = ("plain", "recipe")


def net_options(net: str, model: str, batch_size: int) -> dict:
    """``create_model``'s options for ``net``: none (plain), or those the jobs fill in for
    ``model`` at ``batch_size`` when no flag sets them (recipe)."""
    if net == "plain":
        return {}
    resolved = with_model_recipe(TeacherConfig(model=model, batch_size=batch_size))
    return model_options(asdict(resolved))


@dataclass
class Case:
    """One timed configuration: ``run(n)`` performs ``n`` dispatches and waits for them."""

    kind: str  # teacher | distill | eval
    framework: str  # jax | torch
    variant: str  # "spd=1", "spd=10" for jax; "eager", "channels_last+bf16" ... for torch
    run: Callable[[int], None]
    images_per_dispatch: int
    compile_seconds: float
    net: str = "plain"  # the JAX network (NETS); torch runs the plain one
    flops_per_image: float | None = None
    dispatch_seconds: float | None = None  # host cost of one call of a no-op with the same args
    seconds_per_dispatch: list[float] = field(default_factory=list)
    cpu_seconds_per_dispatch: list[float] = field(default_factory=list)  # this process, all cores

    @property
    def name(self) -> str:
        return f"{self.kind} {self.framework} {self.variant}"

    def images_per_second(self) -> float:
        return self.images_per_dispatch / statistics.median(self.seconds_per_dispatch)

    def row(self) -> dict:
        ips = self.images_per_second()
        flops = self.flops_per_image
        spread = [self.images_per_dispatch / s for s in self.seconds_per_dispatch]
        return {"kind": self.kind, "framework": self.framework, "variant": self.variant,
                "net": self.net,
                "images_per_second": ips, "images_per_second_min": min(spread),
                "images_per_second_max": max(spread), "compile_seconds": self.compile_seconds,
                "gflops_per_image": None if flops is None else flops / 1e9,
                "achieved_tflops": None if flops is None else flops * ips / 1e12,
                "cpu_ms_per_image": 1e3 * statistics.median(self.cpu_seconds_per_dispatch)
                / self.images_per_dispatch,
                "cores_busy": statistics.median(
                    c / s for c, s in zip(self.cpu_seconds_per_dispatch,
                                          self.seconds_per_dispatch, strict=True)),
                "dispatch_fraction": (None if self.dispatch_seconds is None else
                                      self.dispatch_seconds
                                      / statistics.median(self.seconds_per_dispatch))}


# --------------------------------------------------------------------------- JAX
def _flops(fn: Callable, *args) -> float | None:
    """XLA's FLOP count of ``fn(*args)`` (unoptimised HLO, so nothing is fused away).

    Callers pass ``fn`` built with XLA's own convolutions (``conv="xla"``): kd_jax's kernel
    gradient loops over chunks of the batch, and cost analysis counts a loop's body once. The
    arithmetic is the same. jax raises NotImplementedError from ``Lowered.cost_analysis`` on
    backends behind the PJRT C API (the CUDA plugin; the H200 run of 2026-11-26 printed no
    FLOPs), so there the count falls back to the compiled program's.
    """
    lowered = jax.jit(fn).lower(*args)
    for count in (lowered.cost_analysis, lambda: lowered.compile().cost_analysis()):
        try:
            analysis = count()
            analysis = analysis[0] if isinstance(analysis, list) else analysis
            return float(analysis["flops"])
        except Exception:  # cost analysis is best-effort on some backends
            continue
    return None


def _dispatch_seconds(args: tuple, repeats: int = 200) -> float:
    """Host time of one call of a jitted no-op taking the same argument pytree as the step."""
    noop = jax.jit(lambda *a: jnp.zeros(()), keep_unused=True)
    jax.block_until_ready(noop(*args))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            out = noop(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / repeats)
    return statistics.median(times)


def _train_step(kind: str, a: argparse.Namespace, dtype: np.dtype, conv: type, net: str,
                arrays: tuple, replicated: NamedSharding) -> tuple:
    """(step, initial state, the step's arrays) of a teacher or distill case, built with
    ``conv`` as every model's convolution."""
    tx, _ = make_optimizer(Recipe(0.1, weight_decay=5e-4, warmup_fraction=0), 10**6)
    build = lambda name, width: create_model(name, NUM_CLASSES, width, dtype, conv=conv,
                                             **net_options(net, name, a.batch_size))
    if kind == "teacher":
        model = build(a.model, a.width)
        step, arrays = make_teacher_step(), arrays
    else:
        teacher, model = build(a.model, a.width), build(a.student, a.student_width)
        teacher_vars = jax.device_put(init_variables(teacher, IMAGE_SHAPE, 1), replicated)
        step, arrays = hinton_step(teacher.apply, teacher_vars, TEMPERATURE), arrays[:1]
    state = jax.device_put(create_state(model, init_variables(model, IMAGE_SHAPE, 0), tx),
                           replicated)
    return step, state, arrays


def jax_train_case(kind: str, a: argparse.Namespace, spd: int, dtype: np.dtype,
                   conv: str, net: str) -> Case:
    """A teacher or distill dispatch of ``spd`` steps through ``run_steps``, compiled."""
    mesh = make_mesh()
    check_divisible(a.batch_size, mesh)
    rng = np.random.default_rng(0)
    n = a.batch_size * spd
    replicated = NamedSharding(mesh, P())
    images = jax.device_put(rng.integers(0, 256, (n, *IMAGE_SHAPE), np.uint8), replicated)
    labels = jax.device_put(rng.integers(0, NUM_CLASSES, n).astype(np.int32), replicated)
    step, state, arrays = _train_step(kind, a, dtype, CONVS[conv], net, (images, labels),
                                      replicated)
    key = jax.random.key(0)
    order = epoch_order(key, 0, n, a.batch_size, spd)
    call_args = (step, state, arrays, order, np.int32(spd), np.int32(0), key)
    counted, counted_state, _ = _train_step(kind, a, dtype, nn.Conv, net, arrays, replicated)
    batch = tuple(x[: a.batch_size] for x in arrays)
    flops = _flops(lambda s, *b: counted(s, *b), counted_state, *batch, key)
    dispatch = _dispatch_seconds(call_args)

    start = time.perf_counter()
    compiled = run_steps.lower(*call_args, length=spd, mesh=mesh,
                               augmentation=Augmentation(4, True, CIFAR10_MEAN, CIFAR10_STD)
                               ).compile()
    compile_seconds = time.perf_counter() - start
    holder = [state]

    def run(dispatches: int) -> None:
        state = holder[0]
        for _ in range(dispatches):
            state, metrics = compiled(step, state, *call_args[2:])
        jax.block_until_ready((state, metrics))
        holder[0] = state

    return Case(kind, "jax", f"spd={spd}", run, n, compile_seconds, net,
                None if flops is None else flops / a.batch_size, dispatch)


def jax_eval_case(a: argparse.Namespace, spd: int, dtype: np.dtype, conv: str,
                  net: str) -> Case:
    """``make_predict`` over ``spd`` batches per dispatch (a forward: the convolution choice
    changes no FLOP count)."""
    mesh = make_mesh()
    model = create_model(a.model, NUM_CLASSES, a.width, dtype, conv=CONVS[conv],
                         **net_options(net, a.model, a.batch_size))
    augmentation = Augmentation(4, True, CIFAR10_MEAN, CIFAR10_STD)
    predict = make_predict(model, augmentation, a.batch_size, mesh)
    replicated = NamedSharding(mesh, P())
    variables = jax.device_put(init_variables(model, IMAGE_SHAPE, 0), replicated)
    n = a.batch_size * spd
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (n, *IMAGE_SHAPE), np.uint8), replicated)
    apply = lambda v, x: model.apply(v, augmentation.normalize(x), train=False)
    flops = _flops(apply, variables, images[: a.batch_size])
    dispatch = _dispatch_seconds((variables, images))

    start = time.perf_counter()
    compiled = predict.lower(variables, images).compile()
    compile_seconds = time.perf_counter() - start

    def run(dispatches: int) -> None:
        for _ in range(dispatches):
            out = compiled(variables, images)
        jax.block_until_ready(out)

    return Case("eval", "jax", f"spd={spd}", run, n, compile_seconds, net,
                None if flops is None else flops / a.batch_size, dispatch)


# --------------------------------------------------------------------------- PyTorch
TORCH_FEATURES = ("channels_last", "bf16", "compile")


def torch_cases(a: argparse.Namespace, kinds: list[str]) -> list[Case]:
    """The same networks in PyTorch, one case per (kind, variant); [] when torch is absent."""
    try:
        import torch  # noqa: F401
    except ImportError:
        print("--compare-torch: PyTorch is not installed; skipping the comparison")
        return []
    cases = []
    for variant in a.torch_variants.split(","):
        features = set(variant.split("+")) - {"eager"}
        if features - set(TORCH_FEATURES):
            raise SystemExit(f"torch variant {variant!r}: features are eager or "
                             f"{', '.join(TORCH_FEATURES)} joined by '+'")
        cases += [torch_case(kind, variant, features, a) for kind in kinds]
    return cases


def torch_case(kind: str, variant: str, features: set[str], a: argparse.Namespace) -> Case:
    """One PyTorch step (train, distill or inference) on a fixed random batch."""
    import torch
    from torch.nn import functional as F

    from kd_jax import torch_resnet

    device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fmt = torch.channels_last if "channels_last" in features else torch.contiguous_format
    autocast = lambda: torch.autocast(device, torch.bfloat16, enabled="bf16" in features)

    def build(name: str, width: int, seed: int, train: bool) -> Callable:
        torch.manual_seed(seed)
        net = torch_resnet.create(name, width).to(device, memory_format=fmt).train(train)
        return net, (torch.compile(net) if "compile" in features else net)

    x = torch.randn(a.batch_size, 3, 32, 32, device=device).to(memory_format=fmt)
    y = torch.randint(0, NUM_CLASSES, (a.batch_size,), device=device)
    if kind == "eval":
        _, model = build(a.model, a.width, 0, False)

        def step() -> None:
            with torch.inference_mode(), autocast():
                model(x)
    else:
        name, width = (a.student, a.student_width) if kind == "distill" else (a.model, a.width)
        net, model = build(name, width, 0, True)
        teacher = build(a.model, a.width, 1, False)[1] if kind == "distill" else None
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                              weight_decay=5e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast():
                if teacher is None:
                    loss = F.cross_entropy(model(x).float(), y)
                else:
                    with torch.no_grad():
                        t = teacher(x).float()
                    loss = F.kl_div(F.log_softmax(model(x).float() / TEMPERATURE, -1),
                                    F.log_softmax(t / TEMPERATURE, -1), log_target=True,
                                    reduction="batchmean") * TEMPERATURE**2
            loss.backward()
            opt.step()

    start = time.perf_counter()
    step()  # the first call: torch.compile compiles here, eager warms its allocator
    sync()
    compile_seconds = time.perf_counter() - start

    def run(dispatches: int) -> None:
        for _ in range(dispatches):
            step()
        sync()

    return Case(kind, "torch", variant, run, a.batch_size, compile_seconds)


# --------------------------------------------------------------------------- driver
def measure(cases: list[Case], images: int, repeats: int) -> None:
    """One warm-up, then ``repeats`` rounds that time ``images`` images of every case in turn
    (interleaved, so that a change in machine load hits every case alike)."""
    for case in cases:
        case.run(1)
    for round_ in range(repeats):
        for case in cases:
            dispatches = max(1, math.ceil(images / case.images_per_dispatch))
            start, cpu_start = time.perf_counter(), time.process_time()
            case.run(dispatches)
            case.seconds_per_dispatch.append((time.perf_counter() - start) / dispatches)
            case.cpu_seconds_per_dispatch.append((time.process_time() - cpu_start) / dispatches)
            print(f"round {round_ + 1}/{repeats}: {case.name} "
                  f"{case.images_per_dispatch / case.seconds_per_dispatch[-1]:.1f} img/s",
                  flush=True)


def same_network(rows: list[dict]) -> None:
    """Give torch rows the FLOPs XLA counted for the same network and kind."""
    flops = {r["kind"]: r["gflops_per_image"] for r in rows
             if r["framework"] == "jax" and r["net"] == "plain"}
    for r in rows:
        if r["framework"] == "torch" and flops.get(r["kind"]) is not None:
            r["gflops_per_image"] = flops[r["kind"]]
            r["achieved_tflops"] = flops[r["kind"]] * r["images_per_second"] / 1e3


def environment() -> dict:
    env = {"jax": jax.__version__, "backend": jax.default_backend(),
           "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
           "processes": jax.process_count(), "cpu_count": os.cpu_count(),
           "machine": platform.processor() or platform.machine(),
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        import torch
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return env


def format_table(rows: list[dict]) -> str:
    """Fixed-width table; each row carries JAX's best same-kind speed on the plain network (the
    PyTorch twin's) as a ratio to its own."""
    best_jax = {}
    for r in rows:
        if r["framework"] == "jax" and r["net"] == "plain":
            best_jax[r["kind"]] = max(best_jax.get(r["kind"], 0.0), r["images_per_second"])
    head = (f"{'case':<34}{'img/s':>9}{'min':>8}{'max':>8}{'compile s':>11}{'GFLOP/img':>11}"
            f"{'TFLOP/s':>9}{'CPU ms/img':>11}{'cores':>7}{'dispatch':>10}{'jax/this':>10}")
    lines = [head, "-" * len(head)]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    for r in rows:
        ratio = best_jax.get(r["kind"], 0.0) / r["images_per_second"]
        lines.append(f"{r['kind'] + ' ' + r['framework'] + ' ' + r['variant']:<34}"
                     f"{r['images_per_second']:>9.1f}{r['images_per_second_min']:>8.1f}"
                     f"{r['images_per_second_max']:>8.1f}{r['compile_seconds']:>11.2f}"
                     f"{fmt(r['gflops_per_image'], '.3f'):>11}"
                     f"{fmt(r['achieved_tflops'], '.4f'):>9}{r['cpu_ms_per_image']:>11.1f}"
                     f"{r['cores_busy']:>7.2f}"
                     f"{fmt(r['dispatch_fraction'], '.1%'):>10}{ratio:>10.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="teacher / evaluated model")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--student", default=None, help="distill student (default: --model)")
    p.add_argument("--student-width", type=int, default=None, help="default: --width")
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--dtype", default="auto",
                   help="comma list of auto, float32, bfloat16: each timed in the same run")
    p.add_argument("--what", default=",".join(KINDS), help="comma list of teacher,distill,eval")
    p.add_argument("--steps-per-dispatch", default="1",
                   help="comma list of JAX steps per dispatch to compare, e.g. 1,10")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case per repeat")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    p.add_argument("--conv", default="kd",
                   help="comma list of JAX convolutions to time: kd (kd_jax.conv) and/or xla "
                        "(plain lax.conv_general_dilated, what kd-jax used before)")
    p.add_argument("--net", default="plain",
                   help="comma list of JAX networks: plain (the PyTorch twin's) and/or recipe "
                        "(the jobs' default SiLU, ghost BatchNorm and frozen scales)")
    p.add_argument("--compare-torch", action="store_true")
    p.add_argument("--torch-variants", default=None,
                   help="comma list of eager | channels_last | bf16 | compile joined by '+' "
                        "(default: eager and/or bf16, as the JAX dtypes)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = p.parse_args(argv)
    a.student = a.student or a.model
    a.student_width = a.student_width or a.width
    a.kinds = [k for k in a.what.split(",") if k]
    if set(a.kinds) - set(KINDS):
        p.error(f"--what takes {', '.join(KINDS)}")
    a.spds = [int(s) for s in a.steps_per_dispatch.split(",")]
    a.convs = a.conv.split(",")
    a.nets = a.net.split(",")
    if set(a.nets) - set(NETS):
        p.error(f"--net takes {', '.join(NETS)}")
    if set(a.convs) - set(CONVS):
        p.error(f"--conv takes {', '.join(CONVS)}")
    if set(a.dtype.split(",")) - {"auto", "float32", "bfloat16"}:
        p.error("--dtype takes auto, float32, bfloat16")
    a.dtypes = list(dict.fromkeys(compute_dtype(d) for d in a.dtype.split(",")))
    if a.torch_variants is None:
        a.torch_variants = ",".join("bf16" if d == np.dtype("bfloat16") else "eager"
                                    for d in a.dtypes)
    return a


def main(argv: list[str] | None = None) -> int:
    runtime.configure()  # one XLA device per core, before jax starts its backend
    a = parse_args(argv)
    env = environment()
    print(f"jax {env['jax']} on {env['devices']} x {env['device_kind']} ({env['backend']}), "
          f"{env['cpu_count']} CPUs; XLA_FLAGS={env['xla_flags']!r}", flush=True)
    print(f"{a.model} width {a.width}, student {a.student} width {a.student_width}, "
          f"batch {a.batch_size}, dtype {', '.join(d.name for d in a.dtypes)}", flush=True)
    cases = []
    for conv, dtype, net in itertools.product(a.convs, a.dtypes, a.nets):
        for kind in a.kinds:
            for spd in a.spds:
                case = (jax_eval_case(a, spd, dtype, conv, net) if kind == "eval"
                        else jax_train_case(kind, a, spd, dtype, conv, net))
                case.variant += "" if len(a.dtypes) == 1 else f" {dtype.name}"
                case.variant += "" if conv == "kd" else f" conv={conv}"
                case.variant += "" if net == "plain" else f" net={net}"
                cases.append(case)
                print(f"compiled {case.name} in {case.compile_seconds:.1f} s", flush=True)
    if a.compare_torch:
        cases += torch_cases(a, a.kinds)
    measure(cases, a.steps * a.batch_size, a.repeats)
    rows = [c.row() for c in cases]
    same_network(rows)
    print(format_table(rows))
    if a.json:
        a.json.write_text(json.dumps({"environment": env, "args": {
            k: v for k, v in vars(a).items() if k != "json"}, "results": rows}, indent=2,
            default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Milliseconds per ResNet-18 convolution on one CPU core: XLA's own against ``kd_jax.core.conv``.

For each layer shape of ResNet-18 (CIFAR stem), times the forward pass, the input gradient and
the kernel gradient, each jitted on its own, median of ``--repeats`` calls after compilation.
Run it pinned to one core with one single-threaded XLA device, as training runs each device:

    taskset -c 0 python benchmarks/conv_layers.py            # batch 64: one of two devices' share
    taskset -c 0 python benchmarks/conv_layers.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# isort: split
import jax  # noqa: E402
from jax import lax  # noqa: E402

from kd_jax.core import conv as kd_conv  # noqa: E402

# (map size, in channels, out channels, kernel, stride) of ResNet-18's convolutions
LAYERS = [(32, 64, 64, 3, 1), (16, 128, 128, 3, 1), (8, 256, 256, 3, 1), (4, 512, 512, 3, 1),
          (32, 64, 128, 3, 2), (32, 64, 128, 1, 2)]
CONVS = {"xla": lax.conv_general_dilated, "kd": kd_conv.conv_general_dilated}


def milliseconds(fn: Callable, *args, repeats: int) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def layer_times(conv: Callable, x: jax.Array, kernel: jax.Array, dy: jax.Array, stride: int,
                repeats: int) -> tuple[float, float, float]:
    """(forward, input gradient, kernel gradient) milliseconds."""
    def forward(x, kernel):
        return conv(x, kernel, (stride, stride), "SAME",
                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def input_grad(x, kernel, dy):
        return jax.vjp(lambda x: forward(x, kernel), x)[1](dy)[0]

    def kernel_grad(x, kernel, dy):
        return jax.vjp(lambda kernel: forward(x, kernel), kernel)[1](dy)[0]

    return (milliseconds(forward, x, kernel, repeats=repeats),
            milliseconds(input_grad, x, kernel, dy, repeats=repeats),
            milliseconds(kernel_grad, x, kernel, dy, repeats=repeats))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    a = parser.parse_args(argv)
    print(f"batch {a.batch_size}, {a.dtype}, {jax.device_count()} device(s), ms per call "
          "(xla / kd)")
    print(f"{'layer':<28}{'forward':>16}{'input grad':>16}{'kernel grad':>16}")
    for size, cin, cout, k, stride in LAYERS:
        keys = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(keys[0], (a.batch_size, size, size, cin), a.dtype)
        kernel = jax.random.normal(keys[1], (k, k, cin, cout), a.dtype)
        dy = jax.random.normal(keys[2], (a.batch_size, size // stride, size // stride, cout),
                               a.dtype)
        times = {name: layer_times(conv, x, kernel, dy, stride, a.repeats)
                 for name, conv in CONVS.items()}
        cells = [f"{times['xla'][i]:7.1f} /{times['kd'][i]:6.1f}" for i in range(3)]
        name = f"{size}x{size}x{cin} -> {cout}, {k}x{k}/{stride}"
        print(f"{name:<28}" + "".join(f"{c:>16}" for c in cells), flush=True)


if __name__ == "__main__":
    main()

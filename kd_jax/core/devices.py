"""Devices: the compute dtype, the data-parallel mesh and what a batch size must satisfy."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kd_jax.errors import KdError


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def compute_dtype(name: str) -> jnp.dtype:
    """``auto`` is bfloat16 on accelerators and float32 on CPU: a CPU run keeps full precision
    unless asked (``--dtype bfloat16`` trains faster on CPUs with bf16 matrix units, see
    benchmarks/README.md)."""
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(name)


def make_mesh() -> Mesh:
    """A 1-D mesh over every device; batches are split along its ``data`` axis."""
    return Mesh(np.array(jax.devices()), ("data",))


def check_divisible(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    if batch_size % mesh.size:
        raise KdError(f"{what} {batch_size} is not divisible by the {mesh.size} devices in use")


def check_batch_size(batch_size: int, num_examples: int, mesh: Mesh) -> None:
    """Refuse a batch size that yields no step or cannot be split over the devices."""
    if batch_size > num_examples:
        raise KdError(f"batch_size {batch_size} exceeds the {num_examples} training images")
    check_divisible(batch_size, mesh)


def default_steps_per_dispatch() -> int:
    """One step per dispatch on CPU (see :func:`run_steps`), ten under a scan elsewhere."""
    return 1 if jax.default_backend() == "cpu" else 10

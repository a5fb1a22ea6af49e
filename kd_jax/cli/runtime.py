"""The fastest XLA:CPU setup; the entry points call :func:`configure` before jax starts a backend.

On a CPU, one XLA device keeps the cores only partly busy: XLA's convolutions parallelise
poorly inside one op, and its per-image cost grows with the batch. Splitting the host into one
single-threaded XLA device per core and the batch across them (the same data-parallel mesh
that spreads a batch over GPUs) ran the ResNet-18 train step with XLA's own convolutions 1.2x
faster relative to PyTorch on this project's 2-core CPU, and about as fast with
:mod:`kd_jax.core.conv` (see benchmarks/README.md). ``XLA_FLAGS`` is read once, when jax
initialises its CPU backend (the first computation or device query, not ``import jax``), so
:func:`configure` does nothing once a backend is up, when the user set ``XLA_FLAGS``
themselves, or when jax will run on an accelerator. Nothing happens on import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import MutableMapping

from kd_jax.core.devices import cpu_cores

# Plugins that give jax an accelerator backend (CUDA, ROCm, TPU).
_ACCELERATOR_MODULES = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")
MAX_CPU_DEVICES = 8  # keeps batch sizes like 1000 (the default eval batch) divisible


def cpu_flags(cores: int) -> list[str]:
    """XLA flags for ``cores`` cores: the largest power of two <= cores (at most 8) devices.

    Each device is single-threaded only when there is a device per core; with more cores than
    devices, Eigen's threads keep the spare cores busy.
    """
    devices = 1 << (min(cores, MAX_CPU_DEVICES).bit_length() - 1)
    if devices == 1:
        return []
    flags = [f"--xla_force_host_platform_device_count={devices}"]
    if devices == cores:
        flags.append("--xla_cpu_multi_thread_eigen=false")
    return flags


def will_use_cpu(environ: MutableMapping[str, str]) -> bool:
    """Whether jax's default backend will be the CPU: ``JAX_PLATFORMS`` or no accelerator plugin."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    return not any(importlib.util.find_spec(m) for m in _ACCELERATOR_MODULES)


def configure(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Set ``XLA_FLAGS`` for the CPU when nobody else has; returns what was set, if anything."""
    if backend_started() or "XLA_FLAGS" in environ or not will_use_cpu(environ):
        return None
    flags = cpu_flags(cpu_cores())
    if not flags:
        return None
    environ["XLA_FLAGS"] = " ".join(flags)
    return environ["XLA_FLAGS"]


def backend_started() -> bool:
    """Whether jax has started a backend (after which XLA_FLAGS are no longer read)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # no public API tells; absent, assume it has started

    return getattr(xla_bridge, "backends_are_initialized", lambda: True)()

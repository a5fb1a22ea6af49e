"""The CPU setup that entry points apply before jax is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kd_jax import runtime

ROOT = Path(__file__).resolve().parent.parent


def test_one_single_threaded_device_per_core_up_to_a_power_of_two():
    assert runtime.cpu_flags(1) == []
    assert runtime.cpu_flags(2) == ["--xla_force_host_platform_device_count=2",
                                    "--xla_cpu_multi_thread_eigen=false"]
    # 6 cores: 4 devices (batches stay divisible), Eigen threads use the other two cores
    assert runtime.cpu_flags(6) == ["--xla_force_host_platform_device_count=4"]
    assert runtime.cpu_flags(96) == ["--xla_force_host_platform_device_count=8"]


def test_users_flags_and_accelerators_are_left_alone(monkeypatch):
    monkeypatch.delitem(sys.modules, "jax", raising=False)  # pretend jax is not imported yet
    assert runtime.configure({"XLA_FLAGS": "--xla_dump_to=/tmp"}) is None
    assert runtime.configure({"JAX_PLATFORMS": "cuda"}) is None
    env = {"JAX_PLATFORMS": "cpu"}
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 2)
    assert runtime.configure(env) == env["XLA_FLAGS"] == " ".join(runtime.cpu_flags(2))


def test_too_late_once_jax_is_imported():
    import jax  # noqa: F401

    assert runtime.configure({"JAX_PLATFORMS": "cpu"}) is None


def test_entry_point_import_order_gives_the_devices():
    """What ``train_teacher.py`` does: import kd_jax.runtime, then jax sees the host devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    code = "import kd_jax.runtime, jax; print(jax.device_count())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    flags = runtime.cpu_flags(runtime.cpu_cores())
    expected = int(flags[0].split("=")[1]) if flags else 1
    assert int(out.stdout.strip()) == expected

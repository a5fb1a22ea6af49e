"""The CPU setup that entry points apply before jax starts a backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kd_jax.cli import runtime

ROOT = Path(__file__).resolve().parent.parent


def test_one_single_threaded_device_per_core_up_to_a_power_of_two():
    assert runtime.cpu_flags(1) == []
    assert runtime.cpu_flags(2) == ["--xla_force_host_platform_device_count=2",
                                    "--xla_cpu_multi_thread_eigen=false"]
    # 6 cores: 4 devices (batches stay divisible), Eigen threads use the other two cores
    assert runtime.cpu_flags(6) == ["--xla_force_host_platform_device_count=4"]
    assert runtime.cpu_flags(96) == ["--xla_force_host_platform_device_count=8"]


def test_users_flags_and_accelerators_are_left_alone(monkeypatch):
    monkeypatch.setattr(runtime, "backend_started", lambda: False)
    assert runtime.configure({"XLA_FLAGS": "--xla_dump_to=/tmp"}) is None
    assert runtime.configure({"JAX_PLATFORMS": "cuda"}) is None
    env = {"JAX_PLATFORMS": "cpu"}
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 2)
    assert runtime.configure(env) == env["XLA_FLAGS"] == " ".join(runtime.cpu_flags(2))


def run_python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=True).stdout.strip()


def expected_devices() -> int:
    flags = runtime.cpu_flags(runtime.cpu_cores())
    return int(flags[0].split("=")[1]) if flags else 1


def test_importing_kd_jax_configures_nothing():
    """No hidden state: importing the package (and jax) leaves XLA as it is."""
    code = "import os, kd_jax, kd_jax.cli.main, jax; print(os.environ.get('XLA_FLAGS'))"
    assert run_python(code) == "None"


def test_configure_after_importing_jax_still_gives_the_devices():
    """XLA reads its flags when the backend starts, not on import: the entry points call
    configure() once everything is imported."""
    code = ("import jax, kd_jax; from kd_jax.cli import runtime; runtime.configure(); "
            "print(jax.device_count())")
    assert int(run_python(code)) == expected_devices()


def test_too_late_once_a_backend_has_started():
    code = ("import jax; jax.devices(); from kd_jax.cli import runtime; "
            "print(runtime.configure({'JAX_PLATFORMS': 'cpu'}))")
    assert run_python(code) == "None"


def test_the_first_of_jax_platforms_decides(monkeypatch):
    """JAX_PLATFORMS lists backends in order of preference: the first one is what runs."""
    monkeypatch.setattr(runtime, "backend_started", lambda: False)
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 2)
    assert runtime.configure({"JAX_PLATFORMS": "cuda,cpu"}) is None
    env = {"JAX_PLATFORMS": " cpu , cuda"}
    assert runtime.configure(env) == env["XLA_FLAGS"] == " ".join(runtime.cpu_flags(2))
    # Unset or blank: the installed plugins decide.
    monkeypatch.setattr(runtime.importlib.metadata, "entry_points", lambda group: ["a plugin"])
    assert runtime.configure({"JAX_PLATFORMS": " "}) is None

"""Two real ``jax.distributed`` processes on localhost (CPU collectives through gloo) train
the same few steps as one process does, and agree with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import free_port, run_processes

WORKER = Path(__file__).with_name("parallel_worker.py")


def result(stdout: str) -> dict:
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    port = str(free_port())
    runs = run_processes([[sys.executable, str(WORKER), "--process-id", str(i),
                           "--num-processes", "2", "--port", port] for i in range(2)],
                         tmp_path, env)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    first, second = (result(r.stdout) for r in runs)
    single = result(subprocess.run(
        [sys.executable, str(WORKER)], capture_output=True, text=True, timeout=600, check=True,
        env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}).stdout)

    assert (first["processes"], first["devices"]) == (2, 2)
    assert (single["processes"], single["devices"]) == (1, 2)
    for kind in ("teacher", "distill", "logits"):
        np.testing.assert_array_equal(first[kind], second[kind])
        np.testing.assert_allclose(first[kind], single[kind], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first["teacher_losses"], single["teacher_losses"], rtol=1e-4)


# --------------------------------------------------------------------------- JAX_* settings
def start_with_env(monkeypatch, capsys, env: dict, argv=()):
    """The command line's start-up with ``env`` set and jax.distributed.initialize recorded
    (not called): (exit code, initialize's arguments or None, whether the job ran, stderr)."""
    from kd_jax.cli import distributed
    from kd_jax.cli.config import TeacherConfig
    from kd_jax.cli.main import main

    for name in distributed.ENV.values():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    joined, ran = [], []
    monkeypatch.setattr(distributed.jax.distributed, "initialize",
                        lambda *args: joined.append(args))
    code = main(TeacherConfig, lambda config, hooks: ran.append(config), "", list(argv))
    return code, (joined or [None])[0], bool(ran), capsys.readouterr().err


def test_multi_host_settings_come_from_the_jax_environment(monkeypatch, capsys):
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3"}
    assert start_with_env(monkeypatch, capsys, env) == (0, ("10.0.0.1:1234", 4, 3), True, "")
    # A flag wins over its variable.
    assert start_with_env(monkeypatch, capsys, env, ["--process-id", "1"]) == (
        0, ("10.0.0.1:1234", 4, 1), True, "")
    assert start_with_env(monkeypatch, capsys, {}) == (0, None, True, "")  # one process


@pytest.mark.parametrize(("env", "message"), [
    ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES must be an integer, got 'two'"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "1.5"},
     "JAX_PROCESS_ID must be an integer, got '1.5'"),
    ({"JAX_PROCESS_ID": "1"}, "--num-processes / --process-id need --coordinator-address"),
    ({"JAX_NUM_PROCESSES": "2"}, "--num-processes / --process-id need --coordinator-address"),
])
def test_bad_jax_environment_is_one_line_before_anything_runs(monkeypatch, capsys, env,
                                                              message):
    assert start_with_env(monkeypatch, capsys, env) == (2, None, False, f"error: {message}\n")


def test_a_failed_join_is_one_line(monkeypatch):
    from kd_jax.cli import distributed
    from kd_jax.errors import KdError

    def refuse(*args):
        raise RuntimeError("DEADLINE_EXCEEDED: no coordinator\n(a long traceback)")

    monkeypatch.setattr(distributed.jax.distributed, "initialize", refuse)
    with pytest.raises(KdError) as error:
        distributed.initialize("10.0.0.1:1234", 2, 1)
    assert str(error.value) == ("jax.distributed.initialize(10.0.0.1:1234) failed: "
                                "DEADLINE_EXCEEDED: no coordinator")

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

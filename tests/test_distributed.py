"""Two real ``jax.distributed`` processes on localhost (CPU collectives through gloo) train
the same few steps as one process does, and agree with each other."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("parallel_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def result(stdout: str) -> dict:
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    port = str(free_port())
    # Output goes to files, not pipes: an undrained pipe would stall one process mid-collective.
    logs = [(tmp_path / f"out{i}", tmp_path / f"err{i}") for i in range(2)]
    procs = []
    for i, (out, err) in enumerate(logs):
        with out.open("w") as o, err.open("w") as e:
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), "--process-id", str(i), "--num-processes", "2",
                 "--port", port], env=env, stdout=o, stderr=e))
    for p, (_, err) in zip(procs, logs, strict=True):
        assert p.wait(timeout=600) == 0, err.read_text()[-3000:]
    first, second = (result(out.read_text()) for out, _ in logs)
    single = result(subprocess.run(
        [sys.executable, str(WORKER)], capture_output=True, text=True, timeout=600, check=True,
        env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}).stdout)

    assert (first["processes"], first["devices"]) == (2, 2)
    assert (single["processes"], single["devices"]) == (1, 2)
    for kind in ("teacher", "distill", "logits"):
        np.testing.assert_array_equal(first[kind], second[kind])
        np.testing.assert_allclose(first[kind], single[kind], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first["teacher_losses"], single["teacher_losses"], rtol=1e-4)

"""``train_teacher.py`` as two jax.distributed processes: one writes, orbax saves and resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def fake_cifar(folder: Path, per_file: int = 64) -> Path:
    """CIFAR-10's binary layout with random pixels: 1 label byte + 3072 pixel bytes a record."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, (per_file, 3073), np.uint8)
        records[:, 0] %= 10
        records.tofile(folder / name)
    return folder


def run_two_processes(args: list[str], logs: Path,
                      timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Both processes, their output in files (an undrained pipe could stall one of them);
    both are killed if either is still running after ``timeout`` seconds."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    logs.mkdir(exist_ok=True)
    files = [(logs / f"out{i}", logs / f"err{i}") for i in range(2)]
    procs = []
    for i, (out, err) in enumerate(files):
        with out.open("w") as o, err.open("w") as e:
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "train_teacher.py"), *args, "--coordinator-address",
                 f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                cwd=ROOT, env=env, stdout=o, stderr=e))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(p.args, code, out.read_text(), err.read_text())
            for p, code, (out, err) in zip(procs, codes, files, strict=True)]


@pytest.mark.slow
def test_two_process_teacher_run_writes_once_and_resumes(tmp_path):
    data, workdir = fake_cifar(tmp_path / "data"), tmp_path / "run"
    args = ["--data-dir", str(data), "--workdir", str(workdir), "--model", "resnet8",
            "--width", "4", "--batch-size", "32", "--eval-batch-size", "32", "--epochs", "2",
            "--no-progress"]
    first = run_two_processes(args, tmp_path / "first")
    for r in first:
        assert r.returncode == 0, r.stderr[-3000:]
    assert "final test accuracy" in first[0].stdout
    assert "final test accuracy" not in first[1].stdout  # only process 0 reports
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["step"] == 20  # 2 epochs of 320 / 32
    assert (workdir / "checkpoints" / "latest" / "20").is_dir()

    # Both processes restore the finished run's checkpoint and evaluate the same params again.
    second = run_two_processes([*args, "--resume"], tmp_path / "second")
    for r in second:
        assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads((workdir / "summary.json").read_text())
    assert resumed["step"] == 20
    assert resumed["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 2

    # The same command again without --resume: process 0 refuses the workdir, and process 1,
    # which used to wait for it forever, stops too.
    again = run_two_processes(args, tmp_path / "again", timeout=120)
    assert [r.returncode for r in again] == [2, 2]
    assert "already holds a run; resume it (--resume" in again[0].stderr
    assert f"process 0 could not prepare the workdir {workdir}" in again[1].stderr

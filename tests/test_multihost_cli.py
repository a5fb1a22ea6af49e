"""``train_teacher.py`` as two jax.distributed processes: one writes, orbax saves and resumes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _helpers import cli_command, free_port, run_processes, write_cifar_binary


def fake_cifar(folder: Path, per_file: int = 64) -> Path:
    """CIFAR-10's binary layout with random pixels: 1 label byte + 3072 pixel bytes a record."""
    rng = np.random.default_rng(0)  # one stream through the six files, in order

    def noise(n, i):
        records = rng.integers(0, 256, (n, 3073), np.uint8)
        records[:, 0] %= 10
        return records.tobytes()

    return write_cifar_binary(folder, per_file, per_file, records=noise)


def run_two_processes(args: list[str], logs: Path,
                      timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """``train_teacher.py`` as both processes of one job (see :func:`_helpers.run_processes`)."""
    job = [*args, "--coordinator-address", f"localhost:{free_port()}", "--num-processes", "2"]
    runs = [cli_command("train_teacher.py", *job, "--process-id", i, env={"XLA_FLAGS": ""})
            for i in range(2)]
    return run_processes([command for command, _ in runs], logs, runs[0][1], timeout=timeout)


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

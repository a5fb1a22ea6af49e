"""Helpers shared by the reliability tests: tiny synthetic CIFAR-10 folders and CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECORD = 1 + 32 * 32 * 3
BINARY_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)


def cifar_records(n: int, seed: int) -> bytes:
    """``n`` CIFAR-10 binary records with learnable structure: the label sets the mean colour."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = rng.integers(0, 64, (n, 3072)) + labels[:, None] * 19
    return np.concatenate([labels[:, None], pixels.astype(np.uint8)], axis=1).tobytes()


def write_cifar_binary(folder: Path, per_batch: int = 64, test: int = 64) -> Path:
    """A CIFAR-10 binary-layout folder of ``5 * per_batch`` train and ``test`` test images."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(BINARY_FILES):
        (folder / name).write_bytes(cifar_records(test if name == "test_batch.bin" else per_batch,
                                                  seed=i))
    return folder


JOBS = {"train_teacher.py": "teacher", "distill.py": "distill"}


def run_cli(script: str, *args: str, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` (train_teacher.py or distill.py) in a fresh interpreter; with
    ``$KD_JAX_FAULT`` in ``env``, the same job through tests/fault_cli.py, which installs the
    fault hook."""
    command, full_env = _command(script, args, env)
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def start_cli(script: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """:func:`run_cli`, left running: its output in ``communicate()``."""
    command, full_env = _command(script, args, env)
    return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _command(script: str, args: tuple[str, ...], env: dict | None) -> tuple[list[str], dict]:
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    command = [str(REPO / script)]
    if "KD_JAX_FAULT" in full_env:
        command = [str(REPO / "tests" / "fault_cli.py"), JOBS[script]]
    return [sys.executable, *command, *args], full_env


def cache_env(folder: Path) -> dict:
    """Environment for subprocess runs sharing a persistent XLA compilation cache: the first
    run compiles (~15 s here), the rest load the programs (~1 s)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(folder),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


TIMING_FIELDS = {"images_per_second", "epoch_seconds", "eval_seconds"}


def metrics_rows(workdir: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def params_bytes(workdir: Path) -> list[bytes]:
    """Every leaf of the run's last checkpoint (params and batch stats), as raw bytes."""
    import jax

    from kd_jax.core.checkpoint import load_frozen

    return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(load_frozen(workdir).variables)]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path: to assert nothing was changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}

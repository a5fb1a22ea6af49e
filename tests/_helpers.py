"""Helpers shared by the tests (fixtures are in conftest.py): synthetic CIFAR folders, a pickle
that would run code, the CLI scripts run in fresh interpreters, free ports, run files."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kd_jax import Hook

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- synthetic CIFAR
RECORD = 1 + 32 * 32 * 3  # bytes: the label, then the pixels
BINARY_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
Records = Callable[[int, int], bytes]  # (n, i): the n records of file i of BINARY_FILES


def cifar_records(labels: np.ndarray, seed: int) -> bytes:
    """CIFAR binary records whose pixels depend on the label, so a model can learn them."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    base = (labels[:, None].astype(np.int64) * 25 + 10)  # one brightness per class
    pixels = np.clip(base + rng.integers(-20, 21, (n, 3072)), 0, 255).astype(np.uint8)
    return np.concatenate([labels[:, None].astype(np.uint8), pixels], axis=1).tobytes()


def random_cifar_records(n: int, seed: int) -> bytes:
    """``n`` CIFAR-10 binary records with learnable structure: labels drawn from ``seed``, the
    label sets the mean colour. As ``records`` of :func:`write_cifar_binary`, file ``i`` is
    seeded with ``i``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = rng.integers(0, 64, (n, 3072)) + labels[:, None] * 19
    return np.concatenate([labels[:, None], pixels.astype(np.uint8)], axis=1).tobytes()


def write_cifar_binary(folder: Path, per_batch: int = 40, test: int = 40, seed: int = 0,
                       records: Records | None = None) -> Path:
    """A complete binary-layout folder: 5 train batches of ``per_batch`` records and a test
    batch of ``test``. ``records(n, i)`` makes file ``i`` of :data:`BINARY_FILES`; by default
    classes cycle 0..9 and pixels follow the class (:func:`cifar_records`, seeded from
    ``seed``)."""
    if records is None:
        def records(n: int, i: int) -> bytes:
            if i == 5:
                return cifar_records(np.arange(n) % 10, seed + 99)
            return cifar_records((np.arange(n) + i + 1) % 10, seed + i + 1)
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(BINARY_FILES):
        (folder / name).write_bytes(records(test if name == "test_batch.bin" else per_batch, i))
    return folder


def relabelled_copy(folder: Path, dest: Path, shift: int) -> Path:
    """``folder``'s CIFAR-10 binary files in ``dest``, every training label moved by ``shift``
    (mod 10); images and test labels as they were."""
    dest.mkdir()
    for path in folder.iterdir():
        records = np.frombuffer(path.read_bytes(), np.uint8).reshape(-1, RECORD).copy()
        if path.name.startswith("data_batch"):
            records[:, 0] = (records[:, 0] + shift) % 10
        (dest / path.name).write_bytes(records.tobytes())
    return dest


def cifar100_records(fine: np.ndarray, seed: int) -> bytes:
    """CIFAR-100 binary records: the coarse label (``fine // 5``), the fine label, then pixels
    that depend on the fine label as :func:`cifar_records` makes them."""
    records = np.frombuffer(cifar_records(fine % 10, seed), np.uint8).reshape(len(fine), -1)
    labels = np.stack([fine // 5, fine], axis=1).astype(np.uint8)
    return np.concatenate([labels, records[:, 1:]], axis=1).tobytes()


def write_cifar100_binary(folder: Path, train: int = 200, test: int = 40, seed: int = 0) -> Path:
    """A complete ``cifar-100-binary`` folder: train.bin, test.bin and fine_label_names.txt
    (class ``i`` named ``class_i``), fine labels cycling through all 100."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.bin").write_bytes(cifar100_records(np.arange(train) * 3 % 100, seed))
    (folder / "test.bin").write_bytes(cifar100_records(np.arange(test) % 100, seed + 99))
    (folder / "fine_label_names.txt").write_text("".join(f"class_{i}\n" for i in range(100)))
    return folder


class Exploit:
    """Pickles to a call of ``os.system`` that creates ``target``: a safe loader refuses it
    (``refusing to load global posix.system``) and ``target`` never appears."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def finite_differences(f: Callable, x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Central differences of a float64 numpy function: the gradient to check jax.grad with."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (f(up) - f(down)) / (2 * h)
    return grad


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --------------------------------------------------------------------------- processes
JOBS = {"train_teacher.py": "teacher", "distill.py": "distill"}


def cli_command(script: str, *args, env: dict | None = None) -> tuple[list[str], dict]:
    """The command line and environment that run ``script`` (train_teacher.py or distill.py)
    on the CPU in a fresh interpreter; with ``$KD_JAX_FAULT`` in ``env``, the same job through
    tests/fault_cli.py, which installs the fault hook."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    command = [str(REPO / script)]
    if "KD_JAX_FAULT" in full_env:
        command = [str(REPO / "tests" / "fault_cli.py"), JOBS[script]]
    return [sys.executable, *command, *map(str, args)], full_env


def run_cli(script: str, *args, env: dict | None = None, cwd: Path = REPO,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``script`` with ``args`` (paths are fine) as :func:`cli_command` has it; its output
    captured as text."""
    command, full_env = cli_command(script, *args, env=env)
    return subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def start_cli(script: str, *args, env: dict | None = None) -> subprocess.Popen:
    """:func:`run_cli`, left running: its output in ``communicate()``."""
    command, full_env = cli_command(script, *args, env=env)
    return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_processes(commands: Sequence[list[str]], logs: Path, env: dict, cwd: Path = REPO,
                  timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """The commands run side by side (the processes of one ``jax.distributed`` job), their
    output in files under ``logs`` (an undrained pipe could stall one of them mid-collective);
    all are killed if any is still running after ``timeout`` seconds."""
    logs.mkdir(parents=True, exist_ok=True)
    files = [(logs / f"out{i}", logs / f"err{i}") for i in range(len(commands))]
    procs = []
    for command, (out, err) in zip(commands, files, strict=True):
        with out.open("w") as o, err.open("w") as e:
            procs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=o, stderr=e))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(p.args, code, out.read_text(), err.read_text())
            for p, code, (out, err) in zip(procs, codes, files, strict=True)]


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- run files
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


class CrashAfterCheckpoint(Hook):
    """Fails the run once the checkpoint of global step ``step`` has been started."""

    def __init__(self, step: int):
        self.step = step

    def after_save(self, trainer, what):
        if what == "checkpoint" and int(trainer.state.step) == self.step:
            raise RuntimeError("crashed after the checkpoint")

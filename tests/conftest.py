"""Shared fixtures: tiny CIFAR-10 folders written by the tests, and the real data when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("KD_JAX_DATA_DIR", REPO.parent / "shared" / "data"))


def cifar_records(labels: np.ndarray, seed: int) -> bytes:
    """CIFAR binary records whose pixels depend on the label, so a model can learn them."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    base = (labels[:, None].astype(np.int64) * 25 + 10)  # one brightness per class
    pixels = np.clip(base + rng.integers(-20, 21, (n, 3072)), 0, 255).astype(np.uint8)
    return np.concatenate([labels[:, None].astype(np.uint8), pixels], axis=1).tobytes()


def write_cifar_binary(folder: Path, per_batch: int = 40, test: int = 40, seed: int = 0) -> Path:
    """A complete binary-layout folder: 5 train batches and a test batch, classes cycling 0..9."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        labels = (np.arange(per_batch) + i) % 10
        (folder / f"data_batch_{i}.bin").write_bytes(cifar_records(labels, seed + i))
    (folder / "test_batch.bin").write_bytes(cifar_records(np.arange(test) % 10, seed + 99))
    return folder


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> Path:
    return write_cifar_binary(tmp_path / "cifar")


@pytest.fixture
def real_cifar() -> Path:
    folder = REAL_DATA / "cifar-10-batches-bin"
    if not (folder / "test_batch.bin").is_file():
        pytest.skip(f"real CIFAR-10 not found at {folder} (set KD_JAX_DATA_DIR)")
    return folder


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


@pytest.fixture
def tiny_cifar100(tmp_path: Path) -> Path:
    return write_cifar100_binary(tmp_path / "cifar-100-binary")

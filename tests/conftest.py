"""Shared fixtures: tiny CIFAR folders written by the tests (tests/_helpers.py writes them), and
the real data when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _helpers import REPO, write_cifar100_binary, write_cifar_binary

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REAL_DATA = Path(os.environ.get("KD_JAX_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> Path:
    return write_cifar_binary(tmp_path / "cifar")


@pytest.fixture
def real_cifar() -> Path:
    folder = REAL_DATA / "cifar-10-batches-bin"
    if not (folder / "test_batch.bin").is_file():
        pytest.skip(f"real CIFAR-10 not found at {folder} (set KD_JAX_DATA_DIR)")
    return folder


@pytest.fixture
def tiny_cifar100(tmp_path: Path) -> Path:
    return write_cifar100_binary(tmp_path / "cifar-100-binary")

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


# The files that take longest on 2 cores (measured with --durations), first: pytest-xdist hands
# whole files (--dist loadfile) to whichever worker is free, so starting with the longest keeps
# one worker from finishing a long file alone at the end.
LONGEST_FIRST = ("test_reliability.py", "test_cli.py", "test_distributed.py", "test_parallel.py",
                 "test_multihost_cli.py", "test_train.py", "test_export.py", "test_bfloat16.py",
                 "test_features.py", "test_models.py", "test_api.py", "test_mnist.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

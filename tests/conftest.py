"""Shared fixtures: tiny CIFAR folders written by the tests (tests/_helpers.py writes them), and
the real data when present."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest
from _helpers import REPO, write_cifar100_binary, write_cifar_binary

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def share_compilations() -> Path | None:
    """One persistent XLA compilation cache for the whole run, or None where the caller set one.

    Much of the suite's time is XLA:CPU compiling the same small programs again: in another
    test's closure, another xdist worker, or a fresh interpreter (CLI runs, the multi-process
    workers); a ResNet's jitted initialiser alone takes ~12 s to compile here. The process that
    loads this file first (xdist's controller, or the only one) makes the folder; the variables
    carry it to the workers and every subprocess, and ``jax.config`` to this process, whose jax
    is already imported. Programs compile the same either way: only the time changes.
    """
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return None
    folder = tempfile.mkdtemp(prefix="kd-jax-xla-")
    settings = {"jax_compilation_cache_dir": folder,
                "jax_persistent_cache_min_compile_time_secs": 0.0,  # every program, however
                "jax_persistent_cache_min_entry_size_bytes": 0}     # quick or small
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
        jax.config.update(name, value)
    return Path(folder)


XLA_CACHE = share_compilations()


def pytest_unconfigure(config):
    if XLA_CACHE is not None:
        shutil.rmtree(XLA_CACHE, ignore_errors=True)


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

"""Fuzzing: random bytes and truncations thrown at every file loader a user can point us at.

Each case must either load or raise ``KdError``; any other exception is a bug. To fuzz a new
loader, add one line to ``LOADERS``: a name, the file name it reads, a valid file's bytes, and
a function from a path to the loaded value.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from _helpers import random_cifar_records
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kd_jax.cli.config import TeacherConfig, load_yaml
from kd_jax.core import data
from kd_jax.errors import KdError

_PYTHON_BATCH = pickle.dumps({b"batch_label": b"x", b"labels": [1, 7, 3],
                              b"data": np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072)},
                             protocol=2)
_PYTHON_100 = pickle.dumps({b"fine_labels": [99, 7, 3], b"coarse_labels": [19, 1, 0],
                            b"data": np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072)},
                           protocol=2)
_BINARY_100 = (np.concatenate([np.array([[19, 99], [1, 7], [0, 3]], np.uint8),
                               np.zeros((3, 3072), np.uint8)], axis=1).tobytes())
_IDX_IMAGES = bytes([0, 0, 8, 3]) + np.array([2, 28, 28], ">u4").tobytes() + bytes(range(256)) * 6 \
    + bytes(32)
_IDX_LABELS = bytes([0, 0, 8, 1]) + np.array([3], ">u4").tobytes() + bytes([4, 0, 9])
_YAML = b"epochs: 3\nbatch_size: 64\nlearning_rate: 0.1\nflip: true\nworkdir: runs/x\n"

# name -> (file name, valid bytes, loader(path))
LOADERS = {
    "cifar-binary": ("data_batch_1.bin", random_cifar_records(3, seed=0), data.read_binary_batch),
    "cifar-python": ("data_batch_1", _PYTHON_BATCH, data.read_python_batch),
    "cifar100-binary": ("train.bin", _BINARY_100,
                        lambda path: data.read_binary_batch(path, data.CIFAR100)),
    "cifar100-python": ("train", _PYTHON_100,
                        lambda path: data.read_python_batch(path, data.CIFAR100)),
    "mnist-images": ("train-images-idx3-ubyte", _IDX_IMAGES, lambda path: data.read_idx(path, 3)),
    "mnist-labels": ("train-labels-idx1-ubyte", _IDX_LABELS, lambda path: data.read_idx(path, 1)),
    "yaml-config": ("config.yaml", _YAML, lambda path: load_yaml(path, TeacherConfig)),
}

FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def load_or_kderror(name: str, content: bytes) -> None:
    filename, _, load = LOADERS[name]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / filename
        path.write_bytes(content)
        try:
            load(path)
        except KdError as e:
            assert "\n" not in str(e)


@pytest.mark.parametrize("name", LOADERS)
def test_valid_file_loads(name):
    filename, content, load = LOADERS[name]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / filename
        path.write_bytes(content)
        assert load(path) is not None


@pytest.mark.parametrize("name", LOADERS)
@FUZZ
@given(blob=st.binary(max_size=4096))
@example(blob=b"P")  # pickle's persistent-id error message spans two lines
def test_random_bytes(name, blob):
    load_or_kderror(name, blob)


@pytest.mark.parametrize("name", LOADERS)
@FUZZ
@given(cut=st.floats(0, 1))
def test_truncations(name, cut):
    content = LOADERS[name][1]
    load_or_kderror(name, content[: int(cut * len(content))])


@pytest.mark.parametrize("name", LOADERS)
@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=8))
def test_corrupted_bytes(name, flips):
    content = bytearray(LOADERS[name][1])
    for where, value in flips:
        content[int(where * len(content))] = value
    load_or_kderror(name, bytes(content))

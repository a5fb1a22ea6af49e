"""CIFAR-100 from files the tests write: both layouts, every malformed-file error, the download.

There is no CIFAR-100 copy on the development machines, so every path is exercised on small
files in the official formats: binary records of a coarse and a fine label byte then 3072
pixels (``cifar-100-binary``), and the python layout's pickled dicts (``cifar-100-python``).
"""

from __future__ import annotations

import dataclasses
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from _helpers import Exploit, write_cifar100_binary, write_cifar_binary
from test_data import serve_archive, url_info

from kd_jax.core import data
from kd_jax.errors import KdError

RECORD = 2 + 3072


def test_binary_round_trip(tiny_cifar100):
    ds = data.load_cifar100(tiny_cifar100)
    assert ds.name == "cifar100" and ds.num_classes == 100
    assert ds.train_images.shape == (200, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (40, 32, 32, 3) and ds.test_labels.dtype == np.int32
    raw = np.frombuffer((tiny_cifar100 / "train.bin").read_bytes(), np.uint8).reshape(-1, RECORD)
    np.testing.assert_array_equal(ds.train_labels, raw[:, 1])  # the fine label, not the coarse
    assert not np.array_equal(ds.train_labels, raw[:, 0])
    # Record layout after the two label bytes: 1024 red, then green, then blue, row-major.
    np.testing.assert_array_equal(ds.train_images[7, 0, :, 0], raw[7, 2:34])
    np.testing.assert_array_equal(ds.train_images[7, 1, 0, 2], raw[7, 2 + 2048 + 32])
    assert ds.class_names[:2] == ("class_0", "class_1") and len(ds.class_names) == 100
    assert (ds.mean, ds.std) == (data.CIFAR100_MEAN, data.CIFAR100_STD)


def test_official_class_names_without_a_names_file(tiny_cifar100):
    (tiny_cifar100 / "fine_label_names.txt").unlink()
    names = data.load_cifar100(tiny_cifar100).class_names
    assert len(names) == len(set(names)) == 100
    assert names[:3] == ("apple", "aquarium_fish", "baby") and names[-1] == "worm"


def test_binary_folder_found_under_the_data_dir_and_by_load_dataset(tiny_cifar100, monkeypatch):
    monkeypatch.setenv("KD_JAX_DATA_DIR", str(tiny_cifar100.parent))
    assert len(data.load_dataset("cifar100").train_labels) == 200
    assert data.load_dataset("cifar100", tiny_cifar100.parent).num_classes == 100


def write_python_layout(folder: Path, damage=lambda name, batch: batch) -> Path:
    """The python layout of the binary folder's data; ``damage(name, dict)`` may alter a file."""
    source = data.load_cifar100(write_cifar100_binary(folder.parent / "cifar-100-binary"))
    folder.mkdir()
    for name, images, labels in (("train", source.train_images, source.train_labels),
                                 ("test", source.test_images, source.test_labels)):
        batch = {b"filenames": [b"x.png"] * len(labels), b"batch_label": name.encode(),
                 b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(),
                 b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1)}
        (folder / name).write_bytes(pickle.dumps(damage(name, batch), protocol=2))
    meta = {b"fine_label_names": [f"python_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(damage("meta", meta), protocol=2))
    return folder


def test_python_layout_round_trip(tmp_path):
    folder = write_python_layout(tmp_path / "cifar-100-python")
    expected = data.load_cifar100(tmp_path / "cifar-100-binary")
    # Both layouts sit under tmp_path; the binary one is found first, so name the folder.
    got = data.load_cifar100(folder)
    np.testing.assert_array_equal(got.train_images, expected.train_images)
    np.testing.assert_array_equal(got.train_labels, expected.train_labels)
    np.testing.assert_array_equal(got.test_images, expected.test_images)
    assert got.class_names[:2] == ("python_0", "python_1") and got.name == "cifar100"
    (folder.parent / "cifar-100-binary" / "train.bin").unlink()
    (folder.parent / "cifar-100-binary" / "test.bin").unlink()
    assert len(data.load_cifar100(tmp_path).train_labels) == 200  # found as root/cifar-100-python


def test_folder_without_cifar100_is_refused(tiny_cifar):
    with pytest.raises(KdError) as error:
        data.load_cifar100(tiny_cifar)  # a CIFAR-10 folder
    assert str(error.value) == (f"{tiny_cifar}: no CIFAR-100 here (expected train.bin and "
                                "test.bin, or the cifar-100-python files)")


def _with_byte(path: Path, offset: int, value: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] = value
    path.write_bytes(bytes(raw))


def _sparse(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)  # no need to write 150 MB


@pytest.mark.parametrize(("name", "damage", "message"), [
    ("train.bin", lambda p: p.unlink(), "{p}: file not found"),
    ("test.bin", lambda p: p.unlink(), "{p}: file not found"),
    ("train.bin", lambda p: p.write_bytes(b""),
     "{p}: size 0 bytes is not a positive multiple of 3074 (truncated or not a CIFAR-100 binary "
     "batch)"),
    ("test.bin", lambda p: p.write_bytes(p.read_bytes()[:-10]),
     "{p}: size 122950 bytes is not a positive multiple of 3074 (truncated or not a CIFAR-100 "
     "binary batch)"),
    ("train.bin", lambda p: _with_byte(p, 1, 100), "{p}: fine label 100 at record 0 is outside "
                                                   "0..99"),
    ("train.bin", lambda p: _with_byte(p, 2 * RECORD, 20),
     "{p}: coarse label 20 at record 2 is outside 0..19"),
    ("test.bin", lambda p: _sparse(p, RECORD * 50_001),
     "{p}: 153703074 bytes is more than a CIFAR-100 batch file holds (at most 153700000); not a "
     "CIFAR-100 batch"),
    ("fine_label_names.txt", lambda p: p.write_text("a\nb\n"),
     "{p}: expected 100 class names, found 2"),
])
def test_malformed_binary_files_name_the_file(tiny_cifar100, name, damage, message):
    path = tiny_cifar100 / name
    damage(path)
    with pytest.raises(KdError) as error:
        data.load_cifar100(tiny_cifar100)
    assert str(error.value) == message.format(p=path)


def _set(key, value):
    return lambda batch: {**batch, key: value}


def _without(key):
    return lambda batch: {k: v for k, v in batch.items() if k != key}


@pytest.mark.parametrize(("name", "damage", "message"), [
    ("train", _set(b"fine_labels", [1, 2, 3]), "{p}: 3 fine_labels for 200 images"),
    ("test", _without(b"fine_labels"), "{p}: 'fine_labels' must be a list of integers"),
    ("train", _set(b"coarse_labels", "many"), "{p}: 'coarse_labels' must be a list of integers"),
    ("train", _set(b"coarse_labels", [0, 25] + [0] * 198),
     "{p}: coarse label 25 at record 1 is outside 0..19"),
    ("test", _set(b"fine_labels", [-1] + [0] * 39), "{p}: fine label -1 at record 0 is outside "
                                                    "0..99"),
    ("train", _set(b"data", np.zeros((200, 3072), np.int64)),
     "{p}: 'data' must be a uint8 array of shape [N, 3072], 0 < N <= 50000"),
    ("test", lambda batch: list(batch), "{p}: expected a dict, found list"),
    ("meta", _set(b"fine_label_names", [b"a"] * 99),
     "{p}: expected 100 class names under 'fine_label_names'"),
    ("meta", lambda batch: "names", "{p}: expected a dict, found str"),
])
def test_malformed_python_files_name_the_file(tmp_path, name, damage, message):
    folder = write_python_layout(tmp_path / "cifar-100-python",
                                 lambda file, batch: damage(batch) if file == name else batch)
    with pytest.raises(KdError) as error:
        data.load_cifar100(folder)
    assert str(error.value) == message.format(p=folder / name)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    target = tmp_path / "pwned"
    folder = write_python_layout(tmp_path / "cifar-100-python",
                                 lambda file, batch: Exploit(target) if file == "train" else batch)
    with pytest.raises(KdError) as error:
        data.load_cifar100(folder)
    assert str(error.value) == (f"{folder / 'train'}: not a safe CIFAR-100 python batch "
                                "(UnpicklingError: refusing to load global posix.system)")
    assert not target.exists()


def test_oversized_pickle_is_refused_before_reading(tmp_path):
    folder = write_python_layout(tmp_path / "cifar-100-python")
    _sparse(folder / "test", 2 * 50_000 * RECORD + 1)
    with pytest.raises(KdError) as error:
        data.load_cifar100(folder)
    assert str(error.value) == (f"{folder / 'test'}: 307400001 bytes is more than a CIFAR-100 "
                                "batch file holds (at most 307400000); not a CIFAR-100 batch")


# --------------------------------------------------------------------------- download
@pytest.fixture
def archive(tmp_path):
    """A fake CIFAR-100 archive (cifar-100-binary/ inside, as the official one), served."""
    folder = write_cifar100_binary(tmp_path / "src" / "cifar-100-binary")
    url, payload, server = serve_archive(tmp_path, folder, "cifar-100-binary.tar.gz")
    yield url, payload
    server.shutdown()


def info(payload: bytes, checksum: str | None = None):
    return url_info(payload, checksum, "cifar-100-binary.tar.gz")


def test_download_goes_through_tfds_and_is_cached(tmp_path, archive):
    url, payload = archive
    folder = data.download_cifar(data.CIFAR100, tmp_path / "cache", url, {url: info(payload)})
    assert folder == tmp_path / "cache" / "kd_jax" / "cifar-100-binary"
    ds = data.load_binary_folder(folder, data.CIFAR100)
    assert len(ds.train_labels) == 200 and ds.num_classes == 100
    # The second call is offline: a URL nothing serves would fail if it were fetched.
    assert data.download_cifar(data.CIFAR100, tmp_path / "cache", "http://127.0.0.1:9/none",
                               {}) == folder


def test_load_without_data_dir_uses_the_download(tmp_path, archive, monkeypatch):
    """No --data-dir: the official URL, through the registered checksum (both stood in for)."""
    url, payload = archive
    monkeypatch.delenv("KD_JAX_DATA_DIR", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setattr(data, "CIFAR100", dataclasses.replace(data.CIFAR100, url=url))
    monkeypatch.setattr(data, "registered_url_infos",
                        lambda layout: {url: info(payload)} if layout.url == url else {})
    ds = data.load_cifar100()
    assert len(ds.train_labels) == 200 and ds.name == "cifar100"


def test_download_with_wrong_checksum_is_refused(tmp_path, archive):
    url, payload = archive
    with pytest.raises(KdError, match=r"^could not download CIFAR-100 \(NonMatchingChecksumError"):
        data.download_cifar(data.CIFAR100, tmp_path / "cache", url,
                            {url: info(payload, "0" * 64)})
    assert not (tmp_path / "cache" / "kd_jax" / "cifar-100-binary").exists()


def test_archive_without_the_test_file_is_refused(tmp_path):
    wrong = write_cifar_binary(tmp_path / "src" / "cifar-100-binary")  # CIFAR-10 files inside
    url, payload, server = serve_archive(tmp_path, wrong, "cifar-100-binary.tar.gz")
    try:
        with pytest.raises(KdError) as error:
            data.download_cifar(data.CIFAR100, tmp_path / "cache", url, {url: info(payload)})
    finally:
        server.shutdown()
    archive = next((tmp_path / "cache" / "downloads").glob("*cifar-100-binary*.tar.gz"))
    assert str(error.value) == f"{archive}: the archive holds no cifar-100-binary/test.bin"
    assert tarfile.is_tarfile(archive)


def test_official_archive_checksum_comes_from_tfds():
    registered = data.registered_url_infos(data.CIFAR100)[data.CIFAR100_URL]
    assert data.CIFAR100_URL == "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
    assert registered.checksum == ("58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40"
                                   "d8ec")
    assert registered.size == 168513733

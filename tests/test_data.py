import functools
import hashlib
import http.server
import io
import pickle
import re
import tarfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import Exploit, cifar_records, write_cifar_binary

from kd_jax.core import augment, data
from kd_jax.errors import KdError


def test_binary_round_trip(tiny_cifar):
    ds = data.load_cifar10(tiny_cifar)
    assert ds.train_images.shape == (200, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (40, 32, 32, 3) and ds.num_classes == 10
    raw = np.frombuffer((tiny_cifar / "data_batch_2.bin").read_bytes(), np.uint8).reshape(-1, 3073)
    np.testing.assert_array_equal(ds.train_labels[40:80], raw[:, 0])
    # Record layout: 1024 red, then green, then blue, each row-major.
    np.testing.assert_array_equal(ds.train_images[40, 0, :, 0], raw[0, 1:33])
    np.testing.assert_array_equal(ds.train_images[40, 1, 0, 2], raw[0, 1 + 2048 + 32])


def test_env_var_and_parent_folder_are_found(tiny_cifar, monkeypatch):
    monkeypatch.setenv("KD_JAX_DATA_DIR", str(tiny_cifar.parent))
    (tiny_cifar.parent / "cifar-10-batches-bin").symlink_to(tiny_cifar)
    assert len(data.load_cifar10().train_labels) == 200


def write_python_layout(folder: Path, obj_for=lambda i, d: d) -> Path:
    folder.mkdir()
    ds = data.load_cifar10(write_cifar_binary(folder.parent / "bin"))
    chunks = np.split(ds.train_images, 5) + [ds.test_images]
    labels = np.split(ds.train_labels, 5) + [ds.test_labels]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, (name, im, lb) in enumerate(zip(names, chunks, labels, strict=True)):
        batch = {b"data": im.transpose(0, 3, 1, 2).reshape(len(im), -1), b"labels": lb.tolist()}
        (folder / name).write_bytes(pickle.dumps(obj_for(i, batch), protocol=2))
    return folder


def test_python_layout_round_trip(tmp_path):
    folder = write_python_layout(tmp_path / "cifar-10-batches-py")
    expected = data.load_cifar10(tmp_path / "bin")
    got = data.load_cifar10(tmp_path)
    np.testing.assert_array_equal(got.train_images, expected.train_images)
    np.testing.assert_array_equal(got.test_labels, expected.test_labels)
    assert folder.exists()


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    write_python_layout(tmp_path / "py", lambda i, d: Exploit(marker) if i == 0 else d)
    with pytest.raises(KdError, match=r"data_batch_1: not a safe CIFAR-10 python batch "
                                      r"\(UnpicklingError: refusing to load global posix.system\)"):
        data.load_cifar10(tmp_path / "py")
    assert not marker.exists()


@pytest.mark.parametrize(("damage", "message"), [
    (lambda p: p.unlink(), "data_batch_3.bin: file not found"),
    (lambda p: p.write_bytes(b""), "data_batch_3.bin: size 0 bytes is not a positive multiple of "
                                   "3073 (truncated or not a CIFAR-10 binary batch)"),
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), "data_batch_3.bin: size 122910 bytes is not"),
    (lambda p: p.write_bytes(b"\x0b" + p.read_bytes()[1:]),
     "data_batch_3.bin: label 11 at record 0 is outside 0..9"),
])
def test_malformed_binary_files_name_the_file(tiny_cifar, damage, message):
    damage(tiny_cifar / "data_batch_3.bin")
    with pytest.raises(KdError, match=message.replace("(", r"\(").replace(")", r"\)")):
        data.load_cifar10(tiny_cifar)


def test_folder_without_cifar_is_refused(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\0" * 16)
    with pytest.raises(KdError, match="no CIFAR-10 here"):
        data.load_cifar10(tmp_path)


def test_train_subset_takes_the_first_images(tiny_cifar):
    ds = data.load_cifar10(tiny_cifar)
    sub = ds.take_train(50)
    np.testing.assert_array_equal(sub.train_images, ds.train_images[:50])
    with pytest.raises(KdError, match=r"--train-subset must be in \[1, 200\], got 0"):
        ds.take_train(0)


def serve_archive(tmp_path: Path, folder: Path, name: str):
    """``folder`` as a .tar.gz served over HTTP on 127.0.0.1, as the official archives are over
    the web: (url, archive bytes, the server to shut down)."""
    served = tmp_path / "served"
    served.mkdir(exist_ok=True)
    archive = served / name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=served)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/{name}", archive.read_bytes(), server


@pytest.fixture
def archive_server(tmp_path):
    """A CIFAR-10 archive served locally."""
    folder = write_cifar_binary(tmp_path / "src" / "cifar-10-batches-bin")
    url, payload, server = serve_archive(tmp_path, folder, "cifar-10-binary.tar.gz")
    yield url, payload
    server.shutdown()


def url_info(payload: bytes, checksum: str | None = None, name: str = "cifar-10-binary.tar.gz"):
    from tensorflow_datasets.core.download import checksums

    return checksums.UrlInfo(size=len(payload), filename=name,
                             checksum=checksum or hashlib.sha256(payload).hexdigest())


def test_download_goes_through_tfds_and_is_cached(tmp_path, archive_server):
    url, payload = archive_server
    folder = data.download_cifar(data.CIFAR10, tmp_path / "cache", url, {url: url_info(payload)})
    assert len(data.load_binary_folder(folder).train_labels) == 200
    # The second call is offline: a URL nothing serves would fail if it were fetched.
    assert data.download_cifar(data.CIFAR10, tmp_path / "cache", "http://127.0.0.1:9/none",
                               {}) == folder


def test_download_with_wrong_checksum_is_refused(tmp_path, archive_server):
    url, payload = archive_server
    with pytest.raises(KdError, match=r"^could not download CIFAR-10 \(NonMatchingChecksumError"):
        data.download_cifar(data.CIFAR10, tmp_path / "cache", url,
                            {url: url_info(payload, "0" * 64)})
    assert not (tmp_path / "cache" / "kd_jax" / "cifar-10-batches-bin").exists()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/cifar.tar.gz",  # nothing listens there
                                 "https://no-such-host.invalid/cifar.tar.gz"])
def test_an_unreachable_host_is_one_line_within_seconds(tmp_path, url):
    """Offline, tfds' manager retried for minutes before its error: refuse before it starts."""
    start = time.perf_counter()
    with pytest.raises(KdError) as error:
        data.download_cifar(data.CIFAR10, tmp_path / "cache", url, {})
    assert time.perf_counter() - start < 2 * data.REACH_SECONDS
    host = url.split("/")[2].split(":")[0]
    assert re.fullmatch(rf"cannot reach {re.escape(host)}:(9|443) to download the data \(.+; no "
                        r"network\?\): pass --data-dir or set KD_JAX_DATA_DIR to a local copy",
                        str(error.value)), str(error.value)
    assert not (tmp_path / "cache").exists()


def test_official_archive_checksum_comes_from_tfds():
    info = data.registered_url_infos()[data.CIFAR10_URL]
    assert info.checksum == "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
    assert info.size == 170052171


def test_augmentation_keeps_shape_dtype_and_is_deterministic_per_key():
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)), jnp.uint8)
    crop_and_flip = augment.Augmentation(4, True, (0.5,) * 3, (0.25,) * 3).augment
    a = crop_and_flip(jax.random.key(1), images)
    b = crop_and_flip(jax.random.key(1), images)
    c = crop_and_flip(jax.random.key(2), images)
    assert a.shape == images.shape and a.dtype == jnp.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("pad", [2, 4])
def test_random_crop_moves_pixels_by_at_most_pad(pad):
    images = np.zeros((64, 32, 32, 1), np.uint8)
    images[:, 16, 16, 0] = 255
    moved = np.asarray(augment.random_crop(jax.random.key(0), jnp.asarray(images), pad))
    rows, cols = np.nonzero(moved[..., 0] == 255)[1:]
    assert len(rows) == 64
    assert np.abs(rows - 16).max() == pad and np.abs(cols - 16).max() == pad


def test_flip_mirrors_left_right():
    images = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.uint8).reshape(2, 4, 4, 1)
    flipped = np.asarray(augment.random_flip(jax.random.key(0), jnp.tile(images, (32, 1, 1, 1))))
    assert any(np.array_equal(f, np.asarray(images[i % 2])[:, ::-1]) for i, f in enumerate(flipped))
    assert all(np.array_equal(f, np.asarray(images[i % 2]))
               or np.array_equal(f, np.asarray(images[i % 2])[:, ::-1])
               for i, f in enumerate(flipped))


def test_real_cifar10_matches_its_readme(real_cifar):
    ds = data.load_cifar10(real_cifar)
    assert ds.train_images.shape == (50000, 32, 32, 3) and len(ds.test_labels) == 10000
    assert np.bincount(ds.train_labels).tolist() == [5000] * 10
    assert ds.train_images[0, 0, :6, 0].tolist() == [59, 43, 50, 68, 98, 119]


def test_records_helper_is_valid():
    raw = cifar_records(np.arange(3), 0)
    assert len(raw) == 3 * 3073 and io.BytesIO(raw).read(1) == b"\x00"


def flipped_or_not(out: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Which of ``out`` are the left-right mirrors of ``images``; every other one must be the
    image itself, pixel for pixel."""
    mirrored = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, images, strict=True)])
    assert not np.any(mirrored & kept)  # no image here is its own mirror
    assert np.all(mirrored | kept)
    return mirrored


def test_random_flip_mirrors_about_half_exactly():
    """1000 distinct images through the training pipeline's flip (crop off): each comes back as
    itself or as its exact left-right mirror, about half of them mirrored (binomial: 500 +- 16),
    and another key mirrors others."""
    images = np.random.default_rng(0).integers(0, 256, (1000, 8, 8, 3), np.uint8)
    flip = augment.Augmentation(0, True, (0.5,) * 3, (0.25,) * 3).augment
    first = flipped_or_not(np.asarray(flip(jax.random.key(0), jnp.asarray(images))), images)
    second = flipped_or_not(np.asarray(flip(jax.random.key(1), jnp.asarray(images))), images)
    assert 420 <= first.sum() <= 580 and 420 <= second.sum() <= 580
    assert 0.4 < np.mean(first == second) < 0.6  # independent coins per key
    unflipped = augment.Augmentation(0, False, (0.5,) * 3, (0.25,) * 3).augment
    assert not flipped_or_not(np.asarray(unflipped(jax.random.key(0), jnp.asarray(images))),
                              images).any()


def test_alternating_flips_mirror_half_and_each_image_once_in_two_epochs():
    """airbench's flips: about half the images mirrored in an epoch, exactly the others in the
    next, the same choice again two epochs later."""
    images = np.random.default_rng(1).integers(0, 256, (1000, 8, 8, 3), np.uint8)
    indices, key = jnp.arange(1000), jax.random.key(5)
    flip = augment.Augmentation(0, True, (0.5,) * 3, (0.25,) * 3, alternating_flip=True).augment
    epochs = [flipped_or_not(np.asarray(flip(jax.random.key(e), jnp.asarray(images), indices,
                                             jnp.int32(e), key)), images) for e in range(3)]
    assert 420 <= epochs[0].sum() <= 580
    np.testing.assert_array_equal(epochs[1], ~epochs[0])
    np.testing.assert_array_equal(epochs[2], epochs[0])

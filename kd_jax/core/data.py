"""CIFAR-10 and MNIST sources -> validated uint8 arrays.

Sources, in order: a local folder (``--data-dir`` or ``$KD_JAX_DATA_DIR``) in the standard
*binary* layout (``data_batch_{1..5}.bin``, ``test_batch.bin``) or *python* layout
(``cifar-10-batches-py``); else the official archive fetched once by tensorflow-datasets'
download manager, checked against the checksum tfds registers for it, and cached.

MNIST is read from a local folder holding the four official IDX files (plain or ``.gz``).

Everything returned is host numpy (uint8 NHWC images, int32 labels); the training loop puts it
on the device once (augmentation: :mod:`kd_jax.core.augment`).
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_jax.errors import KdError

DATA_DIR_ENV = "KD_JAX_DATA_DIR"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the official CIFAR-10 training set (fraction of 255).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
MNIST_CLASSES = tuple(str(d) for d in range(10))
# Statistics of the official MNIST training set (fraction of 255).
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
_RECORD_BYTES = 1 + 32 * 32 * 3
# An official batch file holds 10,000 images; refusing bigger files before reading them keeps
# a wrong path (a disk image, a video) from being pulled into memory.
_MAX_RECORDS = 10_000
_MAX_PICKLE_BYTES = 2 * _MAX_RECORDS * _RECORD_BYTES
_BINARY_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_PYTHON_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


@dataclass(frozen=True)
class Dataset:
    """A labelled image-classification dataset held in host memory."""

    name: str
    train_images: np.ndarray  # uint8 [N, H, W, C]
    train_labels: np.ndarray  # int32 [N]
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_images.shape[1:])

    def take_train(self, n: int | None) -> Dataset:
        """The first ``n`` training images (all when ``n`` is None), for quick runs."""
        if n is None:
            return self
        if not 1 <= n <= len(self.train_labels):
            raise KdError(f"--train-subset must be in [1, {len(self.train_labels)}], got {n}")
        return Dataset(self.name, self.train_images[:n], self.train_labels[:n], self.test_images,
                       self.test_labels, self.class_names, self.mean, self.std)

    def hold_out(self, validation: int) -> tuple[tuple[np.ndarray, np.ndarray],
                                                 tuple[np.ndarray, np.ndarray]]:
        """(images, labels) a run fits, and the last ``validation`` training images it holds out
        to choose settings on; one place, so a run's export calibrates on what it fitted."""
        num_train = len(self.train_labels) - validation
        if num_train < 1:
            raise KdError(f"validation {validation} leaves no training images")
        return ((self.train_images[:num_train], self.train_labels[:num_train]),
                (self.train_images[num_train:], self.train_labels[num_train:]))


# --------------------------------------------------------------------------- binary layout
def read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 ``.bin`` file: records of 1 label byte + 3072 pixel bytes (CHW)."""
    _check_size(path, _MAX_RECORDS * _RECORD_BYTES)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _RECORD_BYTES:
        raise KdError(f"{path}: size {raw.size} bytes is not a positive multiple of "
                      f"{_RECORD_BYTES} (truncated or not a CIFAR-10 binary batch)")
    records = raw.reshape(-1, _RECORD_BYTES)
    labels = records[:, 0].astype(np.int32)
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), _checked_labels(labels, path)


def _check_size(path: Path, limit: int) -> None:
    """Refuse a missing file, or one larger than any CIFAR-10 batch, before reading it."""
    if not path.is_file():
        raise KdError(f"{path}: file not found")
    size = path.stat().st_size
    if size > limit:
        raise KdError(f"{path}: {size} bytes is more than a CIFAR-10 batch file holds "
                      f"(at most {limit}); not a CIFAR-10 batch")


def _checked_labels(labels: np.ndarray, path: Path, num_classes: int = 10) -> np.ndarray:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise KdError(f"{path}: label {int(labels[i])} at record {i} is outside "
                      f"0..{num_classes - 1}")
    return labels


def _read_class_names(folder: Path, filename: str) -> tuple[str, ...]:
    path = folder / filename
    if not path.is_file():
        return CIFAR10_CLASSES
    names = tuple(line.strip() for line in path.read_text(errors="replace").splitlines()
                  if line.strip())
    if len(names) != 10:
        raise KdError(f"{path}: expected 10 class names, found {len(names)}")
    return names


def load_binary_folder(folder: Path) -> Dataset:
    """Load the standard binary layout (``cifar-10-batches-bin``)."""
    train = [read_binary_batch(folder / name) for name in _BINARY_TRAIN]
    test_images, test_labels = read_binary_batch(folder / "test_batch.bin")
    return _cifar10(train, test_images, test_labels, _read_class_names(folder, "batches.meta.txt"))


# --------------------------------------------------------------------------- python layout
class _RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers, strings, numbers and numpy arrays; refuses every other global.

    A pickle can name any importable callable and have it run at load time; the CIFAR python
    batches only ever need numpy's array reconstruction, so nothing else is resolved.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
        # protocol 5 pickles of arrays: an array over raw bytes (never of Python objects)
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _latin1_encode(text: str, encoding: str) -> bytes:
    """What Python 3 protocol-2 pickles of numpy arrays call to rebuild their raw bytes
    (``_codecs.encode(text, "latin1")``); any other codec is refused."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def safe_unpickle(path: Path) -> object:
    """Unpickle ``path`` with :class:`_RestrictedUnpickler`; any failure becomes a ``KdError``."""
    _check_size(path, _MAX_PICKLE_BYTES)
    try:
        return _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can raise nearly anything
        reason = " ".join(str(e).split())  # some of pickle's messages span two lines
        raise KdError(f"{path}: not a safe CIFAR-10 python batch "
                      f"({type(e).__name__}: {reason})") from None


def read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one python-layout batch: a dict with ``data`` [N, 3072] uint8 and ``labels``."""
    batch = safe_unpickle(path)
    if not isinstance(batch, dict):
        raise KdError(f"{path}: expected a dict, found {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3072 or not 0 < data.shape[0] <= _MAX_RECORDS:
        raise KdError(f"{path}: 'data' must be a uint8 array of shape [N, 3072], "
                      f"0 < N <= {_MAX_RECORDS}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise KdError(f"{path}: 'labels' must be a list of integers") from None
    if labels.shape != (data.shape[0],):
        raise KdError(f"{path}: {labels.size} labels for {data.shape[0]} images")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), _checked_labels(labels.astype(np.int32), path)


def load_python_folder(folder: Path) -> Dataset:
    """Load the python layout (``cifar-10-batches-py``) without executing anything in it."""
    train = [read_python_batch(folder / name) for name in _PYTHON_TRAIN]
    test_images, test_labels = read_python_batch(folder / "test_batch")
    names = CIFAR10_CLASSES
    if (folder / "batches.meta").is_file():
        meta = safe_unpickle(folder / "batches.meta")
        raw = meta.get(b"label_names") if isinstance(meta, dict) else None
        if isinstance(raw, list) and len(raw) == 10:
            names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in raw)
    return _cifar10(train, test_images, test_labels, names)


def _cifar10(train, test_images, test_labels, class_names) -> Dataset:
    return Dataset("cifar10", np.concatenate([im for im, _ in train]),
                   np.concatenate([lb for _, lb in train]), test_images, test_labels,
                   class_names, CIFAR10_MEAN, CIFAR10_STD)


# --------------------------------------------------------------------------- sources
def find_cifar10_folder(root: Path) -> tuple[Path, str] | None:
    """The folder holding a CIFAR-10 layout at or directly under ``root``, and which layout."""
    for folder in (root, root / "cifar-10-batches-bin", root / "cifar-10-batches-py"):
        if (folder / "data_batch_1.bin").exists() or (folder / "test_batch.bin").exists():
            return folder, "binary"
        if (folder / "data_batch_1").exists() or (folder / "test_batch").exists():
            return folder, "python"
    return None


def data_root(data_dir: str | os.PathLike | None) -> Path | None:
    """The folder named by ``data_dir`` or else ``$KD_JAX_DATA_DIR``; None when neither is set."""
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        return None
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise KdError(f"{root}: data directory not found")
    return root


def load_cifar10(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load CIFAR-10 from ``data_dir``, ``$KD_JAX_DATA_DIR``, or the tfds download cache."""
    root = data_root(data_dir)
    if root is None:
        return load_binary_folder(download_cifar10())
    found = find_cifar10_folder(root)
    if found is None:
        raise KdError(f"{root}: no CIFAR-10 here (expected data_batch_1.bin .. test_batch.bin, "
                      "or the cifar-10-batches-py files)")
    folder, layout = found
    return load_binary_folder(folder) if layout == "binary" else load_python_folder(folder)


def default_cache_dir() -> Path:
    """Where downloads are kept: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (tfds' own)."""
    return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def registered_url_infos() -> dict:
    """The size and sha256 that tensorflow-datasets registers for the official archive."""
    import tensorflow_datasets as tfds  # heavy; only when downloading
    from tensorflow_datasets.core.download import checksums

    return checksums.load_url_infos(Path(tfds.__file__).parent / "url_checksums" / "cifar10.txt")


def download_cifar10(cache_dir: Path | None = None, url: str = CIFAR10_URL,
                     url_infos: dict | None = None) -> Path:
    """Fetch and extract the official binary archive once; later calls are offline.

    The download goes through tensorflow-datasets' download manager, which refuses a file
    whose size or sha256 differs from what tfds registers for it (``url_infos``). We extract
    with ``tarfile`` rather than the manager, whose extraction needs TensorFlow, and we do not
    use ``tfds.load``, whose dataset preparation needs TensorFlow too.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    extracted = cache_dir / "kd_jax" / "cifar-10-batches-bin"
    if (extracted / "test_batch.bin").is_file():
        return extracted
    import tensorflow_datasets as tfds

    try:
        manager = tfds.download.DownloadManager(
            download_dir=cache_dir / "downloads", force_checksums_validation=True,
            url_infos=registered_url_infos() if url_infos is None else url_infos)
        archive = Path(manager.download(url))
        with tarfile.open(archive) as tar:
            tar.extractall(extracted.parent, filter="data")
    except Exception as e:  # network, checksum and archive failures, reported in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise KdError(f"could not download CIFAR-10 ({type(e).__name__}: {reason}); pass "
                      f"--data-dir or set {DATA_DIR_ENV} to a local copy") from None
    if not (extracted / "test_batch.bin").is_file():
        raise KdError(f"{archive}: the archive holds no cifar-10-batches-bin/test_batch.bin")
    return extracted


# --------------------------------------------------------------------------- MNIST (IDX files)
_IDX_UBYTE_MAGIC = {1: 0x00000801, 3: 0x00000803}  # unsigned bytes, 1-D labels / 3-D images
_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_file_bytes(path: Path) -> bytes:
    """The bytes of ``path``, or of ``path.gz`` decompressed when only that exists."""
    gz = path.with_name(path.name + ".gz")
    if path.is_file():
        return path.read_bytes()
    if gz.is_file():
        try:
            return gzip.decompress(gz.read_bytes())
        except (OSError, EOFError) as e:
            raise KdError(f"{gz}: not a readable gzip file ({e})") from None
    raise KdError(f"{path}: file not found")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes with ``ndim`` dimensions (LeCun's MNIST format).

    Header: 4 magic bytes (0, 0, type 0x08 = ubyte, ndim), then ``ndim`` big-endian uint32
    sizes, then the data. Everything is checked before it is trusted: a truncated or wrong
    file names itself instead of producing a garbage array.
    """
    raw = _read_file_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise KdError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_UBYTE_MAGIC[ndim]:
        raise KdError(f"{path}: magic number {magic:#010x}, expected "
                      f"{_IDX_UBYTE_MAGIC[ndim]:#010x} (an IDX file of {ndim}-D unsigned bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise KdError(f"{path}: size {len(raw)} bytes does not match its header "
                      f"(dimensions {dims} need {expected})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_mnist_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's (uint8 images [N, 28, 28, 1], int32 labels [N]), validated."""
    image_file, label_file = (folder / name for name in _MNIST_FILES[split])
    images = read_idx(image_file, 3)
    labels = read_idx(label_file, 1)
    if images.shape[1:] != (28, 28):
        raise KdError(f"{image_file}: images are {images.shape[1]}x{images.shape[2]}, "
                      "MNIST's are 28x28")
    if len(labels) != len(images):
        raise KdError(f"{label_file}: {len(labels)} labels for the {len(images)} images "
                      f"in {image_file.name}")
    return images[..., None].copy(), _checked_labels(labels.astype(np.int32), label_file)


def find_mnist_folder(root: Path) -> Path | None:
    """The folder holding the MNIST IDX files: ``root`` itself or ``root/mnist``."""
    for folder in (root, root / "mnist"):
        name = _MNIST_FILES["train"][0]
        if (folder / name).exists() or (folder / f"{name}.gz").exists():
            return folder
    return None


def load_mnist(data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load MNIST from the IDX files in ``data_dir`` or ``$KD_JAX_DATA_DIR`` (or their mnist/)."""
    root = data_root(data_dir)
    if root is None:
        raise KdError(f"MNIST is read from local IDX files: pass --data-dir or set {DATA_DIR_ENV}")
    folder = find_mnist_folder(root)
    if folder is None:
        raise KdError(f"{root}: no MNIST here (expected train-images-idx3-ubyte, "
                      "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
                      "plain or .gz, here or in mnist/)")
    train_images, train_labels = read_mnist_split(folder, "train")
    test_images, test_labels = read_mnist_split(folder, "test")
    return Dataset("mnist", train_images, train_labels, test_images, test_labels, MNIST_CLASSES,
                   MNIST_MEAN, MNIST_STD)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """The dataset called ``name`` (see :data:`LOADERS`)."""
    if name not in LOADERS:
        raise KdError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(LOADERS))}")
    return LOADERS[name](data_dir)


LOADERS = {"cifar10": load_cifar10, "mnist": load_mnist}

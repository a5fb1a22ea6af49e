"""CIFAR-10, CIFAR-100 and MNIST sources -> validated uint8 arrays.

CIFAR sources, in order: a local folder (``--data-dir`` or ``$KD_JAX_DATA_DIR``) in the
standard *binary* layout (CIFAR-10: ``data_batch_{1..5}.bin``, ``test_batch.bin``; CIFAR-100:
``train.bin``, ``test.bin``) or *python* layout (``cifar-10-batches-py``,
``cifar-100-python``); else the official binary archive fetched once by tensorflow-datasets'
download manager, checked against the checksum tfds registers for it, and cached. What
differs between the two datasets' files is a :class:`CifarLayout`; one reader serves both.

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
import socket
import tarfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_jax.errors import KdError

DATA_DIR_ENV = "KD_JAX_DATA_DIR"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# CIFAR-100's fine classes in label order (its fine_label_names.txt).
CIFAR100_CLASSES = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
    butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
    crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house
    kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle
    mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
    plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew
    skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank
    telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf
    woman worm""".split())
# Per-channel mean and standard deviation of the official training sets' pixels (fraction of
# 255). CIFAR-100's are those computed over its 50,000 training images in e.g.
# weiaicunzai/pytorch-cifar100 (conf/global_settings.py: 0.50708, 0.48655, 0.44092 and
# 0.26733, 0.25644, 0.27615); RepDistiller's (0.5071, 0.4867, 0.4408) / (0.2675, 0.2565,
# 0.2761) differ in the fourth digit.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MNIST_CLASSES = tuple(str(d) for d in range(10))
# Statistics of the official MNIST training set (fraction of 255).
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
_PIXELS = 32 * 32 * 3


@dataclass(frozen=True)
class CifarLayout:
    """What differs between the CIFAR-10 and CIFAR-100 files.

    A binary record is one byte per entry of ``labels`` (python-layout key, number of
    classes), in that order, then 3072 pixel bytes; the last label is the class trained on
    (CIFAR-100's fine label; its coarse label is validated too). ``max_records`` is the most
    images one official file holds: refusing bigger files before reading them keeps a wrong
    path (a disk image, a video) from being pulled into memory.
    """

    name: str  # in messages: "CIFAR-10"
    dataset: str  # the --dataset name
    labels: tuple[tuple[str, int], ...]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_records: int
    binary_folder: str
    binary_train: tuple[str, ...]
    binary_test: str
    names_file: str  # binary layout: class names, one a line
    python_folder: str
    python_train: tuple[str, ...]
    python_test: str
    meta_file: str  # python layout: a dict whose meta_key lists the class names
    meta_key: str
    url: str
    checksums: str  # tfds' url_checksums file registering the archive

    @property
    def record_bytes(self) -> int:
        return len(self.labels) + _PIXELS

    @property
    def expected(self) -> str:
        """The files a folder of this dataset holds, for "not found" messages."""
        return (f"{self.binary_train[0]} .. {self.binary_test}" if len(self.binary_train) > 1
                else f"{self.binary_train[0]} and {self.binary_test}")


CIFAR10 = CifarLayout(
    "CIFAR-10", "cifar10", (("labels", 10),), CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD,
    10_000, "cifar-10-batches-bin", tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test_batch.bin", "batches.meta.txt", "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta", "label_names",
    CIFAR10_URL, "cifar10.txt")
CIFAR100 = CifarLayout(
    "CIFAR-100", "cifar100", (("coarse_labels", 20), ("fine_labels", 100)), CIFAR100_CLASSES,
    CIFAR100_MEAN, CIFAR100_STD, 50_000, "cifar-100-binary", ("train.bin",), "test.bin",
    "fine_label_names.txt", "cifar-100-python", ("train",), "test", "meta", "fine_label_names",
    CIFAR100_URL, "cifar100.txt")


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
def read_binary_batch(path: Path, layout: CifarLayout = CIFAR10) -> tuple[np.ndarray, np.ndarray]:
    """Read one ``.bin`` file: records of the label bytes + 3072 pixel bytes (CHW); returns
    the images and the class labels, every label byte checked."""
    _check_size(path, layout.max_records * layout.record_bytes, layout)
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % layout.record_bytes:
        raise KdError(f"{path}: size {raw.size} bytes is not a positive multiple of "
                      f"{layout.record_bytes} (truncated or not a {layout.name} binary batch)")
    records = raw.reshape(-1, layout.record_bytes)
    for i, (key, classes) in enumerate(layout.labels):
        labels = _checked_labels(records[:, i].astype(np.int32), path, classes, _noun(key))
    images = records[:, len(layout.labels):].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _noun(key: str) -> str:
    """``fine_labels`` -> ``fine label``: a label field as messages name it."""
    return key.removesuffix("s").replace("_", " ")


def _check_size(path: Path, limit: int, layout: CifarLayout) -> None:
    """Refuse a missing file, or one larger than any of the dataset's files, before reading."""
    if not path.is_file():
        raise KdError(f"{path}: file not found")
    size = path.stat().st_size
    if size > limit:
        raise KdError(f"{path}: {size} bytes is more than a {layout.name} batch file holds "
                      f"(at most {limit}); not a {layout.name} batch")


def _checked_labels(labels: np.ndarray, path: Path, num_classes: int = 10,
                    what: str = "label") -> np.ndarray:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise KdError(f"{path}: {what} {int(labels[i])} at record {i} is outside "
                      f"0..{num_classes - 1}")
    return labels


def _read_class_names(folder: Path, layout: CifarLayout) -> tuple[str, ...]:
    path = folder / layout.names_file
    if not path.is_file():
        return layout.class_names
    names = tuple(line.strip() for line in path.read_text(errors="replace").splitlines()
                  if line.strip())
    if len(names) != len(layout.class_names):
        raise KdError(f"{path}: expected {len(layout.class_names)} class names, "
                      f"found {len(names)}")
    return names


def load_binary_folder(folder: Path, layout: CifarLayout = CIFAR10) -> Dataset:
    """Load the standard binary layout (``cifar-10-batches-bin``, ``cifar-100-binary``)."""
    train = [read_binary_batch(folder / name, layout) for name in layout.binary_train]
    test_images, test_labels = read_binary_batch(folder / layout.binary_test, layout)
    return _cifar(layout, train, test_images, test_labels, _read_class_names(folder, layout))


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


def safe_unpickle(path: Path, layout: CifarLayout = CIFAR10) -> object:
    """Unpickle ``path`` with :class:`_RestrictedUnpickler`; any failure becomes a ``KdError``."""
    # A python batch pickles its pixels once, plus its labels and file names.
    _check_size(path, 2 * layout.max_records * layout.record_bytes, layout)
    try:
        return _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can raise nearly anything
        reason = " ".join(str(e).split())  # some of pickle's messages span two lines
        raise KdError(f"{path}: not a safe {layout.name} python batch "
                      f"({type(e).__name__}: {reason})") from None


def _str_keys(obj: object, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise KdError(f"{path}: expected a dict, found {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_python_batch(path: Path, layout: CifarLayout = CIFAR10) -> tuple[np.ndarray, np.ndarray]:
    """Read one python-layout batch: a dict with ``data`` [N, 3072] uint8 and the layout's
    label lists (CIFAR-10 ``labels``; CIFAR-100 ``coarse_labels``, ``fine_labels``)."""
    batch = _str_keys(safe_unpickle(path, layout), path)
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _PIXELS or not 0 < data.shape[0] <= layout.max_records:
        raise KdError(f"{path}: 'data' must be a uint8 array of shape [N, {_PIXELS}], "
                      f"0 < N <= {layout.max_records}")
    for key, classes in layout.labels:
        try:
            labels = np.asarray(batch.get(key), dtype=np.int64)
        except (TypeError, ValueError):
            raise KdError(f"{path}: '{key}' must be a list of integers") from None
        if labels.shape != (data.shape[0],):
            raise KdError(f"{path}: {labels.size} {key} for {data.shape[0]} images")
        labels = _checked_labels(labels.astype(np.int32), path, classes, _noun(key))
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_meta(path: Path, layout: CifarLayout) -> tuple[str, ...]:
    """The class names a python layout's meta pickle lists (the layout's own when absent)."""
    if not path.is_file():
        return layout.class_names
    names = _str_keys(safe_unpickle(path, layout), path).get(layout.meta_key)
    count = len(layout.class_names)
    if not isinstance(names, list) or len(names) != count:
        raise KdError(f"{path}: expected {count} class names under '{layout.meta_key}'")
    return tuple(n.decode(errors="replace") if isinstance(n, bytes) else str(n) for n in names)


def load_python_folder(folder: Path, layout: CifarLayout = CIFAR10) -> Dataset:
    """Load the python layout (``cifar-10-batches-py``, ``cifar-100-python``) without
    executing anything in it."""
    train = [read_python_batch(folder / name, layout) for name in layout.python_train]
    test_images, test_labels = read_python_batch(folder / layout.python_test, layout)
    return _cifar(layout, train, test_images, test_labels,
                  _read_meta(folder / layout.meta_file, layout))


def _cifar(layout: CifarLayout, train, test_images, test_labels, class_names) -> Dataset:
    return Dataset(layout.dataset, np.concatenate([im for im, _ in train]),
                   np.concatenate([lb for _, lb in train]), test_images, test_labels,
                   class_names, layout.mean, layout.std)


# --------------------------------------------------------------------------- sources
def find_cifar_folder(root: Path, layout: CifarLayout = CIFAR10) -> tuple[Path, str] | None:
    """The folder holding the dataset at or directly under ``root``, and which layout."""
    for folder in (root, root / layout.binary_folder, root / layout.python_folder):
        if (folder / layout.binary_train[0]).exists() or (folder / layout.binary_test).exists():
            return folder, "binary"
        if (folder / layout.python_train[0]).exists() or (folder / layout.python_test).exists():
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


def load_cifar(layout: CifarLayout, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a CIFAR dataset from ``data_dir``, ``$KD_JAX_DATA_DIR``, or the tfds download."""
    root = data_root(data_dir)
    if root is None:
        return load_binary_folder(download_cifar(layout), layout)
    found = find_cifar_folder(root, layout)
    if found is None:
        raise KdError(f"{root}: no {layout.name} here (expected {layout.expected}, "
                      f"or the {layout.python_folder} files)")
    folder, kind = found
    load = load_binary_folder if kind == "binary" else load_python_folder
    return load(folder, layout)


def load_cifar10(data_dir: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10 (:func:`load_cifar`)."""
    return load_cifar(CIFAR10, data_dir)


def load_cifar100(data_dir: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-100 with its 100 fine labels (:func:`load_cifar`)."""
    return load_cifar(CIFAR100, data_dir)


def default_cache_dir() -> Path:
    """Where downloads are kept: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets`` (tfds' own)."""
    return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def registered_url_infos(layout: CifarLayout = CIFAR10) -> dict:
    """The size and sha256 that tensorflow-datasets registers for the official archive."""
    import tensorflow_datasets as tfds  # heavy; only when downloading
    from tensorflow_datasets.core.download import checksums

    return checksums.load_url_infos(Path(tfds.__file__).parent / "url_checksums"
                                    / layout.checksums)


def download_cifar(layout: CifarLayout, cache_dir: Path | None = None, url: str | None = None,
                   url_infos: dict | None = None) -> Path:
    """Fetch and extract the official binary archive (``layout.url`` unless ``url``) once;
    later calls are offline.

    The download goes through tensorflow-datasets' download manager, which refuses a file
    whose size or sha256 differs from what tfds registers for it (``url_infos``). We extract
    with ``tarfile`` rather than the manager, whose extraction needs TensorFlow, and we do not
    use ``tfds.load``, whose dataset preparation needs TensorFlow too.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    extracted = cache_dir / "kd_jax" / layout.binary_folder
    if (extracted / layout.binary_test).is_file():
        return extracted
    check_reachable(url or layout.url)
    import tensorflow_datasets as tfds

    try:
        manager = tfds.download.DownloadManager(
            download_dir=cache_dir / "downloads", force_checksums_validation=True,
            url_infos=registered_url_infos(layout) if url_infos is None else url_infos)
        archive = Path(manager.download(url or layout.url))
        with tarfile.open(archive) as tar:
            tar.extractall(extracted.parent, filter="data")
    except Exception as e:  # network, checksum and archive failures, reported in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise KdError(f"could not download {layout.name} ({type(e).__name__}: {reason}); pass "
                      f"--data-dir or set {DATA_DIR_ENV} to a local copy") from None
    if not (extracted / layout.binary_test).is_file():
        raise KdError(f"{archive}: the archive holds no "
                      f"{layout.binary_folder}/{layout.binary_test}")
    return extracted


REACH_SECONDS = 5.0


def check_reachable(url: str, timeout: float = REACH_SECONDS) -> None:
    """Refuse at once when the archive's host cannot be reached: without a network, tfds'
    download manager spends minutes in retries (3 min 27 s measured) before failing."""
    parsed = urllib.parse.urlsplit(url)
    port = parsed.port or {"https": 443, "http": 80}.get(parsed.scheme, 443)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise KdError(f"cannot reach {parsed.hostname}:{port} to download the data ({reason}; "
                      f"no network?): pass --data-dir or set {DATA_DIR_ENV} to a local copy"
                      ) from None


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


LOADERS = {"cifar10": load_cifar10, "cifar100": load_cifar100, "mnist": load_mnist}

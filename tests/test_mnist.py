"""MNIST (Hinton et al. 2015, sec. 3): the IDX loader, jitter, the MLPs, max-norm, the
left-out-classes distillation, and a short real-data run when ../shared/data/mnist exists."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.cli import jobs
from kd_jax.cli.config import DistillConfig, TeacherConfig, load_yaml
from kd_jax.core import augment, data
from kd_jax.core.models import create_model, init_variables
from kd_jax.core.optim import Recipe, make_optimizer
from kd_jax.core.steps import create_state, teacher_step
from kd_jax.errors import KdError

ROOT = Path(__file__).resolve().parent.parent
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """``array`` (uint8) as an IDX file: magic, big-endian dimensions, data."""
    magic = 0x800 + array.ndim if magic is None else magic
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    return magic.to_bytes(4, "big") + dims + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = False,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Tiny MNIST-shaped IDX files whose images encode their label (so a net can learn them)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 4 + 2 * label: 6 + 2 * label, 4:24] = 255
        for name, array in zip(FILES[split], (images, labels), strict=True):
            raw = idx_bytes(array)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
        arrays[split] = (images, labels)
    return arrays


def real_mnist_dir() -> Path | None:
    for root in (os.environ.get(data.DATA_DIR_ENV), ROOT.parent / "shared" / "data"):
        if root and data.find_mnist_folder(Path(root)) is not None:
            return Path(root)
    return None


# --------------------------------------------------------------------------- loader
@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_reads_idx_files(tmp_path, gz):
    arrays = write_mnist(tmp_path / "mnist", gz=gz)
    dataset = data.load_dataset("mnist", tmp_path)  # finds the mnist/ folder
    assert dataset.name == "mnist"
    assert dataset.train_images.shape == (40, 28, 28, 1) and dataset.image_shape == (28, 28, 1)
    assert dataset.train_images.dtype == np.uint8 and dataset.train_labels.dtype == np.int32
    np.testing.assert_array_equal(dataset.train_images[..., 0], arrays["train"][0])
    np.testing.assert_array_equal(dataset.test_labels, arrays["test"][1])
    assert dataset.class_names == tuple("0123456789")
    assert dataset.mean == data.MNIST_MEAN and dataset.std == data.MNIST_STD


def _corrupt(folder: Path, name: str, raw: bytes) -> None:
    (folder / name).write_bytes(raw)


@pytest.mark.parametrize("name, make, message", [
    ("t10k-images-idx3-ubyte", None, "file not found"),
    ("train-images-idx3-ubyte", lambda: b"\x00\x00\x08", "too short for an IDX header"),
    ("train-images-idx3-ubyte",
     lambda: idx_bytes(np.zeros((40, 28, 28), np.uint8), magic=0x801), "magic number"),
    ("train-labels-idx1-ubyte",
     lambda: idx_bytes(np.zeros((40,), np.uint8), magic=0x803), "magic number"),
    ("train-images-idx3-ubyte",
     lambda: idx_bytes(np.zeros((40, 28, 28), np.uint8))[:-5], "does not match its header"),
    ("t10k-labels-idx1-ubyte",
     lambda: idx_bytes(np.zeros((20,), np.uint8)) + b"\x00", "does not match its header"),
    ("train-images-idx3-ubyte", lambda: idx_bytes(np.zeros((40, 32, 32), np.uint8)), "28x28"),
    ("train-labels-idx1-ubyte", lambda: idx_bytes(np.zeros((39,), np.uint8)),
     "39 labels for the 40 images"),
    ("t10k-labels-idx1-ubyte", lambda: idx_bytes(np.full((20,), 10, np.uint8)),
     "label 10 at record 0 is outside 0..9"),
])
def test_malformed_idx_files_are_named_in_one_line(tmp_path, name, make, message):
    write_mnist(tmp_path)
    if make is None:
        (tmp_path / name).unlink()
    else:
        _corrupt(tmp_path, name, make())
    with pytest.raises(KdError, match=message) as error:
        data.load_mnist(tmp_path)
    assert name in str(error.value) and "\n" not in str(error.value)


def test_corrupt_gzip_is_a_kd_error(tmp_path):
    write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(KdError, match="t10k-images-idx3-ubyte.gz: not a readable gzip"):
        data.load_mnist(tmp_path)


def test_missing_folder_and_missing_files(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(KdError, match="pass --data-dir"):
        data.load_mnist(None)
    with pytest.raises(KdError, match="data directory not found"):
        data.load_mnist(tmp_path / "nope")
    with pytest.raises(KdError, match="no MNIST here"):
        data.load_mnist(tmp_path)


def test_real_mnist_counts():
    root = real_mnist_dir()
    if root is None:
        pytest.skip("MNIST not found at ../shared/data/mnist or $KD_JAX_DATA_DIR")
    dataset = data.load_mnist(root)
    assert dataset.train_images.shape == (60_000, 28, 28, 1)
    assert dataset.test_images.shape == (10_000, 28, 28, 1)
    assert np.bincount(dataset.train_labels).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(dataset.test_labels).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(dataset.train_images.mean() / 255 - data.MNIST_MEAN[0]) < 1e-4
    assert abs(dataset.train_images.std() / 255 - data.MNIST_STD[0]) < 1e-4


# --------------------------------------------------------------------------- jitter
def test_jitter_keeps_shape_and_moves_pixels_by_at_most_two():
    images = np.zeros((256, 28, 28, 1), np.uint8)
    images[:, 13, 9] = 255  # one lit pixel per image
    jitter = augment.Augmentation(2, False, data.MNIST_MEAN, data.MNIST_STD).augment
    out = np.asarray(jitter(jax.random.key(0), jnp.asarray(images)))
    assert out.shape == images.shape and out.dtype == np.uint8
    assert (out.reshape(256, -1) == 255).sum(1).tolist() == [1] * 256  # moved, never lost
    rows, cols = np.nonzero(out[..., 0] == 255)[1:]
    shifts = {(r - 13, c - 9) for r, c in zip(rows, cols, strict=True)}
    assert all(abs(dr) <= 2 and abs(dc) <= 2 for dr, dc in shifts)
    assert len(shifts) == 25  # every shift in [-2, 2]^2 happens


# --------------------------------------------------------------------------- models
def test_mlp_shapes_and_dropout():
    model = create_model("mlp2", width=32, dropout=0.5, input_dropout=0.2)
    variables = init_variables(model, (28, 28, 1), seed=0)
    kernels = [v["kernel"].shape for v in variables["params"].values()]
    assert kernels == [(784, 32), (32, 32), (32, 10)] and "batch_stats" not in variables
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
    a, b = (model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(k)})
            for k in (2, 3))
    assert a.shape == (4, 10) and not np.allclose(a, b)  # dropout is on in training
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


def test_max_norm_holds_after_a_step():
    model = create_model("mlp1", width=16)
    variables = init_variables(model, (28, 28, 1), seed=0)
    images = jax.random.normal(jax.random.key(1), (64, 28, 28, 1))
    labels = jnp.arange(64) % 10

    def trained_norms(limit: float) -> list[np.ndarray]:
        spec = Recipe(5.0, weight_decay=0.0, warmup_fraction=0, max_norm=limit)
        tx, _ = make_optimizer(spec, 10)
        state = create_state(model, variables, tx)
        for i in range(3):
            state, _ = teacher_step(state, images, labels, jax.random.key(i))
        return [np.linalg.norm(np.asarray(p["kernel"]), axis=0)
                for p in state.params.values()]

    limit = 0.8
    assert max(n.max() for n in trained_norms(0.0)) > limit  # the constraint has work to do
    constrained = trained_norms(limit)
    assert all(n.max() <= limit * (1 + 1e-5) for n in constrained)
    assert any(np.isclose(n, limit, rtol=1e-4).any() for n in constrained)


# --------------------------------------------------------------------------- left-out classes
def test_transfer_classes_leave_out_the_others(tmp_path):
    arrays = write_mnist(tmp_path, n_train=100)
    dataset = data.load_mnist(tmp_path)
    config = DistillConfig(dataset="mnist", transfer_classes="7, 8", holdout=30)
    left_out = jobs.left_out_classes(dataset, config)
    assert left_out == [0, 1, 2, 3, 4, 5, 6, 9]
    transfer, held = jobs.split_transfer_set(dataset.train_labels, left_out, config.holdout)
    assert set(arrays["train"][1][transfer]) == {7, 8} and held.tolist() == list(range(70, 100))
    assert jobs.left_out_classes(dataset, DistillConfig(omit_class="3")) == [3]
    with pytest.raises(KdError, match="unknown class 'x'"):
        jobs.left_out_classes(dataset, DistillConfig(transfer_classes="7,x"))
    with pytest.raises(KdError, match="exclude each other"):
        DistillConfig(omit_class="3", transfer_classes="7,8").validate()


def test_offset_report_for_several_classes():
    """Logits that favour the seen classes (1, 2) by 3: a +3.5 offset to the others fixes it."""
    labels = np.array([0, 1, 2, 0, 1, 2])
    logits = np.eye(3)[labels] * 2.0
    logits[:, 1:] += 3.0
    report = jobs.omitted_class_report(logits, labels, logits, labels, [0], "0",
                                       fixed_offset=3.5)
    assert report["class_accuracy"] == 0 and report["test_errors"] == 2
    assert report["test_errors_after_fixed_offset"] == 0
    assert report["class_errors_after_offset"] == 0 and 1.0 <= report["offset"] < 5.0
    seen = jobs.omitted_class_report(logits, labels, logits, labels, [1, 2], "1,2")
    assert seen["class_images"] == 4 and seen["class_accuracy"] == 1.0


@pytest.mark.parametrize("name, cls", [
    ("mnist_teacher", TeacherConfig), ("mnist_student_hard", TeacherConfig),
    ("mnist_distill", DistillConfig), ("mnist_omit3", DistillConfig),
    ("mnist_only78", DistillConfig)])
def test_configs_are_valid(name, cls):
    config = cls(**load_yaml(ROOT / "configs" / f"{name}.yaml", cls))
    config.validate()
    assert config.dataset == "mnist" and config.crop_pad in (0, 2) and not config.flip
    assert config.crop_pad == 0 or config.pad_mode == "zeros"  # not the CIFAR default, reflect


def test_teacher_then_left_out_distillation_end_to_end(tmp_path, monkeypatch):
    """Both entry points' jobs on tiny IDX files: an MLP teacher restores for distillation
    (no BatchNorm statistics, from a relative --teacher-dir) and the fixed and automatic
    offsets are reported."""
    write_mnist(tmp_path / "data", n_train=256, n_test=100)
    monkeypatch.chdir(tmp_path)
    common = dict(dataset="mnist", data_dir=str(tmp_path / "data"), epochs=1, batch_size=32,
                  eval_batch_size=50, crop_pad=2, pad_mode="zeros", flip=False, progress=False,
                  dtype="float32")
    jobs.train_teacher(TeacherConfig(model="mlp2", width=32, dropout=0.5, input_dropout=0.2,
                                     max_norm=3.0, workdir=str(tmp_path / "t"), **common))
    summary = jobs.distill(DistillConfig(student="mlp2", student_width=16, temperature=20.0,
                                         teachers=["t"], transfer_classes="7,8",
                                         bias_offset=7.6, holdout=64,
                                         workdir=str(tmp_path / "s"), **common))
    report = summary["omitted_class"]
    assert report["class"] == "0,1,2,3,4,5,6,9" and report["holdout_images"] == 64
    assert report["fixed_offset"] == 7.6 and "test_errors_after_fixed_offset" in report
    # the 7s and 8s among the first 256 - 64: what the student trained on
    assert summary["train_images"] == summary["transfer_images"] == 38


@pytest.mark.slow
def test_student_reaches_90_percent_on_real_mnist(tmp_path):
    """A few hundred steps of the 784-800-800-10 student on labels (300 steps of 128)."""
    root = real_mnist_dir()
    if root is None:
        pytest.skip("MNIST not found at ../shared/data/mnist or $KD_JAX_DATA_DIR")
    config = TeacherConfig(**load_yaml(ROOT / "configs" / "mnist_student_hard.yaml",
                                       TeacherConfig))
    config.data_dir, config.workdir, config.progress = str(root), str(tmp_path / "s"), False
    config.train_subset, config.epochs = 12_800, 3
    summary = jobs.train_teacher(config)
    assert summary["step"] == 300 and summary["test_accuracy"] > 0.90


def test_cli_reports_a_bad_idx_file_in_one_line(tmp_path, capsys):
    from kd_jax.cli.main import main

    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05")
    code = main(TeacherConfig, jobs.train_teacher, "",
                ["--dataset", "mnist", "--data-dir", str(tmp_path), "--model", "mlp1",
                 "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "t10k-labels-idx1-ubyte: size 8 bytes" in err


def offset_logits(margins: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Three-class logits and labels, one image per ``(label, margin)``: a class-2 image needs
    class 2 raised by more than ``margin`` to be right, a class-0 image is wrong once it is
    raised by ``margin`` or more (``margin < 0``: it is wrong until class 2 is lowered by more
    than ``-margin``)."""
    logits = np.zeros((len(margins), 3))
    for i, (label, margin) in enumerate(margins):
        logits[i, 0 if label == 2 else 2] = margin if label == 2 else -margin
    labels = np.array([label for label, _ in margins])
    return logits, labels


# Held out: +1.1 (the smallest offset above 1) wins; the test set would pick +4.1.
HELD = offset_logits([(2, 1.0), (2, 1.0), (0, 3.0), (0, 3.0)])
TEST = offset_logits([(2, 4.0), (2, 4.0), (0, 6.0), (0, 6.0)])


def test_offset_is_chosen_on_held_out_images_never_on_the_test_set():
    from types import SimpleNamespace

    from kd_jax.core import metrics

    assert metrics.best_logit_offset(*HELD, [2]) == pytest.approx(1.1)
    assert metrics.best_logit_offset(*TEST, [2]) == pytest.approx(4.1)
    report = jobs.omitted_class_report(*TEST, *HELD, [2], "c")
    assert report["offset"] == pytest.approx(1.1)
    # The test set's figures at +1.1: its class-2 images are still wrong (right from +4.1).
    assert (report["class_accuracy"], report["class_accuracy_after_offset"]) == (0.0, 0.0)
    assert report["test_errors_after_offset"] == 2 and report["holdout_images"] == 4

    # Through the job: its held-out images are the last `holdout` training images. An image is
    # its row number in a logits table (training images first, then the test images).
    train_logits, train_labels = offset_logits([(1, 0.0)] * 6 + [(2, 0.0)] * 2)
    table = np.concatenate([train_logits[:4], HELD[0], TEST[0]])
    labels = np.concatenate([train_labels[:4], HELD[1]])
    test_images = np.arange(8, 8 + len(TEST[1]))[:, None]
    job = SimpleNamespace(
        train_images=np.arange(8)[:, None], train_labels=labels,
        eval_sets={"test": (test_images, TEST[1])},
        dataset=SimpleNamespace(class_names=("a", "b", "c")),
        config=SimpleNamespace(bias_offset=None),
        logits=lambda apply_fn, variables, images: table[images[:, 0]])
    transfer, held_out = jobs.split_transfer_set(labels, [2], 4)
    assert held_out.tolist() == [4, 5, 6, 7] and transfer.tolist() == [0, 1, 2, 3]
    state = SimpleNamespace(inference_variables=lambda: {})
    found = jobs._Job.omitted_class(job, SimpleNamespace(apply=None), state, held_out, [2])
    assert found == report


def test_offset_ties_go_to_the_offset_closest_to_zero_either_side():
    """One held-out image is right once class 2 is lowered by more than ``a``, the other once
    it is raised by more than ``b``: the offsets beyond either score alike (1 of 2, none does
    better), and the one closest to zero wins, on whichever side it is."""
    for (lowered, raised), expected in (((0.55, 1.55), -0.6), ((1.55, 0.55), 0.6)):
        held = offset_logits([(0, -lowered), (2, raised)])
        report = jobs.omitted_class_report(*TEST, *held, [2], "c")
        assert report["offset"] == pytest.approx(expected)


# --------------------------------------------------------------------------- alpha < 1, export
@pytest.fixture(scope="module")
def mnist_runs(tmp_path_factory):
    """An MLP trained on labels, and a student of the same MLP distilled from it with alpha 0:
    cross-entropy on the labels alone, the teacher's term weighted 0."""
    root = tmp_path_factory.mktemp("mnist-runs")
    write_mnist(root / "data", n_train=128, n_test=50)
    common = dict(dataset="mnist", data_dir=str(root / "data"), epochs=2, batch_size=32,
                  eval_batch_size=50, crop_pad=2, pad_mode="zeros", flip=False, progress=False,
                  dtype="float32", learning_rate=0.05)
    jobs.train_teacher(TeacherConfig(model="mlp1", width=16, label_smoothing=0.0,
                                     workdir=str(root / "teacher"), **common))
    jobs.distill(DistillConfig(student="mlp1", student_width=16, alpha=0.0,
                               teachers=[str(root / "teacher")], workdir=str(root / "student"),
                               **common))
    return root


def test_alpha_zero_distillation_is_training_on_the_labels(mnist_runs):
    """The job hands the hard-label term each transfer image's own label, at T = 1 with weight
    1 - alpha: at alpha 0 the student is the model trained on labels, bit for bit."""
    from kd_jax.core.checkpoint import load_frozen

    leaves = lambda name: jax.tree.leaves(load_frozen(mnist_runs / name).variables)
    for a, b in zip(leaves("teacher"), leaves("student"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_one_channel_student_exports_and_classifies(mnist_runs, tmp_path, capsys):
    """``python -m kd_jax.export`` of a distilled MNIST MLP: a student's config names its model
    as ``student``, its images have one channel; the file's logits are the student's, and
    predict feeds it a grey picture."""
    import onnx
    from PIL import Image

    from kd_jax import export, predict
    from kd_jax.core.augment import normalize
    from kd_jax.core.checkpoint import load_frozen
    from kd_jax.onnx_model import OnnxClassifier

    out = tmp_path / "student.onnx"
    assert export.main(["--workdir", str(mnist_runs / "student"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime vs JAX on 50 test images: same top-1 on 100.00%" in printed
    assert printed.rstrip().endswith(": OK")
    dims = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [28, 28, 1]
    classifier = OnnxClassifier(out)
    assert classifier.image_shape == (28, 28, 1) and classifier.metadata["model"] == "mlp1"
    assert classifier.class_names == tuple(str(i) for i in range(10))

    dataset, frozen = data.load_mnist(mnist_runs / "data"), load_frozen(mnist_runs / "student")
    expected = np.asarray(frozen.build(10).apply(
        frozen.variables, normalize(dataset.test_images, dataset.mean, dataset.std)))
    logits = classifier.logits(dataset.test_images)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())

    png = tmp_path / "digit.png"
    Image.fromarray(dataset.test_images[0, :, :, 0]).save(png)  # mode L: one channel
    assert predict.main(["--model", str(out), str(png), "--top", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{png}: {int(logits[0].argmax())} ")

"""Export, onnxruntime check, predict and the deployment report, on a tiny model (CPU).

The runs train for one epoch on a synthetic CIFAR-10 folder written here (random pixels and
labels, in the real binary layout), so these tests need neither the dataset nor a network.
"""

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")

import onnx  # noqa: E402
from PIL import Image  # noqa: E402

from kd_jax import export, predict, report  # noqa: E402
from kd_jax.cli.config import DistillConfig, TeacherConfig  # noqa: E402
from kd_jax.cli.jobs import distill, train_teacher  # noqa: E402
from kd_jax.core.data import CIFAR10_CLASSES  # noqa: E402
from kd_jax.onnx_model import OnnxClassifier  # noqa: E402

TRAIN_PER_FILE, TEST_IMAGES = 64, 300


def _write_batch(path, rng, n):
    labels = rng.integers(0, 10, (n, 1), dtype=np.uint8)
    pixels = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    np.concatenate([labels, pixels], axis=1).tofile(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _write_batch(folder / f"data_batch_{i}.bin", rng, TRAIN_PER_FILE)
    _write_batch(folder / "test_batch.bin", rng, TEST_IMAGES)
    return str(folder)


def _tiny(**kwargs):
    return dict(epochs=1, batch_size=64, eval_batch_size=100, progress=False, **kwargs)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("runs") / "teacher"
    train_teacher(TeacherConfig(**_tiny(data_dir=data_dir, workdir=str(workdir),
                                        model="resnet8", width=8)))
    return workdir


@pytest.fixture(scope="module")
def student_run(tmp_path_factory, data_dir, teacher_run):
    workdir = tmp_path_factory.mktemp("runs") / "student"
    distill(DistillConfig(**_tiny(data_dir=data_dir, workdir=str(workdir),
                                  teachers=[str(teacher_run)], student="resnet8",
                                  student_width=4)))
    return workdir


@pytest.fixture(scope="module")
def onnx_file(teacher_run, data_dir):
    path, comparison = export.export_run(teacher_run, "onnx", data_dir=data_dir)
    assert comparison.passed and comparison.images == TEST_IMAGES
    return path


@pytest.fixture(scope="module")
def reference(teacher_run, data_dir):
    """JAX logits of the teacher on the test set, from the training code's evaluator."""
    model = export.load_inference_model(teacher_run, data_dir)
    return model.dataset.test_images, model.reference(100)(model.dataset.test_images)


def test_onnx_matches_jax_with_dynamic_batch(onnx_file, reference):
    images, expected = reference
    classifier = OnnxClassifier(onnx_file)
    for batch in (1, 7, TEST_IMAGES):
        got = classifier.run(images[:batch])
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, expected[:batch], atol=1e-4)
        assert np.array_equal(got.argmax(-1), expected[:batch].argmax(-1))
    assert classifier.class_names == CIFAR10_CLASSES


def test_onnx_graph_is_inference_only_and_portable(onnx_file):
    model = onnx.load(onnx_file)
    ops = {node.op_type for node in model.graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops  # folded into the convolutions
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]


def test_export_cli_prints_the_check(teacher_run, data_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert export.main(["--workdir", str(teacher_run), "--data-dir", data_dir,
                        "--output", str(out), "--check-images", "50"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    assert "onnxruntime vs JAX on 50 test images: same top-1 on 100.00%" in printed
    assert printed.rstrip().endswith("OK")


def test_stablehlo_round_trips_through_deserialize(teacher_run, data_dir, tmp_path, reference):
    import jax

    out = tmp_path / "model.stablehlo"
    path, comparison = export.export_run(teacher_run, "stablehlo", out, data_dir)
    assert path == out and comparison.passed
    exported = jax.export.deserialize(bytearray(out.read_bytes()))
    assert not isinstance(exported.in_avals[0].shape[0], int)  # symbolic batch dimension
    assert "cpu" in exported.platforms
    images, expected = reference
    np.testing.assert_allclose(np.asarray(exported.call(images[:5])), expected[:5], atol=1e-5)


def test_comparison_enforces_both_thresholds():
    # 1000 images whose top two logits are 1e-4 apart: a tiny drift can flip the top-1.
    reference = np.tile(np.eye(10, dtype=np.float32), (100, 1)) * 1e-4
    assert export.compare_logits(reference.copy(), reference).passed
    one_flip = reference.copy()
    one_flip[0] = np.roll(one_flip[0], 1)  # 1 of 1000 disagrees (99.9%): allowed
    assert export.compare_logits(one_flip, reference).passed
    one_flip[1] = np.roll(one_flip[1], 1)
    assert not export.compare_logits(one_flip, reference).passed
    drift = reference + np.float32(2e-3)  # same top-1 everywhere, logits off by 2e-3
    result = export.compare_logits(drift, reference)
    assert result.agreement == 1.0 and not result.passed


def test_export_of_a_non_run_is_one_line_error(tmp_path, capsys):
    assert export.main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no config.json" in err and err.count("\n") == 1


def test_predict_classifies_png_and_jpeg_of_any_size(onnx_file, reference, tmp_path, capsys):
    images, _ = reference
    png, jpeg = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(images[0]).resize((90, 50)).save(png)
    Image.fromarray(images[1]).resize((64, 64)).save(jpeg, quality=95)
    classifier = OnnxClassifier(onnx_file)
    loaded = predict.load_image(png, 32, 32, 3)
    assert loaded.shape == (32, 32, 3) and loaded.dtype == np.uint8
    expected = classifier.class_names[int(classifier.run(loaded[None]).argmax())]

    assert predict.main(["--model", str(onnx_file), str(png), str(jpeg), "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{png}: {expected} ")
    probabilities = [float(p) for p in lines[0].split(": ", 1)[1].replace(",", "").split()[1::2]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1.001


@pytest.mark.parametrize("content", [None, b"", b"not an onnx model" * 10])
def test_predict_bad_model_file_is_one_line_error(tmp_path, capsys, content):
    model = tmp_path / "model.onnx"
    if content is not None:
        model.write_bytes(content)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    assert predict.main(["--model", str(model), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {model}: ") and err.count("\n") == 1


def test_predict_bad_image_is_one_line_error(onnx_file, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert predict.main(["--model", str(onnx_file), str(text)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {text}: not a readable image (UnidentifiedImageError)\n"


@pytest.mark.slow  # distills a student (~30 s on 2 cores)
def test_report_matches_training_figures(teacher_run, student_run, data_dir, tmp_path, capsys):
    plot, table = tmp_path / "report.png", tmp_path / "report.json"
    assert report.main([str(teacher_run), str(student_run), "--data-dir", data_dir,
                        "--plot", str(plot), "--json", str(table), "--latency-runs", "5"]) == 0
    assert plot.read_bytes().startswith(b"\x89PNG")
    teacher, student = json.loads(table.read_text())
    assert "teacher_agreement" in capsys.readouterr().out
    assert teacher["teacher_agreement"] == 1.0
    tolerance = 1 / TEST_IMAGES  # ONNX and JAX may split a single near-tie differently
    for row, run in ((teacher, teacher_run), (student, student_run)):
        summary = json.loads((run / "summary.json").read_text())
        assert row["params"] == summary["params"]
        assert abs(row["test_accuracy"] - summary["test_accuracy"]) <= tolerance
        assert row["mflops"] > 0 and row["file_mb"] > 0 and row["latency_ms"] > 0
    assert abs(student["teacher_agreement"] - json.loads(
        (student_run / "summary.json").read_text())["agreement"]) <= tolerance
    assert student["mflops"] < teacher["mflops"] and student["params"] < teacher["params"]

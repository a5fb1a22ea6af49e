"""Export, onnxruntime check, int8, predict and the deployment report, on a tiny model (CPU).

The runs train for one epoch on a synthetic CIFAR-10 folder written here (random pixels and
labels, in the real binary layout), so these tests need neither the dataset nor a network.
The teacher fits the first TRAIN_SUBSET - VALIDATION training images: int8 calibration may
read those and nothing else.
"""

import importlib.util
import json
import os
import re
import sys

import numpy as np
import onnx  # noqa: E402
import pytest
from _helpers import write_cifar_binary
from PIL import Image  # noqa: E402

from kd_jax import export, predict, quantize, report  # noqa: E402
from kd_jax.cli.config import DistillConfig, TeacherConfig  # noqa: E402
from kd_jax.cli.jobs import distill, train_teacher  # noqa: E402
from kd_jax.core.data import CIFAR10_CLASSES, load_dataset  # noqa: E402
from kd_jax.onnx_model import OnnxClassifier  # noqa: E402

TRAIN_PER_FILE, TEST_IMAGES = 64, 300
TRAIN_SUBSET, VALIDATION = 256, 64  # of the teacher: it fits the first 192 of 320 images


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    rng = np.random.default_rng(0)  # one stream through the six files, in order

    def noise(n, i):
        labels = rng.integers(0, 10, (n, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        return np.concatenate([labels, pixels], axis=1).tobytes()

    folder = tmp_path_factory.mktemp("data") / "cifar-10-batches-bin"
    return str(write_cifar_binary(folder, TRAIN_PER_FILE, TEST_IMAGES, records=noise))


def _tiny(**kwargs):
    return dict(epochs=1, batch_size=64, eval_batch_size=100, progress=False, **kwargs)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("runs") / "teacher"
    train_teacher(TeacherConfig(**_tiny(data_dir=data_dir, workdir=str(workdir),
                                        model="resnet8", width=8, train_subset=TRAIN_SUBSET,
                                        validation=VALIDATION)))
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


@pytest.fixture(scope="module")
def int8_export(teacher_run, data_dir, onnx_file):
    """The teacher's int8 model next to its float file, calibrated on 100 of its images."""
    model = export.load_inference_model(teacher_run, data_dir)
    images, labels = export.check_set(model, None)
    result = quantize.export_int8(onnx_file, quantize.calibration_images(model, 100), images,
                                  labels, batch_size=100)
    assert result.path == teacher_run / "export" / "model.int8.onnx"
    return result


def _accuracy(path, images, labels):
    return float(np.mean(OnnxClassifier(path).logits(images).argmax(-1) == labels))


def _ops_after_input(model, n):
    """The first ``n`` operators from the graph's input on, following the first consumer."""
    ops, tensor = [], model.graph.input[0].name
    for _ in range(n):
        node = next(node for node in model.graph.node if tensor in node.input)
        ops.append(node.op_type)
        tensor = node.output[0]
    return ops


def _fitted_images(data_dir):
    return load_dataset("cifar10", data_dir).train_images[:TRAIN_SUBSET - VALIDATION]


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
    assert printed.startswith(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB)\n")
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
    # 1000 images whose top two logits (of size 10) are 1e-4 apart: a tiny drift can flip
    # the top-1.
    reference = np.tile(np.eye(10, dtype=np.float32), (100, 1)) * 1e-4 + np.float32(10)
    assert export.compare_logits(reference.copy(), reference).passed
    one_flip = reference.copy()
    one_flip[0] = np.roll(one_flip[0], 1)  # 1 of 1000 disagrees (99.9%): allowed
    assert export.compare_logits(one_flip, reference).passed
    one_flip[1] = np.roll(one_flip[1], 1)
    assert not export.compare_logits(one_flip, reference).passed
    drift = reference + np.float32(2e-3)  # same top-1 everywhere, logits off by 2e-4 of 10
    result = export.compare_logits(drift, reference)
    assert result.agreement == 1.0 and not result.passed


def test_relative_check_accepts_float_reordering_noise_at_any_scale():
    # A barely trained ResNet-18's logits reach ~8e3; float32 reordering then moves them by
    # ~6e-3 (what the old fixed 1e-3 bound refused) while every top-1 stays the same.
    rng = np.random.default_rng(0)
    reference = (rng.standard_normal((1000, 10)) * 2e3).astype(np.float32)
    reference[0, 0] = 8e3
    noisy = reference + rng.uniform(-6e-3, 6e-3, reference.shape).astype(np.float32)
    result = export.compare_logits(noisy, reference)
    assert result.agreement == 1.0 and result.max_abs_diff > 5e-3 and result.passed
    # The same relative error on small logits passes too; ten times the bound does not.
    assert export.compare_logits(noisy / 1e4, reference / 1e4).passed
    off = reference * (1 + 10 * export.MAX_RELATIVE_DIFF)
    assert export.compare_logits(off, reference).agreement == 1.0
    assert not export.compare_logits(off, reference).passed


def _with_initializer(proto, tensor_name, change):
    tensor = next(t for t in proto.graph.initializer if t.name == tensor_name)
    tensor.CopyFrom(onnx.numpy_helper.from_array(change(onnx.numpy_helper.to_array(tensor)),
                                                 tensor.name))


@pytest.mark.parametrize("wrong", ["first conv weights x 1.01", "every logit + 1e-3 of max"])
def test_check_refuses_a_wrong_export(onnx_file, teacher_run, data_dir, reference, tmp_path,
                                      wrong):
    """A deliberately wrong file fails the check; the real one passes. Adding the same amount
    to every logit leaves every top-1 as it was: only the logit bound can refuse it."""
    model = export.load_inference_model(teacher_run, data_dir)
    images, expected = reference
    assert export.check_export(onnx_file, "onnx", model, images, 100).passed
    proto = onnx.load(onnx_file)
    nodes = {node.op_type: node for node in reversed(proto.graph.node)}  # the first of each
    if wrong.startswith("first conv"):
        _with_initializer(proto, nodes["Conv"].input[1], lambda w: w * np.float32(1.01))
    else:
        shift = np.float32(1e-3 * np.abs(expected).max())
        _with_initializer(proto, nodes["Gemm"].input[2], lambda b: b + shift)
    onnx.save(proto, tmp_path / "wrong.onnx")
    result = export.check_export(tmp_path / "wrong.onnx", "onnx", model, images, 100)
    assert result.relative_diff > 5 * export.MAX_RELATIVE_DIFF and not result.passed
    if not wrong.startswith("first conv"):
        assert result.agreement == 1.0


def test_int8_file_keeps_uint8_nhwc_input_and_quantizes_per_channel(int8_export, onnx_file):
    model = onnx.load(int8_export.path)
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}  # QDQ: standard ops
    init = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    made_by = {out: node for node in model.graph.node for out in node.output}
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    assert len(convs) == 9  # resnet8: stem, 3 blocks of 2, 2 projections
    for conv in convs:
        weight = made_by[conv.input[1]]  # DequantizeLinear(int8 weights, per-channel scales)
        q, scale = init[weight.input[0]], init[weight.input[1]]
        assert weight.op_type == "DequantizeLinear" and q.dtype == np.int8
        assert scale.shape == (q.shape[0],)
        activation = made_by[conv.input[0]]
        assert activation.op_type == "DequantizeLinear"
        assert init[activation.input[2]].dtype == np.uint8
    # The pixels are normalized inside the graph, in float, as in the float file.
    float_model = onnx.load(onnx_file)
    assert _ops_after_input(model, 4) == _ops_after_input(float_model, 4) == [
        "Cast", "Div", "Sub", "Div"]
    # The weights shrink about fourfold. (The whole file shrinks less at this width: a SiLU
    # net's quantize/dequantize nodes around each Sigmoid and Mul are a fixed cost.)
    float_bytes = sum(onnx.numpy_helper.to_array(t).nbytes for t in float_model.graph.initializer)
    assert sum(a.nbytes for a in init.values()) < float_bytes / 3
    classifier = OnnxClassifier(int8_export.path)
    assert classifier.class_names == CIFAR10_CLASSES
    assert "100 training images" in classifier.metadata["quantization"]


def test_int8_check_reports_accuracy_beside_float_and_agreement(int8_export, onnx_file,
                                                                teacher_run, data_dir):
    dataset = export.load_inference_model(teacher_run, data_dir).dataset
    images, labels = dataset.test_images, dataset.test_labels
    check = int8_export.check
    assert check.images == TEST_IMAGES
    assert check.float_accuracy == _accuracy(onnx_file, images, labels)
    assert check.int8_accuracy == _accuracy(int8_export.path, images, labels)
    int8_top1 = OnnxClassifier(int8_export.path).logits(images).argmax(-1)
    float_top1 = OnnxClassifier(onnx_file).logits(images).argmax(-1)
    assert check.agreement == float(np.mean(int8_top1 == float_top1)) > 0.5
    assert check.passed and check.describe() == (
        f"int8 vs float on {TEST_IMAGES} test images: accuracy {100 * check.int8_accuracy:.2f}% "
        f"vs {100 * check.float_accuracy:.2f}% (drop {check.drop:.2f} points, allowed 1), "
        f"same top-1 on {100 * check.agreement:.2f}%: OK")


def test_int8_check_compares_the_two_files_it_is_given(onnx_file, teacher_run, data_dir,
                                                       tmp_path):
    """The tiny teacher gives every test image one class, so its int8 twin agrees trivially:
    here the second file favours another class, and the figures must follow."""
    dataset = export.load_inference_model(teacher_run, data_dir).dataset
    images, labels = dataset.test_images, dataset.test_labels
    float_top1 = OnnxClassifier(onnx_file).logits(images).argmax(-1)
    other = int((np.bincount(float_top1, minlength=10).argmax() + 1) % 10)
    proto = onnx.load(onnx_file)
    head = next(node for node in proto.graph.node if node.op_type == "Gemm")
    _with_initializer(proto, head.input[2], lambda b: b + np.float32(100) * (np.arange(10) ==
                                                                             other))
    onnx.save(proto, tmp_path / "other.onnx")
    check = quantize.check_int8(onnx_file, tmp_path / "other.onnx", images, labels, 100, 1.0)
    assert check.agreement == float(np.mean(float_top1 == other))
    assert check.float_accuracy == float(np.mean(float_top1 == labels))
    assert check.int8_accuracy == float(np.mean(labels == other))
    assert check.passed == (check.drop <= 1.0)
    assert check.drop == pytest.approx(100 * (check.float_accuracy - check.int8_accuracy))


def test_int8_export_cli_writes_and_checks_it(teacher_run, data_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert export.main(["--workdir", str(teacher_run), "--data-dir", data_dir, "--output",
                        str(out), "--int8", "--calibration-images", "50",
                        "--check-images", "120"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith(f"wrote {tmp_path / 'm.int8.onnx'} (")
    assert lines[2].endswith("static int8, calibrated on 50 training images")
    assert lines[0] == f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB)"
    int8 = tmp_path / "m.int8.onnx"
    assert lines[2].startswith(f"wrote {int8} ({os.path.getsize(int8) / 1e6:.2f} MB): ")
    assert re.fullmatch(r"int8 vs float on 120 test images: accuracy \d+\.\d\d% vs \d+\.\d\d% "
                        r"\(drop -?\d+\.\d\d points, allowed 1\), same top-1 on "
                        r"\d+\.\d\d%: OK", lines[3])


def test_int8_accuracy_below_tolerance_fails_in_one_line(teacher_run, data_dir, tmp_path,
                                                         capsys):
    out = tmp_path / "m.onnx"
    # A tolerance of -100 points asks the int8 model to beat the float one by 100 points.
    assert export.main(["--workdir", str(teacher_run), "--data-dir", data_dir, "--output",
                        str(out), "--int8", "--calibration-images", "50",
                        "--int8-tolerance", "-100"]) == 2
    captured = capsys.readouterr()
    int8, dataset = tmp_path / "m.int8.onnx", load_dataset("cifar10", data_dir)
    float_accuracy = 100 * _accuracy(out, dataset.test_images, dataset.test_labels)
    int8_accuracy = 100 * _accuracy(int8, dataset.test_images, dataset.test_labels)
    assert captured.out.rstrip().endswith("FAILED")
    assert captured.err == (
        f"error: {int8}: int8 accuracy {int8_accuracy:.2f}% is "
        f"{float_accuracy - int8_accuracy:.2f} points below the float model's "
        f"{float_accuracy:.2f}%, more than the tolerance of -100\n")


@pytest.mark.parametrize("requested", [50, 1000])
def test_calibration_reads_only_images_the_run_fitted(teacher_run, data_dir, tmp_path,
                                                      monkeypatch, requested):
    """Every batch onnxruntime's calibrator reads: fitted training images only, never a test
    or validation image; all of them when more are asked for than the run fitted."""
    seen = []
    make_reader = quantize._reader

    def spying(images, input_name, batch_size):
        reader = make_reader(images, input_name, batch_size)
        get_next = reader.get_next

        def recorded():
            batch = get_next()
            if batch is not None:
                seen.extend(image.tobytes() for image in batch[input_name])
            return batch

        reader.get_next = recorded
        return reader

    monkeypatch.setattr(quantize, "_reader", spying)
    assert export.main(["--workdir", str(teacher_run), "--data-dir", data_dir, "--output",
                        str(tmp_path / "m.onnx"), "--int8", "--calibration-images",
                        str(requested), "--check-images", "10"]) == 0
    dataset = load_dataset("cifar10", data_dir)
    fitted = {image.tobytes() for image in _fitted_images(data_dir)}
    others = {image.tobytes() for image in np.concatenate(
        [dataset.test_images, dataset.train_images[TRAIN_SUBSET - VALIDATION:]])}
    assert len(seen) == len(set(seen)) == min(requested, len(fitted))
    assert set(seen) <= fitted and not set(seen) & others


def test_calibration_images_flag_is_checked_before_exporting(teacher_run, data_dir, tmp_path,
                                                             capsys):
    out = tmp_path / "m.onnx"
    assert export.main(["--workdir", str(teacher_run), "--data-dir", data_dir, "--output",
                        str(out), "--int8", "--calibration-images", "0"]) == 2
    assert capsys.readouterr().err == "error: --calibration-images must be >= 1, got 0\n"
    assert not out.exists()


def test_int8_needs_the_onnx_format(tmp_path, capsys):
    assert export.main(["--workdir", str(tmp_path), "--format", "stablehlo", "--int8"]) == 2
    assert capsys.readouterr().err == (
        "error: --int8 quantizes the ONNX model: use it with --format onnx\n")


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


def test_predict_prints_the_softmax_of_the_onnx_logits(onnx_file, reference, tmp_path, capsys):
    """The top 3 of each image, most probable first, with the probabilities numpy's softmax
    gives the ONNX model's logits on the images as predict loads them; two images in one call."""
    images, _ = reference
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for image, path in zip(images[:2], paths, strict=True):
        Image.fromarray(image).save(path)
    classifier = OnnxClassifier(onnx_file)
    loaded = np.stack([predict.load_image(path, 32, 32, 3) for path in paths])
    logits = classifier.run(loaded).astype(np.float64)
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities = exp / exp.sum(-1, keepdims=True)
    expected = []
    for path, p in zip(paths, probabilities, strict=True):
        top = np.argsort(-p)[:3]
        assert p[top[0]] > p[top[1]] > p[top[2]] > p[np.argsort(-p)[3]]  # no tie to order
        expected.append(f"{path}: " + ", ".join(f"{CIFAR10_CLASSES[i]} {p[i]:.3f}" for i in top))
    assert predict.main(["--model", str(onnx_file), *map(str, paths), "--top", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == expected


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


def test_predict_runs_the_int8_file(int8_export, reference, tmp_path, capsys):
    images, _ = reference
    png = tmp_path / "a.png"
    Image.fromarray(images[0]).save(png)
    classifier = OnnxClassifier(int8_export.path)
    probabilities = predict.softmax(classifier.run(predict.load_image(png, 32, 32, 3)[None])
                                    .astype(np.float64))[0]
    top = np.argsort(-probabilities, kind="stable")[:2]
    assert predict.main(["--model", str(int8_export.path), str(png), "--top", "2"]) == 0
    assert capsys.readouterr().out == f"{png}: " + ", ".join(
        f"{CIFAR10_CLASSES[i]} {probabilities[i]:.3f}" for i in top) + "\n"


def test_torch_twin_computes_the_runs_logits(teacher_run, data_dir, reference):
    pytest.importorskip("torch")
    runtime = report.torch_runtime(export.load_inference_model(teacher_run, data_dir), 1)
    images, expected = reference
    np.testing.assert_allclose(runtime.run(images[:50]), expected[:50], atol=1e-4)


def test_report_without_torch_skips_its_row_with_a_note(teacher_run, data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    model = export.load_inference_model(teacher_run, data_dir)
    assert report.torch_runtime(model, 1) == (
        "PyTorch is not installed: no PyTorch rows (pip install torch)")


@pytest.mark.parametrize(("option", "value", "missing"), [
    ("whiten_patch", 2, "whitening layer"), ("logit_scale", 1 / 9, "logit scale")])
def test_report_has_no_torch_row_for_a_net_the_twin_cannot_compute(
        teacher_run, data_dir, monkeypatch, option, value, missing):
    model = export.load_inference_model(teacher_run, data_dir)
    monkeypatch.setitem(model.frozen.config, option, value)
    assert report.torch_runtime(model, 1) == f"the PyTorch twin has no {missing}: no PyTorch row"


def test_report_puts_int8_torch_and_jax_beside_float(teacher_run, int8_export, data_dir,
                                                     tmp_path, capsys, onnx_file):
    table, affinity = tmp_path / "report.json", os.sched_getaffinity(0)
    assert report.main([str(teacher_run), "--data-dir", data_dir, "--plot",
                        str(tmp_path / "r.png"), "--json", str(table), "--threads", "1",
                        "--repeats", "2", "--latency-runs", "2"]) == 0
    assert os.sched_getaffinity(0) == affinity  # pinned while measuring only
    out = capsys.readouterr().out
    assert out.startswith(f"CPU: {report.hardware()}; threads per runtime: 1, pinned to "
                          f"cores {min(affinity)};")
    rows = {row["runtime"]: row for row in json.loads(table.read_text())}
    has_torch = importlib.util.find_spec("torch") is not None
    assert list(rows) == ["onnxruntime float32", "onnxruntime int8",
                          *(["pytorch eager float32"] if has_torch else []), "jax jit float32"]
    assert has_torch or "note: teacher: PyTorch is not installed" in out
    float_row, int8_row = rows.pop("onnxruntime float32"), rows.pop("onnxruntime int8")
    assert int8_row["test_accuracy"] == int8_export.check.int8_accuracy
    assert int8_row["float_agreement"] == int8_export.check.agreement
    assert int8_row["file_mb"] == os.path.getsize(int8_export.path) / 1e6 < float_row["file_mb"]
    assert float_row["file_mb"] == os.path.getsize(onnx_file) / 1e6
    assert float_row["float_agreement"] == float_row["teacher_agreement"] == 1.0
    for row in rows.values():  # the same float network in another runtime
        assert row["file_mb"] == ""
        assert row["float_agreement"] >= 1 - 1 / TEST_IMAGES
        assert abs(row["test_accuracy"] - float_row["test_accuracy"]) <= 1 / TEST_IMAGES
    for row in (float_row, int8_row, *rows.values()):
        assert row["params"] == float_row["params"] and row["mflops"] == float_row["mflops"]
        assert row["latency_ms"] > 0 and row["images_per_second"] > 0


@pytest.mark.slow  # distills a student (~30 s on 2 cores)
def test_report_matches_training_figures(teacher_run, student_run, data_dir, tmp_path, capsys):
    plot, table = tmp_path / "report.png", tmp_path / "report.json"
    assert report.main([str(teacher_run), str(student_run), "--data-dir", data_dir,
                        "--plot", str(plot), "--json", str(table), "--repeats", "1",
                        "--latency-runs", "5"]) == 0
    assert plot.read_bytes().startswith(b"\x89PNG")
    teacher, student = (row for row in json.loads(table.read_text())
                        if row["runtime"] == "onnxruntime float32")
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


def test_export_exits_non_zero_when_its_check_fails(teacher_run, data_dir, tmp_path, capsys,
                                                    monkeypatch):
    """No flag sets the float check's thresholds: an agreement above 100% stands in for a
    file that does not reproduce the model. The command says so in one line and exits 2."""
    monkeypatch.setattr(export, "MIN_AGREEMENT", 1.01)
    out = tmp_path / "m.onnx"
    assert export.main(["--workdir", str(teacher_run), "--data-dir", data_dir, "--output",
                        str(out), "--check-images", "20"]) == 2
    captured = capsys.readouterr()
    assert re.fullmatch(r"onnxruntime vs JAX on 20 test images: same top-1 on 100\.00% \(need "
                        r">= 101\.0%\), max \|logit diff\| .*: FAILED",
                        captured.out.splitlines()[-1])
    assert captured.err == f"error: {out} does not reproduce the JAX model closely enough\n"


def test_predict_missing_image_and_top_zero_are_one_line_errors(onnx_file, reference, tmp_path,
                                                                capsys):
    """Every image is read before any line is printed: a missing one leaves no partial
    output."""
    images, _ = reference
    present, missing = tmp_path / "a.png", tmp_path / "missing.png"
    Image.fromarray(images[0]).save(present)
    assert predict.main(["--model", str(onnx_file), str(present), str(missing)]) == 2
    assert capsys.readouterr() == ("", f"error: {missing}: image file not found\n")
    assert predict.main(["--model", str(onnx_file), str(present), "--top", "0"]) == 2
    assert capsys.readouterr() == ("", "error: --top must be >= 1, got 0\n")

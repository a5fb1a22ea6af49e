"""Static int8 quantization of an exported ONNX model, checked against the float model.

    python -m kd_jax.export --workdir RUN --int8   # RUN/export/model.onnx and model.int8.onnx

onnxruntime's ``quantize_static`` rewrites the float file (BatchNorm already folded) in the QDQ
format: every convolution and the dense head get int8 weights (symmetric, one scale per
output channel), and they and the residual Adds read uint8 activations, through standard
QuantizeLinear / DequantizeLinear pairs that onnxruntime fuses into integer kernels
(QLinearConv, QLinearAdd, QGemm) when it loads the file. QDQ rather than QOperator: the file
keeps standard ONNX operators any runtime reads, where QOperator writes Microsoft-domain ones
for the Add and the head. uint8 rather than int8 activations: on x86, onnxruntime 1.32 fused
only 3 of a resnet8's 9 int8-activation convolutions and ran the other 6 as float
convolutions between dequantize and quantize nodes (docs/export.md). The input stays uint8
NHWC pixels, normalized inside the graph, as in the float file.

Activation ranges are calibrated (min/max) on a fixed random sample of the training images the
run fitted (``InferenceModel.training_images``): never a test or validation image. The check
then classifies the test images with both files and fails when the int8 model's top-1 accuracy
is more than a tolerance (points) below the float model's.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kd_jax.core import metrics
from kd_jax.errors import KdError
from kd_jax.onnx_model import METADATA_PREFIX, OnnxClassifier

if TYPE_CHECKING:
    from kd_jax.export import InferenceModel

CALIBRATION_IMAGES = 512
CALIBRATION_SEED = 0
TOLERANCE_POINTS = 1.0  # top-1 accuracy the int8 model may lose against the float one


def int8_path(float_path: Path) -> Path:
    """Where the int8 twin of a float ONNX file goes: ``model.onnx`` -> ``model.int8.onnx``."""
    return float_path.with_name(f"{float_path.stem}.int8.onnx")


def calibration_images(model: InferenceModel, n: int = CALIBRATION_IMAGES) -> np.ndarray:
    """``n`` of the images the run fitted (all of them if it fitted fewer), a fixed random
    sample so that every part of the training set is represented, in training-set order."""
    if n < 1:
        raise KdError(f"--calibration-images must be >= 1, got {n}")
    fitted = model.training_images()
    chosen = np.random.default_rng(CALIBRATION_SEED).choice(len(fitted), min(n, len(fitted)),
                                                            replace=False)
    return fitted[np.sort(chosen)]


def _reader(images: np.ndarray, input_name: str, batch_size: int):  # noqa: ANN202
    """onnxruntime's calibration reader over ``images``, ``batch_size`` at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(images), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.starts, None)
            return None if start is None else {input_name: images[start:start + batch_size]}

    return Batches()


def quantize(float_path: Path, output: Path, images: np.ndarray, batch_size: int) -> None:
    """Write the static int8 (QDQ, per-channel) model of ``float_path``, calibrated on
    ``images``, with the float file's metadata and what was done stated in it."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = OnnxClassifier(float_path).input_name
    with tempfile.TemporaryDirectory() as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        # Shape inference only: the float file already had onnxruntime's basic rewrites.
        quant_pre_process(str(float_path), str(prepared), skip_optimization=True)
        with _root_logger_at_error():
            quantize_static(str(prepared), str(quantized), _reader(images, input_name, batch_size),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        proto = onnx.load(str(quantized))
    props = {p.key: p.value for p in proto.metadata_props}
    props[f"{METADATA_PREFIX}quantization"] = (
        f"static int8 (QDQ): uint8 activations, int8 per-channel weights; min/max "
        f"calibration on {len(images)} training images")
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto, full_check=True)
    try:
        output.write_bytes(proto.SerializeToString())
    except OSError as e:
        raise KdError(f"{output}: cannot write ({e.strerror})") from None


@contextlib.contextmanager
def _root_logger_at_error() -> Iterator[None]:
    """onnxruntime's quantizer logs its progress and advice to the root logger as warnings,
    which would bury the check's one-line result: silence them while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@dataclass(frozen=True)
class Int8Check:
    """The int8 model beside the float model it was made from, on the same test images."""

    images: int
    float_accuracy: float
    int8_accuracy: float
    agreement: float  # fraction of images where both give the same top-1 class
    tolerance: float  # points of accuracy the int8 model may lose

    @property
    def drop(self) -> float:
        """Points of top-1 accuracy lost by quantizing (negative: gained)."""
        return 100 * (self.float_accuracy - self.int8_accuracy)

    @property
    def passed(self) -> bool:
        return self.drop <= self.tolerance

    def describe(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        return (f"int8 vs float on {self.images} test images: accuracy "
                f"{100 * self.int8_accuracy:.2f}% vs {100 * self.float_accuracy:.2f}% (drop "
                f"{self.drop:.2f} points, allowed {self.tolerance:g}), same top-1 on "
                f"{100 * self.agreement:.2f}%: {verdict}")

    def failure(self, path: Path) -> str:
        return (f"{path}: int8 accuracy {100 * self.int8_accuracy:.2f}% is {self.drop:.2f} "
                f"points below the float model's {100 * self.float_accuracy:.2f}%, more than "
                f"the tolerance of {self.tolerance:g}")


def check_int8(float_path: Path, path: Path, images: np.ndarray, labels: np.ndarray,
               batch_size: int, tolerance: float) -> Int8Check:
    """Classify ``images`` with both files; their accuracies and top-1 agreement."""
    float_logits = OnnxClassifier(float_path).logits(images, batch_size)
    int8_logits = OnnxClassifier(path).logits(images, batch_size)
    accuracy = lambda logits: metrics.classification_metrics(logits, labels)["test_accuracy"]
    return Int8Check(len(images), accuracy(float_logits), accuracy(int8_logits),
                     metrics.agreement(int8_logits, float_logits), tolerance)


@dataclass(frozen=True)
class Int8Export:
    path: Path
    check: Int8Check


def export_int8(float_path: Path, calibration: np.ndarray, images: np.ndarray,
                labels: np.ndarray, batch_size: int = 256,
                tolerance: float = TOLERANCE_POINTS) -> Int8Export:
    """Quantize a float ONNX file, calibrated on ``calibration`` (from
    :func:`calibration_images`), to :func:`int8_path`, and check it on the test ``images``;
    the caller decides what a failed check means."""
    path = int8_path(float_path)
    quantize(float_path, path, calibration, batch_size)
    return Int8Export(path, check_int8(float_path, path, images, labels, batch_size, tolerance))

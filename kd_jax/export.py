"""Export a trained run for deployment: ONNX (checked in onnxruntime) or serialized StableHLO.

    python -m kd_jax.export --workdir RUN --format onnx        # RUN/export/model.onnx
    python -m kd_jax.export --workdir RUN --format stablehlo   # RUN/export/model.stablehlo
    python -m kd_jax.export --workdir RUN --int8    # also RUN/export/model.int8.onnx, checked

The exported function is the model in inference mode, its BatchNorm running statistics fixed,
with the input normalization inside the graph, so a deployment feeds decoded pixels as they are:

    input  ``images``  uint8 [B, H, W, C] (32x32 RGB for CIFAR-10), values 0..255, NHWC;
                       the batch dimension B is dynamic.
    output ``logits``  float32 [B, num_classes]; softmax gives probabilities.

ONNX is written by jax2onnx, which converts the traced JAX program (jaxpr) to ONNX directly.
The alternative, jax2tf + tf2onnx, needs TensorFlow, and tf2onnx cannot read the StableHLO that
current jax2tf emits (its graph-mode serialization was removed from JAX). onnxruntime then
applies its hardware-independent ("basic") graph rewrites once, at export: among them it
folds every BatchNormalization into the preceding convolution's weights, and the file keeps
only standard ONNX operators. The class names, dataset and source run are stored in the ONNX
metadata (``kd_jax.*`` keys), so the file alone is enough to classify images.

After writing, the command compares the file against JAX on the test set (``--check-images``
limits how many) and exits non-zero unless the two give the same top-1 class on at least
99.9% of the images and no logit differs by more than 1e-4 of the largest |logit|: float32
rounding, which the reordering of sums in another runtime changes, grows with the size of the
numbers, so a fixed absolute bound refused a barely trained ResNet-18 that a relative one
accepts, while a wrong conversion still misses it by orders of magnitude. With ``--int8`` the
float file is then quantized (:mod:`kd_jax.quantize`) and the int8 model checked against it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import quantize
from kd_jax.core import metrics
from kd_jax.core.augment import Augmentation, normalize
from kd_jax.core.checkpoint import FrozenModel, load_frozen
from kd_jax.core.data import DATA_DIR_ENV, Dataset, load_dataset
from kd_jax.core.devices import make_mesh
from kd_jax.core.evaluation import make_predict
from kd_jax.errors import KdError, run_guarded
from kd_jax.onnx_model import METADATA_PREFIX

FORMATS = {"onnx": "model.onnx", "stablehlo": "model.stablehlo"}
MIN_AGREEMENT = 0.999
# The largest |logit difference| allowed, as a fraction of the largest |logit| (see Comparison):
# float32 reordering stays far below it, a wrongly converted layer far above (docs/export.md).
MAX_RELATIVE_DIFF = 1e-4
ONNX_OPSET = 18  # jax2onnx emits ReduceMean with axes as an input, which needs 18
# Where a StableHLO artifact may run; lowering for a platform needs no such device here.
STABLEHLO_PLATFORMS = ("cpu", "cuda", "tpu")

Logits = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class InferenceModel:
    """A run's trained model as a pure function of uint8 NHWC images, with what describes it."""

    frozen: FrozenModel
    dataset: Dataset
    module: nn.Module  # float32, whatever dtype the run trained in
    name: str

    def forward(self, variables: dict, images: jax.Array) -> jax.Array:
        """uint8 [B, H, W, C] -> float32 logits [B, K] for any ``variables`` of the network;
        taking them as an argument keeps a jitted program from baking in the weights."""
        x = normalize(images, self.dataset.mean, self.dataset.std)
        return self.module.apply(variables, x, train=False)

    def apply(self, images: jax.Array) -> jax.Array:
        """The run's trained model: what is exported."""
        return self.forward(self.frozen.variables, images)

    def training_images(self) -> np.ndarray:
        """The training images the run fitted: its first ``train_subset`` (all without one)
        less the last ``validation``. Never a test or validation image: int8 calibration."""
        config = self.frozen.config
        (images, _), _ = self.dataset.take_train(config.get("train_subset")).hold_out(
            config.get("validation", 0))
        return images

    @property
    def width(self) -> int | None:
        return getattr(self.module, "width", None)

    @property
    def input_spec(self) -> jax.ShapeDtypeStruct:
        """uint8 images with a symbolic batch dimension ``B``."""
        h, w, c = self.dataset.image_shape
        return jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"B, {h}, {w}, {c}"), jnp.uint8)

    def metadata(self) -> dict[str, str]:
        """What a deployment needs besides the graph; strings, as ONNX metadata holds."""
        h, w, c = self.dataset.image_shape
        return {f"{METADATA_PREFIX}{k}": v for k, v in {
            "class_names": json.dumps(list(self.dataset.class_names)),
            "dataset": self.dataset.name,
            "model": self.name,
            "width": str(self.width),
            "input": f"uint8 [B, {h}, {w}, {c}] NHWC, values 0..255; normalized inside the graph",
            "mean": json.dumps(list(self.dataset.mean)),
            "std": json.dumps(list(self.dataset.std)),
            "checkpoint": str(self.frozen.checkpoint),
        }.items()}

    def reference(self, batch_size: int) -> Logits:
        """JAX logits from the training code's own evaluator, in full float32 precision."""
        augmentation = Augmentation(0, False, self.dataset.mean, self.dataset.std)
        predict = make_predict(self.module, augmentation, batch_size, make_mesh())
        variables = jax.device_put(self.frozen.variables)

        def logits(images: np.ndarray) -> np.ndarray:
            with jax.default_matmul_precision("highest"):
                return np.asarray(predict(variables, images))

        return logits


def load_inference_model(workdir: str | Path, data_dir: str | None = None) -> InferenceModel:
    """The frozen model of a teacher or student run, and the dataset it was trained on.

    The data is found at ``data_dir``, else ``$KD_JAX_DATA_DIR``, else where the run read it.
    """
    frozen = load_frozen(workdir)
    name, _ = frozen.model_spec
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or frozen.config.get("data_dir")
    dataset = load_dataset(frozen.config.get("dataset", "cifar10"), data_dir)
    return InferenceModel(frozen, dataset, frozen.build(dataset.num_classes), name)


# --------------------------------------------------------------------------- ONNX
def to_onnx_bytes(model: InferenceModel) -> bytes:
    """Convert with jax2onnx, then let onnxruntime fold BatchNorm into the convolutions."""
    import onnx
    from jax2onnx import to_onnx

    proto = to_onnx(model.apply, [model.input_spec], model_name=f"kd_jax_{model.name}",
                    opset=ONNX_OPSET, input_names=["images"], output_names=["logits"])
    # jax2onnx 0.17 leaves NHWC shape annotations on tensors its layout pass turned NCHW;
    # onnxruntime then refuses the residual Adds. The annotations are optional: drop them.
    del proto.graph.value_info[:]
    proto = _basic_optimizations(proto.SerializeToString())
    onnx.helper.set_model_props(proto, model.metadata())
    proto.doc_string = f"{model.name} (width {model.width}) on {model.dataset.name}: " \
                       f"images uint8 NHWC 0..255 -> logits"
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def _basic_optimizations(model_bytes: bytes):  # noqa: ANN202 - onnx.ModelProto, imported lazily
    """onnxruntime's portable rewrites (constant folding, Conv+BatchNorm fusion), saved.

    Only the default domain's operators remain, so unused extra opset imports are dropped.
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        proto = onnx.load(options.optimized_model_filepath)
    used = {node.domain for node in proto.graph.node}
    kept = [o for o in proto.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto


# --------------------------------------------------------------------------- StableHLO
def to_stablehlo_bytes(model: InferenceModel) -> bytes:
    """``jax.export`` serialization; ``jax.export.deserialize(data).call(images)`` runs it."""
    exported = jax.export.export(jax.jit(model.apply), platforms=STABLEHLO_PLATFORMS)(
        model.input_spec)
    return bytes(exported.serialize())


def stablehlo_logits(path: Path) -> Logits:
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return lambda images: np.asarray(exported.call(images))


# --------------------------------------------------------------------------- the check
@dataclass(frozen=True)
class Comparison:
    """How closely an exported model reproduces JAX's logits."""

    images: int
    agreement: float  # fraction of images with the same top-1 class
    max_abs_diff: float
    logit_scale: float  # the largest |logit| JAX gives on these images

    @property
    def relative_diff(self) -> float:
        """The largest |logit difference| as a fraction of the largest |logit|: float32
        rounding grows with the size of the numbers summed, so this is what stays put as a
        network gets deeper or its logits larger."""
        if self.logit_scale > 0:
            return self.max_abs_diff / self.logit_scale
        return 0.0 if self.max_abs_diff == 0 else math.inf

    @property
    def passed(self) -> bool:
        return self.agreement >= MIN_AGREEMENT and self.relative_diff < MAX_RELATIVE_DIFF

    def describe(self, runtime: str) -> str:
        verdict = "OK" if self.passed else "FAILED"
        return (f"{runtime} vs JAX on {self.images} test images: same top-1 on "
                f"{100 * self.agreement:.2f}% (need >= {100 * MIN_AGREEMENT:.1f}%), max |logit "
                f"diff| {self.max_abs_diff:.2e} = {self.relative_diff:.1e} of the largest "
                f"|logit| {self.logit_scale:.3g} (need < {MAX_RELATIVE_DIFF:g}): {verdict}")


def compare_logits(exported: np.ndarray, reference: np.ndarray) -> Comparison:
    if exported.shape != reference.shape:
        raise KdError(f"exported model gives logits of shape {exported.shape}, "
                      f"JAX {reference.shape}")
    return Comparison(len(reference),
                      metrics.agreement(exported, reference),
                      float(np.max(np.abs(exported.astype(np.float64) - reference))),
                      float(np.max(np.abs(reference))))


def check_export(path: Path, fmt: str, model: InferenceModel, images: np.ndarray,
                 batch_size: int) -> Comparison:
    """Run the written file on ``images`` and compare it with the JAX evaluator."""
    from kd_jax.onnx_model import OnnxClassifier

    if fmt == "onnx":
        classifier = OnnxClassifier(path)
        exported = classifier.logits(images, batch_size)
    else:
        run = stablehlo_logits(path)
        exported = np.concatenate([run(images[i:i + batch_size])
                                   for i in range(0, len(images), batch_size)])
    return compare_logits(exported, model.reference(batch_size)(images))


# --------------------------------------------------------------------------- the command
def check_set(model: InferenceModel, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The test images and labels the checks use: the first ``n``, or all when ``n`` is None."""
    images, labels = model.dataset.test_images, model.dataset.test_labels
    if n is None:
        return images, labels
    if not 1 <= n <= len(images):
        raise KdError(f"--check-images must be in [1, {len(images)}], got {n}")
    return images[:n], labels[:n]


def export_path(workdir: str | Path, fmt: str, output: str | Path | None) -> Path:
    """``output``, else RUN/export/model.<format>; refuses an unknown format."""
    if fmt not in FORMATS:
        raise KdError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    return Path(output) if output else Path(workdir) / "export" / FORMATS[fmt]


def export_model(model: InferenceModel, fmt: str, path: Path, images: np.ndarray,
                 batch_size: int = 256) -> Comparison:
    """Write ``model`` to ``path`` in ``fmt``, then check the file against JAX on ``images``."""
    if batch_size < 1:
        raise KdError(f"--batch-size must be >= 1, got {batch_size}")
    data = to_onnx_bytes(model) if fmt == "onnx" else to_stablehlo_bytes(model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as e:
        raise KdError(f"{path}: cannot write ({e.strerror})") from None
    return check_export(path, fmt, model, images, batch_size)


def export_run(workdir: str | Path, fmt: str = "onnx", output: str | Path | None = None,
               data_dir: str | None = None, check_images: int | None = None,
               batch_size: int = 256) -> tuple[Path, Comparison]:
    """Write the run's model in ``fmt`` and check it; returns (path, comparison)."""
    path = export_path(workdir, fmt, output)
    model = load_inference_model(workdir, data_dir)
    return path, export_model(model, fmt, path, check_set(model, check_images)[0], batch_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kd_jax.export", description=__doc__.splitlines()[0],
        epilog="Input: uint8 NHWC images 0..255, dynamic batch; output: float32 logits.")
    parser.add_argument("--workdir", required=True, help="a teacher or student run directory")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx")
    parser.add_argument("--output", help="file to write (default RUN/export/model.<format>)")
    parser.add_argument("--data-dir", help="dataset folder for the check (default: "
                                           "$KD_JAX_DATA_DIR, else the run's)")
    parser.add_argument("--check-images", type=int, metavar="N",
                        help="compare on the first N test images only (default: all)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="batch size of the checks and the int8 calibration")
    parser.add_argument("--int8", action="store_true",
                        help="also write a static int8 model beside the ONNX file "
                             "(model.int8.onnx) and check its accuracy")
    parser.add_argument("--calibration-images", type=int, metavar="N",
                        default=quantize.CALIBRATION_IMAGES,
                        help="training images (a fixed random sample of those the run fitted) "
                             "that calibrate the int8 activation ranges (default: %(default)s)")
    parser.add_argument("--int8-tolerance", type=float, metavar="POINTS",
                        default=quantize.TOLERANCE_POINTS,
                        help="fail when the int8 test accuracy is more than this many points "
                             "below the float model's (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def job() -> None:
        if args.int8 and args.format != "onnx":
            raise KdError("--int8 quantizes the ONNX model: use it with --format onnx")
        path = export_path(args.workdir, args.format, args.output)
        model = load_inference_model(args.workdir, args.data_dir)
        images, labels = check_set(model, args.check_images)
        sample = None
        if args.int8:  # chosen, and the flag checked, before the slow export
            sample = quantize.calibration_images(model, args.calibration_images)
        comparison = export_model(model, args.format, path, images, args.batch_size)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
        runtime = "onnxruntime" if args.format == "onnx" else "jax.export.deserialize"
        print(comparison.describe(runtime))
        if not comparison.passed:
            raise KdError(f"{path} does not reproduce the JAX model closely enough")
        if sample is not None:
            int8 = quantize.export_int8(path, sample, images, labels, args.batch_size,
                                        args.int8_tolerance)
            print(f"wrote {int8.path} ({int8.path.stat().st_size / 1e6:.2f} MB): static int8, "
                  f"calibrated on {len(sample)} training images")
            print(int8.check.describe())
            if not int8.check.passed:
                raise KdError(int8.check.failure(int8.path))

    return run_guarded(job, args.debug)


if __name__ == "__main__":
    sys.exit(main())

"""Classify image files with an exported ONNX model: ``python -m kd_jax.predict --model F IMG...``

Any PNG or JPEG (or other format Pillow reads) of any size: it is turned upright by its EXIF
orientation, converted to RGB (grey for a one-channel model), and the whole picture is resized
to the model's input size (32x32 for CIFAR-10) with Pillow's antialiased bilinear filter,
without cropping, so a non-square picture is squashed. Prints the top classes per image with
their softmax probabilities. Uses onnxruntime, numpy and Pillow only: no JAX.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kd_jax.errors import KdError, run_guarded
from kd_jax.onnx_model import OnnxClassifier


def load_image(path: str | Path, height: int, width: int, channels: int) -> np.ndarray:
    """One image file as uint8 [height, width, channels], as the exported model expects."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise KdError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("L" if channels == 1 else "RGB")
            image = image.resize((width, height), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise KdError(f"{path}: not a readable image ({type(e).__name__})") from None
    return np.asarray(image, np.uint8).reshape(height, width, channels)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def top_classes(probabilities: np.ndarray, class_names: Sequence[str],
                k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable (class name, probability), most probable first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(class_names[i], float(probabilities[i])) for i in order]


def classify(model: OnnxClassifier, paths: Sequence[str | Path],
             k: int) -> list[list[tuple[str, float]]]:
    images = np.stack([load_image(p, *model.image_shape) for p in paths])
    probabilities = softmax(model.logits(images).astype(np.float64))
    return [top_classes(p, model.class_names, k) for p in probabilities]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_jax.predict",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an ONNX file from kd_jax.export")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG/JPEG files")
    parser.add_argument("--top", type=int, default=3, help="classes to show per image")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)

    def job() -> None:
        if args.top < 1:
            raise KdError(f"--top must be >= 1, got {args.top}")
        model = OnnxClassifier(args.model)
        for path, top in zip(args.images, classify(model, args.images, args.top), strict=True):
            print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for name, p in top))

    return run_guarded(job, args.debug)


if __name__ == "__main__":
    sys.exit(main())

"""An exported ONNX classifier in onnxruntime: loaded with one-line errors, run in batches.

Needs only onnxruntime and numpy (no JAX), so a deployment can ship this module alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kd_jax.errors import KdError

METADATA_PREFIX = "kd_jax."


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


class OnnxClassifier:
    """A ``kd_jax.export`` ONNX file: uint8 NHWC images in, logits out, class names attached."""

    def __init__(self, path: str | Path, threads: int = 0):
        """``threads``: onnxruntime's intra-op threads (0: its default, one per core)."""
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise KdError(f"{self.path}: model file not found")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for damaged files
            raise KdError(f"{self.path}: not a loadable ONNX model ({_first_line(e)})") from None
        self.metadata = {k.removeprefix(METADATA_PREFIX): v for k, v in
                         self.session.get_modelmeta().custom_metadata_map.items()
                         if k.startswith(METADATA_PREFIX)}
        self.class_names = self._class_names()
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4:
            raise KdError(f"{self.path}: expected one uint8 [B, H, W, C] input, found "
                          f"{[(i.name, i.type, i.shape) for i in inputs]}")
        self.input_name = inputs[0].name
        self.image_shape: tuple[int, int, int] = tuple(inputs[0].shape[1:])

    def _class_names(self) -> tuple[str, ...]:
        try:
            names = json.loads(self.metadata["class_names"])
        except (KeyError, json.JSONDecodeError):
            raise KdError(f"{self.path}: no class names in its metadata (export it with "
                          "python -m kd_jax.export)") from None
        return tuple(str(n) for n in names)

    def run(self, images: np.ndarray) -> np.ndarray:
        """Logits of one batch, as the session gives them."""
        return self.session.run(None, {self.input_name: images})[0]

    def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits of any number of uint8 images, ``batch_size`` at a time."""
        if images.dtype != np.uint8 or tuple(images.shape[1:]) != self.image_shape:
            raise KdError(f"{self.path}: expects uint8 images of shape [B, "
                          f"{', '.join(map(str, self.image_shape))}], got {images.dtype} "
                          f"{list(images.shape)}")
        return np.concatenate([self.run(images[i:i + batch_size])
                               for i in range(0, len(images), batch_size)])

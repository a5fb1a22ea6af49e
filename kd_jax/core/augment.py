"""Augmentation of uint8 image batches inside the jitted step, and test-time views.

Pure jax on device-resident batches (airbench): no host work per step. A *preprocessing*
object turns a batch of stored images into model inputs: :class:`Augmentation` for uint8
NHWC images (augment, then standardise per channel), :class:`Passthrough` for arrays a user
has already prepared (float features of any shape: no augmentation, no scaling).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

PAD_MODES = ("zeros", "reflect")


def random_crop(key: jax.Array, images: jax.Array, pad: int, mode: str = "zeros") -> jax.Array:
    """Translate each image by up to ``pad`` pixels in each direction.

    Equal to padding by ``pad`` and cropping back at a random offset: the standard CIFAR crop
    at pad 4, and the paper's MNIST input jitter at pad 2. ``mode`` fills the border with
    zeros or with the image mirrored at its edge (airbench's choice: no black borders).
    """
    n, h, w, _ = images.shape
    padded = _pad(images, pad, mode)
    offsets = jax.random.randint(key, (n, 2), 0, 2 * pad + 1)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))
    return jax.vmap(crop)(padded, offsets)


def _pad(images: jax.Array, pad: int, mode: str) -> jax.Array:
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jnp.pad(images, widths, mode="constant" if mode == "zeros" else "reflect")


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Mirror each image left-right with probability 1/2."""
    return flip_where(jax.random.bernoulli(key, 0.5, (images.shape[0],)), images)


def flip_where(flip: jax.Array, images: jax.Array) -> jax.Array:
    """Mirror the images whose entry of the boolean vector ``flip`` is true."""
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def alternating_flips(image_key: jax.Array, indices: jax.Array, epoch: jax.Array) -> jax.Array:
    """airbench's derandomised flips: each image has a fixed coin (from ``image_key`` and its
    index), and is mirrored in even epochs where the coin says so and in odd epochs where it
    does not, so over any two epochs every image is seen both ways once."""
    coins = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(image_key, i)))(indices)
    return coins ^ (epoch % 2 == 1)


def cutout(key: jax.Array, images: jax.Array, size: int, fill: jax.Array) -> jax.Array:
    """Replace a ``size`` x ``size`` square at a random centre of each image by ``fill`` (one
    value per channel); squares are clipped at the border (DeVries & Taylor 2017)."""
    n, h, w, _ = images.shape
    centre = jax.random.randint(key, (n, 2), 0, jnp.array([h, w]))
    top, left = centre[:, 0] - size // 2, centre[:, 1] - size // 2
    rows, cols = jnp.arange(h), jnp.arange(w)
    inside_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + size)
    inside_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + size)
    mask = inside_rows[:, :, None, None] & inside_cols[:, None, :, None]
    return jnp.where(mask, fill.astype(images.dtype), images)


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """uint8 [0, 255] -> float32 standardised per channel."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


TTA_MODES = ("none", "flip", "flip_translate")


def tta_views(images: jax.Array, mode: str) -> list[jax.Array]:
    """The views of a batch that test-time augmentation averages over: the batch itself; with
    ``flip`` its mirror too; with ``flip_translate`` both of those also shifted one pixel up
    and left and one pixel down and right (reflect padding), six views in all (airbench)."""
    views = [images] if mode == "none" else [images, images[:, :, ::-1]]
    if mode == "flip_translate":
        n, h, w, _ = images.shape
        for view in views[:2]:
            padded = _pad(view, 1, "reflect")
            views += [padded[:, :h, :w], padded[:, 2:, 2:]]
    return views


@dataclass(frozen=True)
class Augmentation:
    """The training-time pipeline from uint8 batches to model inputs, hashable for jit.

    ``alternating_flip`` replaces random flips by :func:`alternating_flips`, ``pad_mode``
    chooses the crop's border, ``cutout > 0`` blanks a square of that side with the mean
    colour (0 after normalisation).
    """

    crop_pad: int
    flip: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad_mode: str = "zeros"
    alternating_flip: bool = False
    cutout: int = 0

    def apply(self, key: jax.Array, images: jax.Array, indices: jax.Array | None = None,
              epoch: jax.Array | None = None, image_key: jax.Array | None = None) -> jax.Array:
        """Augment, then normalise: what a training step feeds the model."""
        return self.normalize(self.augment(key, images, indices, epoch, image_key))

    def augment(self, key: jax.Array, images: jax.Array, indices: jax.Array | None = None,
                epoch: jax.Array | None = None, image_key: jax.Array | None = None) -> jax.Array:
        """The augmented uint8 batch (shape and dtype kept).

        Alternating flips need the images' dataset ``indices``, the ``epoch`` and a key fixed
        for the run (``image_key``); the other augmentations draw from ``key`` alone.
        """
        crop_key, flip_key = jax.random.split(key)
        if self.crop_pad:
            images = random_crop(crop_key, images, self.crop_pad, self.pad_mode)
        if self.flip and self.alternating_flip:
            if indices is None or epoch is None or image_key is None:
                raise ValueError("alternating flips need indices, epoch and image_key")
            images = flip_where(alternating_flips(image_key, indices, epoch), images)
        elif self.flip:
            images = random_flip(flip_key, images)
        if self.cutout:
            fill = jnp.round(255 * jnp.asarray(self.mean))
            images = cutout(jax.random.fold_in(key, 1), images, self.cutout, fill)
        return images

    def normalize(self, images: jax.Array) -> jax.Array:
        """What evaluation feeds the model."""
        return normalize(images, self.mean, self.std)




@dataclass(frozen=True)
class Passthrough:
    """Preprocessing for data already in model-input form: used as is, cast to float32."""

    def apply(self, key: jax.Array, images: jax.Array, indices: jax.Array | None = None,
              epoch: jax.Array | None = None, image_key: jax.Array | None = None) -> jax.Array:
        return self.normalize(images)

    def normalize(self, images: jax.Array) -> jax.Array:
        return images.astype(jnp.float32)


def standardizing(images: np.ndarray) -> Augmentation:
    """Plain per-channel standardisation of uint8 NHWC ``images`` by their own statistics:
    the default for a user's uint8 data when no augmentation is given."""
    sums, squares, count = 0.0, 0.0, 0
    for start in range(0, len(images), 1000):  # float64 copies of 1,000 images at a time
        pixels = images[start:start + 1000].reshape(-1, images.shape[-1]) / 255.0
        sums, squares = sums + pixels.sum(0), squares + (pixels**2).sum(0)
        count += len(pixels)
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return Augmentation(0, False, tuple(mean.tolist()), tuple(std.tolist()))

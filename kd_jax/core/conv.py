"""A drop-in ``lax.conv_general_dilated`` built from matrix products where XLA:CPU is slow.

Two cases are rewritten on CPU, both measured on this project's 2-core development VMs
(`benchmarks/conv_layers.py`):

- **The kernel gradient, any dtype.** XLA:CPU lowers it to a convolution that contracts over
  the batch and spatial axes, several times slower than the forward pass (4-5.5x for
  ResNet-18's first two stages). The same gradient written as one matrix product of the output
  gradient and the input's im2col, a few images at a time, runs at matrix-product speed: see
  :func:`kernel_grad`.
- **bfloat16 convolutions of 64 or more channels** (forward, and the input gradient at
  stride 1): XLA:CPU's bf16 convolution ran *slower* than its float32 one on an Intel Xeon
  with AMX (first stage, 64 images: 54.7 vs 36.3 ms), while its bf16 matrix product with
  float32 accumulation runs ~4.5x its float32 one. :func:`matmul_conv` is im2col times the
  kernel, a few images at a time.

It is opt-in: a model takes it as its convolution (``ResNet(conv=CpuConv)``; the command-line
jobs inject it on CPUs only, since cuDNN and the TPU compiler are good at convolutions). Only
the case ResNets use is rewritten (NHWC input, HWIO kernel, no dilation, one feature group);
anything else goes to ``lax.conv_general_dilated`` untouched.

Its two tunables, the batch chunk a loop step reads (:data:`CHUNK_VALUES`) and the fewest
input channels a bf16 matrix-product convolution takes (:data:`MATMUL_MIN_CHANNELS`), are
keyword arguments with those defaults: a caller (the tests, on tiny images) passes others, e.g.
``partial(nn.Conv, conv_general_dilated=partial(conv_general_dilated, chunk_values=1))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")

# Images per loop step are chosen so that one step's input holds at most this many values:
# 1 MiB of float32 or 512 KiB of bfloat16, within a core's L2 cache (1 MiB on Zen 4, 2 MiB on
# the Xeon). Per layer on one Xeon core, bf16, 64 images: 1 MiB per step took 64.5 / 37.7 ms
# for the first two stages' kernel gradients, 512 KiB 52.9 / 24.4; for float32 the two were
# within noise (see :func:`kernel_grad`). The default of ``chunk_values`` (tests pass a smaller
# one to run the loops on tiny images).
CHUNK_VALUES = 1 << 18

# bf16 convolutions with fewer input channels stay XLA's: one Xeon core, 64 images, 3x3, XLA's
# bf16 / matmul_conv: 16 channels at 32 x 32 5.2 / 10.2 ms, 32 at 16 x 16 2.3 / 3.9 ms, 32 at
# 32 x 32 10.3 / 16.5 ms, 64 at 8 x 8 2.3 / 1.8 ms, 64 at 32 x 32 50.9 / 31.1 ms.
MATMUL_MIN_CHANNELS = 64


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]], lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None, *, chunk_values: int = CHUNK_VALUES,
                         matmul_min_channels: int = MATMUL_MIN_CHANNELS) -> jax.Array:
    """``lax.conv_general_dilated``, with matrix products where XLA:CPU is slow (module doc).

    ``chunk_values`` bounds the input values a loop step reads (:data:`CHUNK_VALUES`);
    bfloat16 convolutions with fewer than ``matmul_min_channels`` input channels stay XLA's
    (:data:`MATMUL_MIN_CHANNELS`).
    """
    plain = partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding,
                    lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                    dimension_numbers=dimension_numbers,
                    feature_group_count=feature_group_count,
                    batch_group_count=batch_group_count, precision=precision,
                    preferred_element_type=preferred_element_type)
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    simple = (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
              and all(d == 1 for d in (lhs_dilation or (1,)) + (rhs_dilation or (1,)))
              and feature_group_count == 1 and batch_group_count == 1
              and preferred_element_type is None)
    if not simple:
        return plain(lhs, rhs)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return _conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)), precision,
                 chunk_values, matmul_min_channels)


# flax's convolution with this one inside: what a ResNet takes as ``conv`` on CPUs.
CpuConv = partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def _plain(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
           padding: tuple[tuple[int, int], ...], precision: Any) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC,
                                    precision=precision)


def _as_matmul(x: jax.Array, kernel: jax.Array, min_channels: int) -> bool:
    """Whether convolving ``x`` with ``kernel`` runs as :func:`matmul_conv`: bfloat16, at
    least ``min_channels`` input channels (:data:`MATMUL_MIN_CHANNELS` by default), and input
    and output channels that pair into 32-bit words (see :func:`_words`)."""
    return (_packable(x) and kernel.dtype == x.dtype and x.shape[-1] >= min_channels
            and kernel.shape[-1] % 2 == 0)


def _forward(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
             padding: tuple[tuple[int, int], ...], precision: Any, chunk_values: int,
             min_channels: int) -> jax.Array:
    if _as_matmul(x, kernel, min_channels):
        return matmul_conv(x, kernel, strides, padding, chunk_values=chunk_values)
    return _plain(x, kernel, strides, padding, precision)


_conv = jax.custom_vjp(_forward, nondiff_argnums=(2, 3, 4, 5, 6))


def _conv_fwd(x, kernel, strides, padding, precision, chunk_values, min_channels):
    return _forward(x, kernel, strides, padding, precision, chunk_values, min_channels), (x, kernel)


def _conv_bwd(strides, padding, precision, chunk_values, min_channels, residuals, dy):
    x, kernel = residuals
    return (_input_grad(x, kernel, dy, strides, padding, precision, chunk_values, min_channels),
            kernel_grad(x, dy, kernel.shape, strides, padding,
                        chunk_values=chunk_values).astype(kernel.dtype))


_conv.defvjp(_conv_fwd, _conv_bwd)


def _input_grad(x: jax.Array, kernel: jax.Array, dy: jax.Array, strides: tuple[int, int],
                padding: tuple[tuple[int, int], ...], precision: Any, chunk_values: int,
                min_channels: int) -> jax.Array:
    """d(loss)/dx. At stride 1 it is the convolution of ``dy`` with the kernel turned by 180
    degrees and its channels swapped, padded by what the forward pass cut off, so bfloat16 takes
    :func:`matmul_conv`; strided convolutions keep XLA's own gradient."""
    kh, kw = kernel.shape[:2]
    mirrored = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]),
                (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
    turned = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    if (strides == (1, 1) and _as_matmul(dy, turned, min_channels)
            and min(min(p) for p in mirrored) >= 0):
        return matmul_conv(dy, turned, (1, 1), mirrored,
                           chunk_values=chunk_values).astype(x.dtype)
    _, input_vjp = jax.vjp(lambda x: _plain(x, kernel, strides, padding, precision), x)
    return input_vjp(dy)[0]


def matmul_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                padding: Sequence[tuple[int, int]], *,
                chunk_values: int = CHUNK_VALUES) -> jax.Array:
    """The convolution as im2col (positions x taps*cin) times the kernel (taps*cin x cout),
    accumulated in float32, over chunks of the batch of at most ``chunk_values`` input values
    (cache-sized by default); output in ``x.dtype``.

    For bfloat16 on CPU: XLA:CPU multiplies bf16 matrices ~4.5x faster than float32 ones
    (4096 x 576 x 64, one Xeon core: 0.44 vs 1.97 ms) but runs bf16 convolutions no faster than
    float32 ones. The chunks are split per device as in :func:`kernel_grad`; each loop step
    reads its images and writes their outputs in place as 32-bit words (see :func:`_packed`).
    """
    n, h, w, _ = x.shape
    kh, kw, cin, cout = kernel.shape
    ho = (h + sum(padding[0]) - kh) // strides[0] + 1
    wo = (w + sum(padding[1]) - kw) // strides[1] + 1
    _, xs = _chunks(x, _packed(x), chunk_values=chunk_values)
    weights = kernel.reshape(kh * kw * cin, cout)

    def chunk_out(k, ys):
        chunk = _unpacked(lax.dynamic_index_in_dim(xs, k, axis=1, keepdims=False), x.dtype)
        cols = _im2col(chunk, (kh, kw), strides, padding)
        y = lax.dot_general(cols, weights, (((cols.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
        return lax.dynamic_update_index_in_dim(ys, _packed(y.astype(x.dtype)), k, axis=1)

    ys = jnp.zeros((*xs.shape[:3], ho, wo, cout // 2), jnp.uint32)
    ys = lax.fori_loop(0, xs.shape[1], chunk_out, ys)
    return _unpacked(ys, x.dtype).reshape(n, ho, wo, cout)


def kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                strides: Sequence[int], padding: Sequence[tuple[int, int]], *,
                chunk_values: int = CHUNK_VALUES) -> jax.Array:
    """d(loss)/d(kernel), accumulated over chunks of the batch of at most ``chunk_values``
    input values, cache-sized by default (float32).

    The gradient is one matrix product of ``dy`` (positions x cout) and the input's im2col
    (positions x every kernel tap's input channels), contracting over images and positions.
    Building the im2col for the whole batch (300 MB for ResNet-18's first stage at batch
    128) runs at XLA:CPU's copy speed, far below its matrix-product speed; a loop over a few
    images at a time keeps it in cache. Measured on one Zen 4 core, batch 128, 3x3
    convolution 32 x 32 x 64 -> 64: XLA's own gradient 302 ms, this 111 ms (4 images a
    step); the whole-batch im2col took 447 ms, one product per tap instead of one for all
    taps 160-175 ms, and this product with its output the other way round ((taps * cin) x
    cout) 195 ms.
    """
    kh, kw, cin, cout = kernel_shape
    _, xs, dys = _chunks(x, _packed(x), _packed(dy), chunk_values=chunk_values,
                         min_steps=2 if dy.dtype == jnp.bfloat16 else 1)
    # bf16 takes the fast product only inside a real loop: with one step XLA drops the loop,
    # folds the final transpose into the product and then fails to run it (jax 0.10.2, CPU).
    pairs = dy.dtype == jnp.bfloat16 and xs.shape[1] > 1 and math.prod(dys.shape[2:-1]) % 2 == 0
    chunk_grad = partial(_chunk_grad, kernel_shape=kernel_shape, strides=strides,
                         padding=padding, transpose_pairs=pairs)

    def add_chunk(k, total):
        chunk = lambda a, dtype: _unpacked(lax.dynamic_index_in_dim(a, k, axis=1,
                                                                    keepdims=False), dtype)
        return total + chunk_grad(chunk(xs, x.dtype), chunk(dys, dy.dtype))

    per_group = lax.fori_loop(0, xs.shape[1], add_chunk,
                              jnp.zeros((xs.shape[0], cout, kh * kw * cin), jnp.float32))
    return per_group.sum(0).T.reshape(kh, kw, cin, cout)


def _chunks(x: jax.Array, *more: jax.Array, chunk_values: int,
            min_steps: int = 1) -> list[jax.Array]:
    """Each array as [groups, loop steps, images per step, ...], cut so that a step of ``x``
    holds at most ``chunk_values``, in at least ``min_steps`` steps where there are
    enough images. The cut follows ``x`` alone, so ``more`` may hold packed copies of it
    (:func:`_packed`) and arrays of other shapes with the same batch.

    Under data parallelism (the batch sharded over all devices, see
    ``kd_jax.core.devices.make_mesh``) there is one group per device, so that every device loops
    over its own images only and the devices' results meet once, after the loop. A cross-device sum
    inside the loop deadlocked XLA:CPU (its devices reached the collectives of different
    convolutions' loops in different orders).
    """
    n = x.shape[0]
    groups = jax.device_count() if n % jax.device_count() == 0 else 1
    per_group = n // groups
    budget = min(chunk_values, per_group // min_steps * x[0].size)
    steps = _loop_steps(per_group, x[0].size, budget)
    return [a.reshape(groups, steps, per_group // steps, *a.shape[1:]) for a in (x, *more)]


def _loop_steps(n: int, image_values: int, chunk_values: int) -> int:
    """Loop steps for ``n`` images: chunks of at most ``chunk_values`` (at least one image),
    the number of steps dividing ``n``."""
    chunk = max((c for c in range(1, n + 1) if n % c == 0 and c * image_values <= chunk_values),
                default=1)
    return n // chunk


def _im2col(x: jax.Array, kernel_hw: Sequence[int], strides: Sequence[int],
            padding: Sequence[tuple[int, int]]) -> jax.Array:
    """[..., h, w, c] -> [..., ho, wo, taps * c]: each output position's receptive field.

    bfloat16 channels are moved in pairs, as 32-bit words: XLA:CPU copies 16-bit elements
    no faster than 32-bit ones, so this halves the copying (one Xeon core, 4 images of
    32 x 32 x 64 a step, whole layer forward: 36.9 ms against 59.7).
    """
    if _packable(x):
        return _unpacked(_im2col(_packed(x), kernel_hw, strides, padding), x.dtype)
    (kh, kw), (sh, sw), lead = kernel_hw, strides, x.ndim - 3
    xp = jnp.pad(x, ((0, 0),) * lead + (*padding, (0, 0)))
    *batch, hp, wp, c = xp.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    return jnp.concatenate(
        [lax.slice(xp, (0,) * lead + (i, j, 0),
                   (*batch, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                   (1,) * lead + (sh, sw, 1))
         for i in range(kh) for j in range(kw)], axis=-1)


def _packed(x: jax.Array) -> jax.Array:
    """``x`` as a loop slices and updates it best: bfloat16 with an even number of channels
    as 32-bit words (:func:`_words`), anything else as it is.

    XLA:CPU slices and updates slices of a bf16 array by converting the whole array to
    float32 and back: writing each step's output into a bf16 layer output made every step
    cost as much as the whole batch (500 images of 32 x 32 x 64, one Xeon core: 1,245 ms,
    against 463 for XLA's convolution; 333 ms with words), and reading words cut another
    15% there (278 ms).
    """
    return _words(x) if _packable(x) else x


def _packable(x: jax.Array) -> bool:
    """bfloat16 with an even number of channels: two channels make one 32-bit word."""
    return x.dtype == jnp.bfloat16 and x.shape[-1] % 2 == 0


def _unpacked(x: jax.Array, dtype: Any) -> jax.Array:
    """The inverse of :func:`_packed` for an array that was ``dtype``."""
    return _from_words(x, dtype) if x.dtype != dtype else x


def _words(x: jax.Array) -> jax.Array:
    """[..., c] of 16-bit values -> [..., c / 2] uint32, two neighbouring channels a word."""
    return lax.bitcast_convert_type(x.reshape(*x.shape[:-1], -1, 2), jnp.uint32)


def _from_words(words: jax.Array, dtype: Any) -> jax.Array:
    """The inverse of :func:`_words`."""
    values = lax.bitcast_convert_type(words, dtype)
    return values.reshape(*values.shape[:-2], -1)


def _chunk_grad(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                strides: Sequence[int], padding: Sequence[tuple[int, int]],
                transpose_pairs: bool) -> jax.Array:
    """One chunk's kernel gradient per group (the leading axis of ``x`` and ``dy``), as
    cout x (taps * cin): ``dy`` (positions x cout) against the im2col (positions x taps*cin);
    with ``transpose_pairs`` (bfloat16), ``dy`` is transposed first (see :func:`_transposed`)."""
    kh, kw, cin, cout = kernel_shape
    groups = dy.shape[0]
    cols = _im2col(x, (kh, kw), strides, padding).reshape(groups, -1, kh * kw * cin)
    dy = dy.reshape(groups, -1, cout)
    if transpose_pairs:
        return lax.dot_general(_transposed(dy), cols, (((2,), (1,)), ((0,), (0,))),
                               preferred_element_type=jnp.float32)
    return lax.dot_general(dy, cols, (((1,), (1,)), ((0,), (0,))),
                           preferred_element_type=jnp.float32)


def _transposed(dy: jax.Array) -> jax.Array:
    """[groups, positions, c] bfloat16 -> [groups, c, positions], copied for real.

    XLA:CPU multiplies bf16 matrices fast only with the contraction on the minor axis of the
    left operand; otherwise it converts both to float32 first (3.2x slower: dy^T x im2col,
    4096 positions, 64 x 576 output, one Xeon core), and a transpose feeding the product is
    folded into it. So positions are paired into 32-bit words and the words transposed.
    """
    groups, positions, c = dy.shape
    pairs = dy.reshape(groups, positions // 2, 2, c).transpose(0, 1, 3, 2)
    words = lax.bitcast_convert_type(pairs, jnp.uint32).transpose(0, 2, 1)
    return lax.bitcast_convert_type(words, dy.dtype).reshape(groups, c, positions)

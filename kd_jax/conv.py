"""A drop-in ``lax.conv_general_dilated`` whose kernel gradient is a matrix product on CPU.

XLA:CPU lowers a convolution's kernel gradient to a convolution that contracts over the batch
and spatial axes, several times slower than the forward pass (measured on this project's
2-core Zen 4 CPU, `benchmarks/conv_layers.py`: 4-5.5x for ResNet-18's first two stages). The
same gradient written as one matrix product of the output gradient and the input's im2col, a
few images at a time, runs at matrix-product speed: see :func:`kernel_grad`. Accelerators keep
XLA's own convolution gradients (cuDNN and the TPU compiler are good at them).

Only the case ResNets use is rewritten (NHWC input, HWIO kernel, no dilation, one feature
group); anything else goes to ``lax.conv_general_dilated`` untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]], lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> jax.Array:
    """``lax.conv_general_dilated``, with the im2col kernel gradient on CPU (see module doc)."""
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
    if not simple or jax.default_backend() != "cpu":
        return plain(lhs, rhs)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    return _conv(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)), precision)


def _plain(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
           padding: tuple[tuple[int, int], ...], precision: Any) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC,
                                    precision=precision)


_conv = jax.custom_vjp(_plain, nondiff_argnums=(2, 3, 4))


def _conv_fwd(x, kernel, strides, padding, precision):
    return _conv(x, kernel, strides, padding, precision), (x, kernel)


def _conv_bwd(strides, padding, precision, residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _plain(x, kernel, strides, padding, precision), x)
    return input_vjp(dy)[0], kernel_grad(x, dy, kernel.shape, strides, padding).astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


# Images per loop step of the kernel gradient are chosen so that one step's input fits in about
# this many bytes, i.e. in a core's L2 cache (1 MiB on Zen 4): see :func:`kernel_grad`. Read
# at trace time (tests lower it to run the loop on tiny images).
CHUNK_BYTES = 1 << 20


def kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
    """d(loss)/d(kernel), accumulated over cache-sized chunks of the batch (float32).

    The gradient is one matrix product of ``dy`` (positions x cout) and the input's im2col
    (positions x every kernel tap's input channels), contracting over images and positions.
    Building the im2col for the whole batch (300 MB for ResNet-18's first stage at batch
    128) runs at XLA:CPU's copy speed, far below its matrix-product speed; a loop over a few
    images at a time keeps it in cache. Measured on one Zen 4 core, batch 128, 3x3
    convolution 32 x 32 x 64 -> 64: XLA's own gradient 302 ms, this 111 ms (4 images a
    step); the whole-batch im2col took 447 ms, one product per tap instead of one for all
    taps 160-175 ms, and this product with its output the other way round ((taps * cin) x
    cout) 195 ms.

    Under data parallelism (the batch sharded over all devices, see ``kd_jax.train.make_mesh``)
    the batch is split into one group per device and the loop sums each group apart, so every
    device loops over its own images only and the devices' sums meet once, after the loop. A
    cross-device sum inside the loop deadlocked XLA:CPU (its devices reached the collectives
    of different convolutions' loops in different orders).
    """
    n = x.shape[0]
    kh, kw, cin, cout = kernel_shape
    groups = jax.device_count() if n % jax.device_count() == 0 else 1
    steps = _loop_steps(n // groups, x[0].size * x.dtype.itemsize, CHUNK_BYTES)
    split = lambda a: a.reshape(groups, n // groups // steps, steps, *a.shape[1:])
    xs, dys = split(x), split(dy)
    chunk_grad = partial(_chunk_grad, kernel_shape=kernel_shape, strides=strides,
                         padding=padding)

    def add_chunk(k, total):
        chunk = lambda a: lax.dynamic_index_in_dim(a, k, axis=2, keepdims=False)
        return total + chunk_grad(chunk(xs), chunk(dys))

    per_group = lax.fori_loop(0, steps, add_chunk,
                              jnp.zeros((groups, cout, kh * kw * cin), jnp.float32))
    return per_group.sum(0).T.reshape(kh, kw, cin, cout)


def _loop_steps(n: int, image_bytes: int, chunk_bytes: int) -> int:
    """Loop steps for ``n`` images: chunks of at most ``chunk_bytes`` (at least one image),
    the number of steps dividing ``n``."""
    chunk = max((c for c in range(1, n + 1) if n % c == 0 and c * image_bytes <= chunk_bytes),
                default=1)
    return n // chunk


def _chunk_grad(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
    """One chunk's kernel gradient per group (the leading axis of ``x`` and ``dy``), as
    cout x (taps * cin): ``dy`` (positions x cout) against the im2col (positions x taps*cin)."""
    kh, kw, cin, cout = kernel_shape
    groups, n, ho, wo, _ = dy.shape
    sh, sw = strides
    xp = jnp.pad(x, ((0, 0), (0, 0), *padding, (0, 0)))
    im2col = jnp.concatenate(
        [lax.slice(xp, (0, 0, i, j, 0),
                   (groups, n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
                   (1, 1, sh, sw, 1))
         for i in range(kh) for j in range(kw)], axis=-1).reshape(groups, -1, kh * kw * cin)
    return lax.dot_general(dy.reshape(groups, -1, cout), im2col, (((1,), (1,)), ((0,), (0,))),
                           preferred_element_type=jnp.float32)

"""A drop-in ``lax.conv_general_dilated`` whose kernel gradient is a matrix product on CPU.

XLA:CPU lowers a convolution's kernel gradient to an Eigen convolution that contracts over the
batch and spatial axes, which is several times slower than the forward pass (measured on this
project's 2-core Zen 4 CPU: about 5x for a 3x3, 64-channel ResNet-18 layer at batch 128). The
same gradient written as im2col (the input's ``kh * kw`` shifted views, side by side) times the
output gradient is one large matrix product, which XLA:CPU runs far better. Accelerators keep
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


def kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int],
                strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
    """d(loss)/d(kernel) from im2col(x) and dy: one matrix product over N (float32)."""
    kh, kw, cin, cout = kernel_shape
    n, ho, wo, _ = dy.shape
    sh, sw = strides
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    views = [lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
                       (1, sh, sw, 1))
             for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(views, axis=-1).reshape(-1, kh * kw * cin)
    # dy^T @ patches, then a small transpose: XLA:CPU runs this order ~1.6x faster than
    # patches^T @ dy (measured on the 128 x 32 x 32 x 64 layer).
    grad_t = lax.dot_general(dy.reshape(-1, cout), patches, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return grad_t.T.reshape(kh, kw, cin, cout)

"""kd_jax.core.conv: the same convolution and gradients as XLA's, whatever the stride or padding."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from kd_jax.core import conv as kd_conv
from kd_jax.core.conv import conv_general_dilated


@pytest.mark.parametrize("size,cin,cout,kernel,stride,padding", [
    (8, 3, 4, 3, 1, "SAME"), (8, 4, 6, 3, 2, "SAME"), (7, 4, 6, 3, 2, "SAME"),
    (8, 4, 6, 1, 2, "SAME"), (8, 2, 3, 3, 1, "VALID"), (6, 2, 3, 3, 1, ((2, 0), (1, 1)))])
def test_matches_lax_value_and_gradients(size, cin, cout, kernel, stride, padding):
    x = jax.random.normal(jax.random.key(0), (2, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (stride, stride), padding,
                                                 dimension_numbers=dn)))

    expected = jax.value_and_grad(loss(lax.conv_general_dilated), (0, 1))(x, w)
    got = jax.value_and_grad(loss(conv_general_dilated), (0, 1))(x, w)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_kernel_gradient_is_a_matrix_product_on_cpu():
    """The point of the module: no convolution computes the kernel gradient."""
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    grad = jax.grad(lambda w: conv_general_dilated(x, w, (1, 1), "SAME",
                                                   dimension_numbers=dn).sum())
    hlo = jax.jit(grad).lower(w).as_text()
    assert "dot_general" in hlo and "convolution" not in hlo


@pytest.mark.parametrize("batch,size,cin,cout,kernel,stride", [
    (6, 8, 3, 4, 3, 1), (7, 7, 4, 6, 3, 2), (8, 8, 4, 6, 1, 2)])
def test_kernel_gradient_accumulated_over_chunks_matches_lax(batch, size, cin, cout, kernel,
                                                             stride):
    """Two images per step of the loop (one for the odd batch): the sum is XLA's gradient."""
    chunk_values = 2 * size * size * cin
    assert kd_conv._loop_steps(batch, size * size * cin, chunk_values) > 1
    x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def grad(conv):
        return jax.grad(lambda w: jnp.sum(jnp.sin(conv(x, w, (stride, stride), "SAME",
                                                       dimension_numbers=dn))))

    chunked = partial(conv_general_dilated, chunk_values=chunk_values)
    np.testing.assert_allclose(grad(chunked)(w), grad(lax.conv_general_dilated)(w),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("images,image_values,steps", [
    (128, 64 * 1024, 32),  # ResNet-18's first stage: 4 images (2^18 values) a step
    (64, 64 * 1024, 16),   # the same on each of two devices
    (64, 8 * 1024, 2),     # smaller images: 32 a step
    (128, 512 * 1024, 128),  # an image above the budget: one a step
    (7, 64 * 1024, 7),     # 7 is prime: one a step
])
def test_loop_steps_fill_the_cache_budget(images, image_values, steps):
    assert kd_conv._loop_steps(images, image_values, 1 << 18) == steps


def _bf16_value_and_grads(conv, x, w, stride, padding):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    dy = jax.random.normal(jax.random.key(2), conv(x, w, (stride, stride), padding,
                                                   dimension_numbers=dn).shape, x.dtype)
    y, vjp = jax.vjp(lambda x, w: conv(x, w, (stride, stride), padding, dimension_numbers=dn),
                     x, w)
    return (y, *vjp(dy))


@pytest.mark.parametrize("chunk_values", [1, 1 << 18])  # one image a loop step; one step
@pytest.mark.parametrize("batch,size,cin,cout,kernel,stride,padding", [
    (4, 8, 4, 6, 3, 1, "SAME"), (4, 8, 4, 6, 3, 2, "SAME"), (3, 7, 4, 6, 3, 2, "SAME"),
    (4, 8, 4, 6, 1, 2, "SAME"), (2, 6, 2, 4, 3, 1, ((2, 0), (1, 1))), (2, 8, 3, 4, 3, 1, "SAME"),
    (64, 4, 512, 512, 3, 1, "SAME")])  # ResNet-18's last stage on one of two devices
def test_bfloat16_matches_float32_products(chunk_values, batch, size, cin, cout, kernel, stride,
                                           padding):
    """bf16 value, input and kernel gradients (matrix products with float32 sums) against XLA's
    float32 convolution of the same bf16 numbers: equal to bf16 rounding."""
    conv = partial(conv_general_dilated, chunk_values=chunk_values,
                   matmul_min_channels=1)  # these few channels too
    x = jax.random.normal(jax.random.key(0), (batch, size, size, cin), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout), jnp.bfloat16)
    got = jax.jit(lambda x, w: _bf16_value_and_grads(conv, x, w, stride, padding))(x, w)
    f32 = lambda a: a.astype(jnp.float32)
    expected = _bf16_value_and_grads(
        lambda x, w, *a, **k: lax.conv_general_dilated(f32(x), f32(w), *a, **k).astype(x.dtype),
        x, w, stride, padding)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(f32(g), f32(e), rtol=0, atol=1e-2 * float(jnp.abs(f32(e)).max()))


@pytest.mark.parametrize("min_channels,products_only", [(1, True), (8, False)])
def test_bfloat16_stride_one_convolution_is_matrix_products_only(min_channels, products_only):
    """Forward, input gradient and kernel gradient of a bf16 stride-1 layer: no convolution,
    unless it has fewer input channels than ``matmul_min_channels``."""
    conv = partial(conv_general_dilated, matmul_min_channels=min_channels)
    x = jnp.ones((4, 8, 8, 4), jnp.bfloat16)
    w = jnp.ones((3, 3, 4, 6), jnp.bfloat16)
    step = jax.jit(lambda x, w: _bf16_value_and_grads(conv, x, w, 1, "SAME"))
    hlo = step.lower(x, w).as_text()
    assert "dot_general" in hlo and ("convolution" not in hlo) == products_only

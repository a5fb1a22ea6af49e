"""kd_jax.conv: the same convolution and gradients as XLA's, whatever the stride or padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from kd_jax import conv as kd_conv
from kd_jax.conv import conv_general_dilated


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
def test_kernel_gradient_accumulated_over_chunks_matches_lax(monkeypatch, batch, size, cin, cout,
                                                             kernel, stride):
    """Two images per step of the loop (one for the odd batch): the sum is XLA's gradient."""
    monkeypatch.setattr(kd_conv, "CHUNK_BYTES", 2 * size * size * cin * 4)
    assert kd_conv._loop_steps(batch, size * size * cin * 4, kd_conv.CHUNK_BYTES) > 1
    x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, cin, cout))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def grad(conv):
        return jax.grad(lambda w: jnp.sum(jnp.sin(conv(x, w, (stride, stride), "SAME",
                                                       dimension_numbers=dn))))

    np.testing.assert_allclose(grad(conv_general_dilated)(w), grad(lax.conv_general_dilated)(w),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("images,image_kib,steps", [
    (128, 256, 32),  # ResNet-18's first stage: 4 images (1 MiB) a step
    (64, 256, 16),   # the same on each of two devices
    (64, 32, 2),     # smaller images: 32 a step
    (128, 2048, 128),  # an image above the budget: one a step
    (7, 256, 7),     # 7 is prime: one a step
])
def test_loop_steps_fill_the_cache_budget(images, image_kib, steps):
    assert kd_conv._loop_steps(images, image_kib * 1024, 1 << 20) == steps

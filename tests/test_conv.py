"""kd_jax.conv: the same convolution and gradients as XLA's, whatever the stride or padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

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

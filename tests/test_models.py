import jax
import jax.numpy as jnp
import pytest

from kd_jax.core.models import count_params, create_model, init_variables
from kd_jax.errors import KdError


def params_of(name, width=None, classes=10):
    model = create_model(name, classes, width)
    shapes = jax.eval_shape(lambda: init_variables(model, (32, 32, 3), 0))
    return count_params(shapes["params"])


def test_resnet18_has_the_pytorch_cifar_parameter_count():
    assert params_of("resnet18") == 11_173_962


def test_resnet34_has_the_pytorch_cifar_parameter_count():
    assert params_of("resnet34") == 21_282_122


def test_width_halves_channels_and_class_count_sizes_the_head():
    # Convolutions scale with width**2: half the width, about a quarter of the parameters.
    assert params_of("resnet18", 32) == 2_797_610
    assert params_of("resnet18", 64, classes=100) - params_of("resnet18") == 512 * 90 + 90


def test_output_shape_and_dtype_in_bfloat16():
    model = create_model("resnet18", 10, 8, jnp.bfloat16)
    variables = init_variables(model, (32, 32, 3), 0)
    logits = model.apply(variables, jnp.ones((3, 32, 32, 3)), train=False)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))


def test_unknown_model_names_the_choices():
    with pytest.raises(KdError, match=r"^unknown model 'resnet19'; choose one of: mlp1, mlp2, "
                                      r"mlp3, resnet10, "):
        create_model("resnet19")

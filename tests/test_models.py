from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax.core.models import (
    BasicBlock,
    BatchNorm,
    WideBlock,
    count_params,
    create_model,
    init_variables,
    model_options,
)
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
                                      r"mlp3, resnet10, resnet110, resnet18, resnet20, "
                                      r"resnet32, resnet32x4, resnet34, resnet56, resnet8, "
                                      r"resnet8x4, vgg13, vgg8, wrn_16_2, wrn_40_1, wrn_40_2$"):
        create_model("resnet19")


# --------------------------------------------------------------------------- the CIFAR zoo
# RepDistiller's layer shapes (models/resnet.py, wrn.py, vgg.py), counted without flax.
def conv(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c  # scale and bias; running statistics are not parameters


def repdistiller_resnet(depth, filters, classes):
    """ResNet(depth, num_filters): conv1 + bn1, three layers of (depth - 2) / 6 BasicBlocks
    (a 1x1 conv + BN downsample where the stride or width changes), fc."""
    blocks, inplanes = (depth - 2) // 6, filters[0]
    total = conv(3, inplanes, 3) + bn(inplanes)
    for stage, planes in enumerate(filters[1:]):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            total += conv(inplanes, planes, 3) + bn(planes) + conv(planes, planes, 3) + bn(planes)
            if stride != 1 or inplanes != planes:
                total += conv(inplanes, planes, 1) + bn(planes)
            inplanes = planes
    return total + filters[-1] * classes + classes


def repdistiller_wrn(depth, widen, classes):
    """WideResNet(depth, widen_factor): conv1 16, three NetworkBlocks of (depth - 4) / 6
    pre-activation blocks (bn1 conv1 bn2 conv2, a 1x1 convShortcut where the width changes),
    bn1, fc."""
    channels, inplanes = (16 * widen, 32 * widen, 64 * widen), 16
    total = conv(3, 16, 3)
    for out in channels:
        for block in range(blocks := (depth - 4) // 6):
            cin = inplanes if block == 0 else out
            total += bn(cin) + conv(cin, out, 3) + bn(out) + conv(out, out, 3)
            total += conv(cin, out, 1) if cin != out else 0
        inplanes = out
    assert blocks
    return total + bn(channels[-1]) + channels[-1] * classes + classes


def repdistiller_vgg(cfg, classes):
    """VGG(cfg, batch_norm=True): each 3x3 conv has a bias and a BN; classifier 512 -> C."""
    total, cin = 0, 3
    for block in cfg:
        for cout in block:
            total += conv(cin, cout, 3, bias=True) + bn(cout)
            cin = cout
    return total + 512 * classes + classes


ZOO = {
    "resnet20": lambda c: repdistiller_resnet(20, (16, 16, 32, 64), c),
    "resnet32": lambda c: repdistiller_resnet(32, (16, 16, 32, 64), c),
    "resnet56": lambda c: repdistiller_resnet(56, (16, 16, 32, 64), c),
    "resnet110": lambda c: repdistiller_resnet(110, (16, 16, 32, 64), c),
    "resnet8x4": lambda c: repdistiller_resnet(8, (32, 64, 128, 256), c),
    "resnet32x4": lambda c: repdistiller_resnet(32, (32, 64, 128, 256), c),
    "wrn_16_2": lambda c: repdistiller_wrn(16, 2, c),
    "wrn_40_1": lambda c: repdistiller_wrn(40, 1, c),
    "wrn_40_2": lambda c: repdistiller_wrn(40, 2, c),
    "vgg8": lambda c: repdistiller_vgg([[64], [128], [256], [512], [512]], c),
    "vgg13": lambda c: repdistiller_vgg([[64, 64], [128, 128], [256, 256], [512, 512],
                                         [512, 512]], c),
}
# The sizes the distillation papers print for CIFAR-100 (CRD's and DKD's tables), in millions.
PUBLISHED = {"resnet20": 0.28, "resnet32": 0.47, "resnet56": 0.86, "resnet110": 1.74,
             "resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_16_2": 0.70, "wrn_40_1": 0.57,
             "wrn_40_2": 2.26, "vgg8": 3.96, "vgg13": 9.46}
EXACT = {"resnet20": 278_324, "resnet32": 472_756, "resnet56": 861_620, "resnet110": 1_736_564,
         "resnet8x4": 1_233_540, "resnet32x4": 7_433_860, "wrn_16_2": 703_284,
         "wrn_40_1": 569_780, "wrn_40_2": 2_255_156, "vgg8": 3_965_028, "vgg13": 9_462_180}


@pytest.mark.parametrize("name", ZOO)
def test_zoo_has_repdistillers_parameter_counts(name):
    """Exact on CIFAR-100 and CIFAR-10, and within rounding of the published figure (vgg8's
    3,965,028 is printed as 3.96M: truncated, the others rounded)."""
    assert params_of(name, classes=100) == ZOO[name](100) == EXACT[name]
    assert params_of(name, classes=10) == ZOO[name](10)
    assert abs(EXACT[name] / 1e6 - PUBLISHED[name]) < 0.01


def shapes_of(name, classes, width=None, images=(2, 32, 32, 3), **options):
    model = create_model(name, classes, width, **options)
    variables = jax.eval_shape(lambda: init_variables(model, images[1:], 0))
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(images), train=False), variables)
    return model, variables, logits


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("classes", [10, 100])
def test_zoo_forward_gives_float32_logits(name, classes):
    _, _, logits = shapes_of(name, classes)
    assert logits.shape == (2, classes) and logits.dtype == jnp.float32
    _, _, bf16 = shapes_of(name, classes, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32


@pytest.mark.parametrize("name", ["wrn_16_2", "vgg8"])
def test_new_families_train_and_infer(name):
    """A real forward of the two new module classes in both modes (the ResNets are the
    ResNet class resnet18 runs), narrow and on 16x16 images to compile quickly: BatchNorm
    statistics move in training mode only."""
    model = create_model(name, 100, 2)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
    variables = init_variables(model, (16, 16, 3), 0)
    (logits, updates), inferred = jax.jit(lambda v, x: (
        model.apply(v, x, train=True, mutable=["batch_stats"]), model.apply(v, x)))(
            variables, images)
    assert logits.shape == inferred.shape == (4, 100)
    assert np.all(np.isfinite(np.asarray(logits))) and not np.allclose(logits, inferred)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                         updates["batch_stats"])
    assert all(jax.tree.leaves(moved))


@pytest.mark.parametrize("name", ZOO)
def test_zoo_takes_the_injected_convolution(name):
    """Every convolution runs through ``conv`` (the CPU jobs inject kd_jax.core.conv.CpuConv):
    as many calls to its conv_general_dilated as the model has convolution kernels."""
    calls = []

    def recording(*args, **kwargs):
        calls.append(1)
        return jax.lax.conv_general_dilated(*args, **kwargs)

    model = create_model(name, 10, 4, conv=partial(nn.Conv, conv_general_dilated=recording))
    variables = jax.eval_shape(lambda: init_variables(model, (32, 32, 3), 0))
    kernels = [a for a in jax.tree.leaves(variables["params"]) if a.ndim == 4]
    calls.clear()
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 32, 32, 3))), variables)
    assert len(calls) == len(kernels) > 0


@pytest.mark.parametrize(("name", "width", "stem", "last"), [
    ("resnet20", None, 16, 64), ("resnet20", 8, 8, 32), ("resnet8x4", None, 32, 256),
    ("resnet8x4", 8, 4, 32), ("wrn_40_2", None, 16, 128), ("wrn_40_2", 8, 4, 32),
    ("wrn_40_1", None, 16, 64), ("vgg8", None, 64, 512), ("vgg13", 8, 8, 64),
])
def test_width_is_the_first_stage_and_the_rest_keep_their_ratios(name, width, stem, last):
    _, variables, _ = shapes_of(name, 100, width)
    head = [a.shape for a in jax.tree.leaves(variables["params"]) if a.ndim == 2]
    assert variables["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, stem)  # the stem
    assert head == [(last, 100)]


def test_repdistiller_resnets_start_every_bn_scale_at_one():
    """RepDistiller (PyTorch) initialises BN weights to 1; kd-jax's resnet18 zero-inits the
    last one of each block (Goyal et al.). Checked on one block, which compiles quickly."""
    assert [create_model(n).zero_init for n in ("resnet20", "resnet8x4", "resnet18")] == [
        False, False, True]
    norm = partial(nn.BatchNorm, use_running_average=True)

    def scales(zero_init):
        block = BasicBlock(4, 1, nn.Conv, norm, zero_init)
        params = block.init(jax.random.key(0), jnp.ones((1, 4, 4, 4)))["params"]
        return [float(params[f"BatchNorm_{i}"]["scale"][0]) for i in range(2)]

    assert scales(False) == [1.0, 1.0] and scales(True) == [1.0, 0.0]


def test_vgg_pools_three_times_and_convolutions_see_4x4_last():
    """RepDistiller's VGG pools after blocks 0-2 only (its fourth pool is for 64-pixel
    images), so its last blocks convolve 4x4 maps; the ResNets' last stage sees 8x8."""
    def conv_maps(name):
        model = create_model(name, 10, 4)
        variables = jax.eval_shape(lambda: init_variables(model, (32, 32, 3), 0))
        _, state = jax.eval_shape(lambda v: model.apply(
            v, jnp.zeros((1, 32, 32, 3)), mutable=["intermediates"],
            capture_intermediates=lambda module, _: isinstance(module, nn.Conv)), variables)
        return sorted({a.shape[1] for a in jax.tree.leaves(state)})

    assert conv_maps("vgg8") == [4, 8, 16, 32]
    assert conv_maps("resnet20") == conv_maps("wrn_16_2") == [8, 16, 32]


def test_zoo_options():
    _, variables, _ = shapes_of("wrn_16_2", 10, bn_scale=False)
    assert not any(path[-1].key == "scale"
                   for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"]))
    assert create_model("vgg8", 10, bn_momentum=0.99).bn_momentum == 0.99
    assert create_model("resnet20", 10, whiten_patch=2).whiten_patch == 2
    with pytest.raises(KdError, match=r"^wrn_16_2 does not take whiten_patch \(set to 2\)$"):
        create_model("wrn_16_2", 10, whiten_patch=2)
    with pytest.raises(KdError, match=r"^vgg8 does not take dropout \(set to 0.5\)$"):
        create_model("vgg8", 10, dropout=0.5)


def test_logit_scale_multiplies_the_heads_output_and_adds_no_parameter():
    """airbench's 1/9: the same weights give the plain net's logits times the scale."""
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    plain, scaled = create_model("resnet8", 10, 4), create_model("resnet8", 10, 4,
                                                                  logit_scale=1 / 9)
    variables = plain.init(jax.random.PRNGKey(0), images)
    assert jax.tree.structure(scaled.init(jax.random.PRNGKey(0), images)) == \
        jax.tree.structure(variables)
    np.testing.assert_allclose(scaled.apply(variables, images),
                               np.asarray(plain.apply(variables, images)) / 9, rtol=1e-5)


@pytest.mark.parametrize(("name", "options", "nonlinearities"), [
    ("resnet8", {}, 1 + 2 * 3), ("resnet8", {"whiten_patch": 2}, 2 + 2 * 3),
    ("wrn_16_2", {}, 2 * 6 + 1), ("vgg8", {}, 5),
])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_the_activation_option_is_every_nonlinearity_of_the_net(
        monkeypatch, name, options, nonlinearities, activation):
    """Counted by recording flax's function of that name, as the ONNX exporter swaps it: a
    nonlinearity the option does not reach (a plain ``nn.relu`` for silu, a reference kept
    from import time for relu) is missing from the count (stem 1, 2 per block; the whitening
    layer's 1; the wide ResNet's final BN-ReLU; one per VGG convolution)."""
    calls = []

    def recording(x):
        calls.append(x.shape)
        return jax.nn.silu(x)

    monkeypatch.setattr(nn, activation, recording)
    model = create_model(name, 10, 4, activation=activation, **options)
    variables = jax.eval_shape(lambda: init_variables(model, (32, 32, 3), 0))
    calls.clear()
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 32, 32, 3))), variables)
    assert len(calls) == nonlinearities


def test_a_smooth_activation_changes_the_function_and_no_parameter():
    relu, silu = (create_model("resnet8", 10, 4, activation=a) for a in ("relu", "silu"))
    variables = init_variables(relu, (32, 32, 3), 0)
    assert jax.tree.map(jnp.shape, init_variables(silu, (32, 32, 3), 0)) == jax.tree.map(
        jnp.shape, variables)
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    plain = create_model("resnet8", 10, 4).apply(variables, images)
    np.testing.assert_array_equal(relu.apply(variables, images), plain)
    assert not np.allclose(silu.apply(variables, images), plain, atol=1e-3)
    assert model_options({"activation": "silu"})["activation"] == "silu"
    assert model_options({})["activation"] == "relu"  # a run made before the option
    with pytest.raises(KdError, match=r"^unknown activation 'tanh'; choose one of: relu, gelu, "
                                      r"silu$"):
        create_model("resnet8", 10, activation="tanh")
    with pytest.raises(KdError, match=r"^mlp2 does not take activation \(set to 'silu'\)$"):
        create_model("mlp2", 10, activation="silu")


def test_ghost_batchnorm_normalises_each_group_by_its_own_statistics():
    """Against numpy from Hoffer et al.'s definition: two ghost batches of 3, each standardised
    by its own (biased) mean and variance, then scaled and shifted; the running averages move
    towards the groups' mean statistics with flax's momentum convention."""
    x = np.random.default_rng(0).normal(2.0, 3.0, (6, 2, 2, 3)).astype(np.float32)
    layer = BatchNorm(use_running_average=False, ghost_batch_size=3, momentum=0.8, epsilon=1e-3)
    scale, bias = np.array([0.5, 1.0, 2.0]), np.array([-1.0, 0.0, 1.0])
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": np.full(3, 0.5), "var": np.full(3, 2.0)}}
    y, updated = layer.apply(variables, x, mutable=["batch_stats"])

    groups = x.reshape(2, 3, 2, 2, 3).astype(np.float64)
    mean, var = groups.mean((1, 2, 3), keepdims=True), groups.var((1, 2, 3), keepdims=True)
    expected = ((groups - mean) / np.sqrt(var + 1e-3) * scale + bias).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
    stats = updated["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.8 * 0.5 + 0.2 * mean.mean(0).ravel(), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.8 * 2.0 + 0.2 * var.mean(0).ravel(), rtol=1e-5)


def test_ghost_batchnorm_is_flax_batchnorm_at_one_group_and_in_inference():
    x = jax.random.normal(jax.random.key(1), (8, 3, 3, 4)) * 2 + 1
    variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    plain, plain_stats = nn.BatchNorm(use_running_average=False).apply(
        variables, x, mutable=["batch_stats"])
    ghost, ghost_stats = BatchNorm(use_running_average=False, ghost_batch_size=8).apply(
        variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(ghost, plain, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ghost_stats,
                 plain_stats)
    inference = BatchNorm(use_running_average=True, ghost_batch_size=2).apply(plain_stats | {
        "params": variables["params"]}, x)
    np.testing.assert_array_equal(inference, nn.BatchNorm(use_running_average=True).apply(
        plain_stats | {"params": variables["params"]}, x))
    with pytest.raises(ValueError, match=r"^a batch of 8 does not split into ghost batches of "
                                         r"3\b"):
        BatchNorm(use_running_average=False, ghost_batch_size=3).apply(
            variables, x, mutable=["batch_stats"])


def test_ghost_batches_change_training_only_and_no_parameter():
    """The option reaches every BatchNorm of the net (the training output moves) and keeps the
    variables' names and shapes (checkpoints, the optimizer's BN group and the exporters
    depend on ``BatchNorm_<i>``); in inference the net is the plain one."""
    plain, ghost = (create_model("resnet8", 10, 4, ghost_batch_size=g) for g in (0, 2))
    variables = init_variables(plain, (32, 32, 3), 0)
    assert jax.tree.map(jnp.shape, init_variables(ghost, (32, 32, 3), 0)) == jax.tree.map(
        jnp.shape, variables)
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    train = {m: m.apply(variables, images, train=True, mutable=["batch_stats"])[0]
             for m in (plain, ghost)}
    assert not np.allclose(train[ghost], train[plain], atol=1e-3)
    np.testing.assert_array_equal(ghost.apply(variables, images), plain.apply(variables, images))
    assert model_options({})["ghost_batch_size"] == 0  # a run made before the option
    with pytest.raises(KdError, match=r"^mlp2 does not take ghost_batch_size \(set to 32\)$"):
        create_model("mlp2", 10, ghost_batch_size=32)


def test_wide_block_projects_the_activated_input_and_adds_the_raw_one():
    """RepDistiller's wrn block: where the channels change, the 1x1 shortcut takes
    relu(bn(x)), so an all-negative input gives 0 through it; where they do not, x itself is
    added. (Both branches' convolutions of relu(bn(x)) = 0 give 0.)"""
    norm = partial(nn.BatchNorm, use_running_average=True)
    x = -jnp.ones((1, 4, 4, 4))
    for features, expected in ((8, 0.0), (4, -1.0)):
        block = WideBlock(features, 1, partial(nn.Conv, use_bias=False), norm)
        out = block.apply(block.init(jax.random.key(0), x), x)
        assert out.shape == (1, 4, 4, features)
        np.testing.assert_allclose(np.asarray(out), expected)

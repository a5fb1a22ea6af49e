"""Model zoo: CIFAR-stem ResNets, the CIFAR distillation benchmark's nets and MNIST MLPs,
built by name from a registry.

The ResNet follows the common PyTorch CIFAR ResNet (kuangliu/pytorch-cifar): a 3x3 stride-1
stem with no max-pool, BasicBlocks, stages of width, 2*width, 4*width, 8*width with strides
1/2/2/2, BatchNorm, global average pooling and a dense head. With ``width=64`` and 10 classes
``resnet18`` has exactly 11,173,962 parameters, the figure users compare against.

The CIFAR-100 distillation benchmark (CRD, Tian et al. 2020; DKD, Zhao et al. 2022; DIST)
uses RepDistiller's nets (``models/`` there), rebuilt here layer for layer with the same
parameter counts: ``resnet20`` .. ``resnet110`` (He et al. 2016, sec. 4.2: three stages of
16/32/64 channels, 6n+2 layers), ``resnet8x4`` and ``resnet32x4`` (a 32-channel stem, three
stages of 64/128/256), the pre-activation wide ResNets ``wrn_16_2``, ``wrn_40_1``,
``wrn_40_2`` (Zagoruyko & Komodakis 2016, WRN-depth-k) and the BatchNorm VGGs ``vgg8`` and
``vgg13`` (RepDistiller's ``vgg8_bn``/``vgg13_bn``: five conv blocks, global average pooling,
one linear layer). Their ``width`` is the first stage's (first block's) channels, as for
``resnet18``; every other layer keeps the architecture's ratio to it. (kd-jax's older
``resnet8`` is the 64-wide ResNet above with one block per stage, not RepDistiller's.)

The MLPs are the nets of Hinton et al. (2015, sec. 3): ``mlp2`` at width 1200 is the MNIST
teacher 784-1200-1200-10, at width 800 the student 784-800-800-10.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache, partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.core.features import sow_stages
from kd_jax.errors import KdError

ModuleDef = Any

# The nonlinearities a convolutional net may use: names of flax.linen's functions. ReLU is
# every paper's here; the smooth ones are for issue 17's recipe search (Page's ResNet-9 trains
# its 10 epochs with a smooth activation).
ACTIVATIONS = ("relu", "gelu", "silu")


def activation_function(name: str) -> Callable[[jax.Array], jax.Array]:
    """flax.linen's function ``name``, looked up when the net is called: the ONNX exporter
    (jax2onnx) swaps flax's functions for its own while it traces, and a function kept from
    import time would escape it (an exported ReLU would become generic max ops)."""
    return getattr(nn, name)


class BatchNorm(nn.BatchNorm):
    """flax's BatchNorm, with optional ghost statistics in training.

    ``ghost_batch_size > 0`` normalises each run of that many consecutive images of a training
    batch by the run's own mean and variance (Hoffer et al. 2017's ghost BatchNorm; Page's
    ResNet-9 uses groups of 32 at batch 512): the noise of small-batch statistics at a large
    batch's step count, a regulariser for short schedules. The running averages move towards
    the mean of the groups' statistics; inference (and initialisation) is flax's BatchNorm
    unchanged. The class keeps flax's name, so its layers are ``BatchNorm_<i>`` in the
    parameter tree with ghosts or without: checkpoints, the optimizer's BN group, the PyTorch
    twin and the exporters see the same layers. Features are on the last axis, as in every
    net here.
    """

    ghost_batch_size: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        train = not nn.merge_param("use_running_average", self.use_running_average,
                                   use_running_average)
        if not (train and self.ghost_batch_size) or self.is_initializing():
            return super().__call__(x, use_running_average)
        size = self.ghost_batch_size
        if x.shape[0] % size:
            raise ValueError(f"a batch of {x.shape[0]} does not split into ghost batches of "
                             f"{size}")
        features = (x.shape[-1],)
        groups = x.reshape(x.shape[0] // size, size, *x.shape[1:]).astype(jnp.float32)
        axes = tuple(range(1, groups.ndim - 1))
        mean = groups.mean(axes, keepdims=True)
        # E[x^2] - E[x]^2 in float32, as flax's own (fast) variance.
        var = jnp.maximum(jnp.square(groups).mean(axes, keepdims=True) - jnp.square(mean), 0)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        ra_mean.value = (self.momentum * ra_mean.value
                         + (1 - self.momentum) * mean.reshape(-1, *features).mean(0))
        ra_var.value = (self.momentum * ra_var.value
                        + (1 - self.momentum) * var.reshape(-1, *features).mean(0))
        y = (groups - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            y = y * self.param("scale", self.scale_init, features, self.param_dtype)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, features, self.param_dtype)
        return y.reshape(x.shape).astype(self.dtype or x.dtype)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual; a 1x1 projection when the shape changes."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    zero_init: bool = True
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation_function(self.activation)
        residual = x
        y = self.conv(self.features, (3, 3), (self.strides, self.strides))(x)
        y = act(self.norm()(y))
        y = self.conv(self.features, (3, 3))(y)
        # Zero-init the last BN scale of each block: every block starts as the identity,
        # which trains faster in short schedules (Goyal et al. 2017). RepDistiller's ResNets
        # start it at 1, as PyTorch does.
        y = self.norm(scale_init=nn.initializers.zeros)(y) if self.zero_init else self.norm()(y)
        if residual.shape != y.shape:
            residual = self.conv(self.features, (1, 1), (self.strides, self.strides))(residual)
            residual = self.norm()(residual)
        return act(y + residual)


class ConvNet(nn.Module):
    """The fields and layer factories every convolutional net of the zoo shares.

    ``bn_momentum`` and ``bn_epsilon`` follow flax's convention (running average kept with
    weight ``momentum``: PyTorch's 0.1 is 0.9 here); ``bn_scale=False`` fixes every BN scale
    at 1 (airbench and Page's ResNet-9 freeze them); ``ghost_batch_size`` gives every
    BatchNorm ghost statistics in training (:class:`BatchNorm`). ``activation`` names every
    nonlinearity
    (:data:`ACTIVATIONS`). ``conv`` replaces ``nn.Conv`` everywhere (e.g.
    kd_jax.core.conv.CpuConv, faster to train on CPUs). Subclasses declare themselves
    ``kw_only`` so that their own architecture fields may come without defaults.
    """

    num_classes: int = 10
    width: int = 64
    dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_scale: bool = True
    ghost_batch_size: int = 0
    activation: str = "relu"
    conv: ModuleDef = nn.Conv

    def _layers(self, train: bool, use_bias: bool = False) -> tuple[ModuleDef, ModuleDef]:
        """The net's convolution and BatchNorm, as partials to call inside ``__call__``.

        The convolution uses He et al.'s fan-out normal init (PyTorch's
        ``kaiming_normal_(mode="fan_out")``, RepDistiller's init of every net here).
        """
        conv = partial(self.conv, use_bias=use_bias, dtype=self.dtype, padding="SAME",
                       kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
        norm = partial(BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                       epsilon=self.bn_epsilon, dtype=self.dtype, use_scale=self.bn_scale,
                       ghost_batch_size=self.ghost_batch_size)
        return conv, norm


class ResNet(ConvNet, kw_only=True):
    """ResNet with a CIFAR stem (3x3 conv, stride 1, no max-pool).

    ``bn_scale=False`` also drops the zero-initialised last scale of each block.
    ``whiten_patch > 0`` puts a :class:`Whitening` layer in front of the stem (its kernel is
    set from the data by :func:`whitening_kernel` and never trained). The stem has
    ``width // stem_divisor`` channels (RepDistiller's x4 ResNets: 2); ``zero_init=False``
    starts every BN scale at 1 (RepDistiller's ResNets). ``logit_scale`` multiplies the
    head's output (airbench: 1/9): a smaller start and a slower head, which no learning-rate
    factor gives, since it also scales the gradient the head passes back.
    """

    stage_sizes: Sequence[int]
    whiten_patch: int = 0
    logit_scale: float = 1.0
    stem_divisor: int = 1
    zero_init: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = self._layers(train)
        act = activation_function(self.activation)
        x = x.astype(self.dtype)
        if self.whiten_patch:
            x = act(Whitening(self.whiten_patch, dtype=self.dtype, name="Whitening")(x))
        x = act(norm()(conv(max(self.width // self.stem_divisor, 1), (3, 3))(x)))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for block in range(num_blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(self.width * 2**stage, strides, conv, norm, self.zero_init,
                               self.activation)(x)
            sow_stages(self, x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        if self.logit_scale != 1:  # the default's graph (and its exports) stay as they were
            x = x * self.logit_scale
        return x.astype(jnp.float32)


class WideBlock(nn.Module):
    """A pre-activation wide-ResNet block (Zagoruyko & Komodakis 2016, fig. 1d; RepDistiller's
    ``wrn.BasicBlock``): BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the input, or a 1x1 projection
    of the *activated* input when the channels change."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation_function(self.activation)
        activated = act(self.norm()(x))
        y = self.conv(self.features, (3, 3), (self.strides, self.strides))(activated)
        y = self.conv(self.features, (3, 3))(act(self.norm()(y)))
        if x.shape[-1] != self.features or self.strides != 1:
            x = self.conv(self.features, (1, 1), (self.strides, self.strides))(activated)
        return x + y


class WideResNet(ConvNet, kw_only=True):
    """WRN-depth-k for 32x32 images: a 3x3 stem of ``width // widen`` channels, three stages
    of ``(depth - 4) / 6`` :class:`WideBlock` s with ``width``, 2x and 4x channels (strides
    1/2/2), a final BN-ReLU, global average pooling and a dense head. ``width = 16 * k``
    is the paper's WRN-depth-k."""

    blocks: int
    widen: int
    width: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = self._layers(train)
        act = activation_function(self.activation)
        x = conv(max(self.width // self.widen, 1), (3, 3))(x.astype(self.dtype))
        for stage in range(3):
            for block in range(self.blocks):
                strides = 2 if stage > 0 and block == 0 else 1
                x = WideBlock(self.width * 2**stage, strides, conv, norm, self.activation)(x)
            if stage < 2:  # the last stage's output is taken after the final BN-ReLU
                sow_stages(self, x)
        x = jnp.mean(sow_stages(self, act(norm()(x))), axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class VGG(ConvNet, kw_only=True):
    """RepDistiller's CIFAR VGG with BatchNorm: five blocks of 3x3 conv (with bias)-BN-ReLU,
    ``blocks[i]`` listing each block's channels as multiples of ``width``; 2x2 max-pools after
    the first three blocks (none after the fourth at 32x32, as there), global average pooling
    and one dense layer (init N(0, 0.01), as there) instead of VGG's three."""

    blocks: Sequence[Sequence[int]]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv, norm = self._layers(train, use_bias=True)
        act = activation_function(self.activation)
        x = x.astype(self.dtype)
        for i, block in enumerate(self.blocks):
            if 0 < i < 4:
                x = nn.max_pool(x, (2, 2), (2, 2))
            for multiple in block:
                x = act(norm()(conv(self.width * multiple, (3, 3))(x)))
            if i > 0:  # block 0 plays the stem
                sow_stages(self, x)
        x = jnp.mean(x, axis=(1, 2))
        head = nn.Dense(self.num_classes, dtype=self.dtype,
                        kernel_init=nn.initializers.normal(0.01))
        return head(x).astype(jnp.float32)


class Whitening(nn.Module):
    """A fixed ``patch x patch`` convolution that whitens the input's patches (airbench; Page's
    ResNet-9): each output channel is one principal direction of the training images'
    patches, scaled by 1 / sqrt(its variance), once with each sign (so a ReLU after it keeps
    both halves). Its kernel comes from :func:`whitening_kernel`; the optimizer never moves it
    (see ``kd_jax.core.optim.param_group``)."""

    patch: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        return nn.Conv(2 * channels * self.patch**2, (self.patch, self.patch), use_bias=False,
                       padding="SAME", dtype=self.dtype)(x)


def whitening_kernel(images: np.ndarray, patch: int, epsilon: float = 5e-4,
                     chunk: int = 500) -> np.ndarray:
    """The :class:`Whitening` kernel (HWIO) from normalised float images [N, H, W, C].

    The eigenvectors of the patches' (uncentred) covariance, scaled by 1 / sqrt(eigenvalue +
    ``epsilon``), largest variance first, then the same with the opposite sign.
    """
    channels = images.shape[-1]
    dims = patch * patch * channels
    covariance, count = np.zeros((dims, dims)), 0
    for start in range(0, len(images), chunk):
        windows = np.lib.stride_tricks.sliding_window_view(
            images[start:start + chunk], (patch, patch), axis=(1, 2))  # N, H', W', C, p, p
        flat = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, dims).astype(np.float64)
        covariance += flat.T @ flat
        count += len(flat)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance / count)
    order = np.argsort(eigenvalues)[::-1]
    scaled = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + epsilon)
    kernel = scaled.reshape(patch, patch, channels, dims)
    return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


def with_whitening(variables: dict, images: np.ndarray, patch: int) -> dict:
    """``variables`` with the :class:`Whitening` kernel set from normalised ``images``."""
    kernel = whitening_kernel(images, patch)
    params = {**variables["params"], "Whitening": {"Conv_0": {"kernel": jnp.asarray(kernel)}}}
    return {**variables, "params": params}


class MLP(nn.Module):
    """Fully connected ReLU net on flattened images, with Hinton et al. (2012)'s dropout.

    ``input_dropout`` drops pixels, ``dropout`` hidden units; both are active only when
    ``train`` is true (the train step passes a ``dropout`` rng).
    """

    hidden: Sequence[int]
    num_classes: int = 10
    dropout: float = 0.0
    input_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dense = partial(nn.Dense, dtype=self.dtype,
                        kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"))
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        x = nn.Dropout(self.input_dropout, deterministic=not train)(x)
        for units in self.hidden:
            x = nn.Dropout(self.dropout, deterministic=not train)(
                sow_stages(self, nn.relu(dense(units)(x))))
        return dense(self.num_classes)(x).astype(jnp.float32)


# The options each family takes; create_model refuses the others' when they differ from
# the defaults, so a flag that would do nothing says so.
MLP_OPTIONS = ("dropout", "input_dropout")
CONVNET_OPTIONS = ("bn_momentum", "bn_epsilon", "bn_scale", "ghost_batch_size", "activation")
RESNET_OPTIONS = (*CONVNET_OPTIONS, "whiten_patch", "logit_scale")


def _mlp(depth: int) -> Callable[..., nn.Module]:
    def build(num_classes: int, width: int, dtype: Any, **options: Any) -> nn.Module:
        return MLP(hidden=(width,) * depth, num_classes=num_classes, dtype=dtype, **options)

    build.options = MLP_OPTIONS
    return build


def _builder(module: type[nn.Module], options: Sequence[str],
             **architecture: Any) -> Callable[..., nn.Module]:
    def build(num_classes: int, width: int, dtype: Any, **chosen: Any) -> nn.Module:
        return module(**architecture, num_classes=num_classes, width=width, dtype=dtype,
                      **chosen)

    build.options = options
    return build


def _resnet(stage_sizes: Sequence[int], **architecture: Any) -> Callable[..., nn.Module]:
    return _builder(ResNet, RESNET_OPTIONS, stage_sizes=tuple(stage_sizes), **architecture)


def _cifar_resnet(depth: int, stem_divisor: int = 1) -> Callable[..., nn.Module]:
    """RepDistiller's ResNet-depth: 3 stages of (depth - 2) / 6 blocks, BN scales from 1."""
    return _resnet(((depth - 2) // 6,) * 3, stem_divisor=stem_divisor, zero_init=False)


def _wrn(depth: int, widen: int) -> Callable[..., nn.Module]:
    return _builder(WideResNet, CONVNET_OPTIONS, blocks=(depth - 4) // 6, widen=widen)


def _vgg(*blocks: Sequence[int]) -> Callable[..., nn.Module]:
    return _builder(VGG, CONVNET_OPTIONS, blocks=tuple(map(tuple, blocks)))


# name -> (builder, default width). ``width`` is the first stage's channels for ResNets and
# WRNs, the first block's for VGGs, and the units of every hidden layer for MLPs (``mlpN``
# has N hidden layers).
MODELS: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "resnet8": (_resnet((1, 1, 1)), 64),
    "resnet10": (_resnet((1, 1, 1, 1)), 64),
    "resnet18": (_resnet((2, 2, 2, 2)), 64),
    "resnet34": (_resnet((3, 4, 6, 3)), 64),
    "resnet20": (_cifar_resnet(20), 16),
    "resnet32": (_cifar_resnet(32), 16),
    "resnet56": (_cifar_resnet(56), 16),
    "resnet110": (_cifar_resnet(110), 16),
    "resnet8x4": (_cifar_resnet(8, stem_divisor=2), 64),
    "resnet32x4": (_cifar_resnet(32, stem_divisor=2), 64),
    "wrn_16_2": (_wrn(16, 2), 32),
    "wrn_40_1": (_wrn(40, 1), 16),
    "wrn_40_2": (_wrn(40, 2), 32),
    "vgg8": (_vgg((1,), (2,), (4,), (8,), (8,)), 64),
    "vgg13": (_vgg((1, 1), (2, 2), (4, 4), (8, 8), (8, 8)), 64),
    "mlp1": (_mlp(1), 800),
    "mlp2": (_mlp(2), 1200),
    "mlp3": (_mlp(3), 1200),
}


def create_model(name: str, num_classes: int = 10, width: int | None = None,
                 dtype: Any = jnp.float32, conv: ModuleDef | None = None,
                 **options: Any) -> nn.Module:
    """Build a registered model; raises ``KdError`` naming the choices for an unknown name.

    ``conv`` replaces every convolutional model's ``nn.Conv`` (MLPs have none). ``options``
    are the family's fields (:data:`MLP_OPTIONS`, :data:`RESNET_OPTIONS`,
    :data:`CONVNET_OPTIONS` for the wide ResNets and VGGs); any other family's option is
    accepted only at its default, where it changes nothing.
    """
    width = model_width(name, width)
    build = MODELS[name][0]
    activation = options.get("activation", "relu")
    if activation not in ACTIVATIONS:
        raise KdError(f"unknown activation {activation!r}; choose one of: "
                      f"{', '.join(ACTIVATIONS)}")
    for key, value in options.items():
        if key not in build.options and value != _OPTION_DEFAULTS[key]:
            raise KdError(f"{name} does not take {key} (set to {value!r})")
    chosen = {k: v for k, v in options.items() if k in build.options}
    if conv is not None and "bn_scale" in build.options:
        chosen["conv"] = conv
    return build(num_classes, width, dtype, **chosen)


_OPTION_DEFAULTS = {"dropout": 0.0, "input_dropout": 0.0, "bn_momentum": 0.9,
                    "bn_epsilon": 1e-5, "bn_scale": True, "ghost_batch_size": 0,
                    "activation": "relu",
                    "whiten_patch": 0, "logit_scale": 1.0}


def model_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model options a run's config (a config dataclass's fields or its config.json) sets;
    missing keys (runs made before an option existed) keep the default."""
    return {k: config.get(k, default) for k, default in _OPTION_DEFAULTS.items()}


def _registered(name: str) -> tuple[Callable[..., nn.Module], int]:
    """The builder and default width of the model ``name``; ``KdError`` naming the choices."""
    if name not in MODELS:
        raise KdError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def model_takes(name: str, option: str) -> bool:
    """Whether the registered model ``name`` takes ``option`` (a field of its family)."""
    return option in _registered(name)[0].options


def model_width(name: str, width: int | None) -> int:
    """The width a model named ``name`` is built with: ``width``, or the model's default."""
    width = _registered(name)[1] if width is None else width
    if width < 1:
        raise KdError(f"width must be >= 1, got {width}")
    return width


@lru_cache(maxsize=32)
def _compiled_init(model: nn.Module, image_shape: tuple[int, ...]) -> Callable:
    # The dummy batch is made inside the jitted function: made outside, a first call under
    # another transformation (a caller's jit) would keep its tracer in the cache.
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, *image_shape), jnp.float32),
                                          train=False))


def init_variables(model: nn.Module, image_shape: Sequence[int], seed: int) -> dict:
    """Initialise params (and batch_stats for BN models) for images of ``image_shape`` (HWC).

    The jitted initialiser is kept per (model, shape): linen modules compare by their fields,
    so another seed of the same architecture (the teachers of an ensemble) compiles nothing.
    """
    image_shape = tuple(image_shape)
    try:
        init = _compiled_init(model, image_shape)
    except TypeError:  # a module with unhashable fields: compiled for this call alone
        init = _compiled_init.__wrapped__(model, image_shape)
    return init(jax.random.key(seed))


def count_params(params: Any) -> int:
    """Number of scalars in a params pytree (batch statistics are not parameters)."""
    return sum(int(x.size) for x in jax.tree.leaves(params))

"""One dataclass config per job: defaults < ``--config`` YAML < command-line flags.

Every field is a flag of the same name (``train_subset`` -> ``--train-subset``), so a job can be
shrunk to a CPU-sized run by flags alone and the YAML files list nothing the flags cannot.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import typing
from pathlib import Path
from typing import Any

from kd_jax.core.augment import PAD_MODES, TTA_MODES
from kd_jax.core.features import FEATURE_LOSSES, FeatureLoss, make_feature_loss
from kd_jax.core.losses import LOSSES, DistillLoss, make_loss
from kd_jax.core.models import model_takes
from kd_jax.core.optim import check_recipe
from kd_jax.core.teachers import COMBINE, LAYOUTS
from kd_jax.errors import KdError


@dataclasses.dataclass
class RunConfig:
    """What teacher training and distillation share."""

    dataset: str = "cifar10"  # cifar10, cifar100 or mnist
    data_dir: str | None = None  # else $KD_JAX_DATA_DIR, else download through tfds
    workdir: str | None = None  # default runs/<job>-<timestamp>
    epochs: int = 10  # passes over the training set
    batch_size: int = 512  # global batch, split over the devices
    eval_batch_size: int = 1000  # images per evaluation call (memory only)
    # Peak of the warmup + linear-decay schedule; 1.6 at batch 512 was picked on a validation
    # split over 0.4-2.4 on an H200 (docs/RESULTS.md): 0.4 trained ~2 points worse in 10 epochs.
    learning_rate: float = 1.6
    warmup_fraction: float = 0.2  # warm up over this fraction of all steps, then decay
    final_lr_factor: float = 0.0  # the linear decay ends at this fraction of the peak
    # After the warmup: "linear" decay, or "step": the rate times lr_decay_factor from each
    # of the (0-based) epochs lr_decay_epochs on (the CIFAR-100 benchmarks' "150,180,210", 0.1).
    lr_schedule: str = "linear"
    lr_decay_epochs: str = ""  # step schedule: a comma list of epochs
    lr_decay_factor: float = 0.1  # step schedule: the factor at each of those epochs
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # false: PyTorch's default momentum, as RepDistiller and mdistiller
    weight_decay: float = 5e-4  # applied to kernels only, not to BN scales or biases
    # Learning-rate factors by parameter group (kd_jax.core.optim.param_group):
    # BatchNorm scales and biases (airbench drives BN biases 64x; at this peak rate 64x
    # diverged on the proxy). Unset: 16 where the scales are frozen, else 4 (with_model_recipe).
    bn_lr_factor: float | None = None
    head_lr_factor: float = 1.0  # the final dense layer
    bias_lr_factor: float = 1.0  # the other biases
    bn_weight_decay: float = 0.0  # weight decay of BatchNorm scales and biases
    ema_decay: float = 0.0  # > 0: evaluate and ship an exponential moving average of the weights
    lookahead_steps: int = 0  # > 0: lookahead (Zhang et al. 2019): sync slow weights every N steps
    lookahead_alpha: float = 0.5  # lookahead: how far the slow weights move towards the fast
    lookahead_ramp: bool = False  # lookahead: ramp that from 1 to lookahead_alpha (airbench94)
    dtype: str = "auto"  # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU
    # The translation and flips default to issue 17's CPU proxy (docs/RECIPE.md):
    # alternating flips and BN at 4x with no translation beat a zero-padded 4-pixel crop, random
    # flips and BN at 1x on validation at both seeds, and beat a 2-pixel reflected crop at every
    # seed measured, for teachers and students, by letting the net fit its batches (3.5 points
    # more training accuracy). Configs that follow a paper's recipe (configs/mnist_*.yaml,
    # configs/cifar100_*.yaml) pin their own.
    crop_pad: int = 0  # random translation by up to this many pixels (0 = none)
    pad_mode: str = "reflect"  # the translation's border, where crop_pad > 0: zeros or reflect
    flip: bool = True  # random horizontal flips
    alternating_flip: bool = True  # airbench's flips: each image mirrored every other epoch
    cutout: int = 0  # > 0: blank a random square of this side in each training image
    tta: str = "none"  # final test-time augmentation: none, flip or flip_translate
    # ResNets: BatchNorm's running-average momentum (flax convention: PyTorch's 0.1 is 0.9)
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5  # ResNets: BatchNorm's epsilon
    # Conv nets: false fixes every BatchNorm scale at 1 (Page's ResNet-9, airbench). Unset:
    # false for conv nets (see with_model_recipe).
    bn_scale: bool | None = None
    # Conv nets: > 0 normalises each run of this many images of a training batch by its own
    # statistics (ghost BatchNorm; Page's ResNet-9: 32); it must divide batch_size. Unset: 32
    # for a conv net whose batch splits into 32s, else 0 (see with_model_recipe).
    ghost_batch_size: int | None = None
    # Conv nets: relu, gelu or silu (kd_jax.core.models.ACTIVATIONS). Unset: silu for conv
    # nets, and the ReLU MLPs have built in (see with_model_recipe).
    activation: str | None = None
    whiten_patch: int = 0  # > 0: a frozen PCA-whitening layer of this patch size before the stem
    logit_scale: float = 1.0  # ResNets: multiplies the head's output (airbench: 1/9)
    dropout: float = 0.0  # MLPs: dropout rate of hidden units (Hinton et al. 2012: 0.5)
    input_dropout: float = 0.0  # MLPs: dropout rate of input pixels (Hinton et al. 2012: 0.2)
    max_norm: float = 0.0  # > 0: cap each unit's incoming weight norm after every update
    train_subset: int | None = None  # use only the first N training images
    validation: int = 0  # hold out the last N training images, report val_accuracy (tuning)
    steps_per_dispatch: int = 0  # train steps per jitted call (0 = about 10 calls per epoch)
    seed: int = 0  # initialisation, data order and augmentation all derive from it
    checkpoint_every_steps: int = 0  # also checkpoint mid-epoch every N steps (0 = epochs only)
    resume: bool = False  # continue the workdir's run from its latest checkpoint
    overwrite: bool = False  # replace the run in the workdir
    progress: bool = True  # a progress bar on the terminal

    def validate(self) -> None:
        """Raise ``KdError`` for the first setting that cannot work."""
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.eval_batch_size >= 1,
             f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.cutout >= 0, f"cutout must be >= 0, got {self.cutout}"),
            (self.whiten_patch >= 0, f"whiten_patch must be >= 0, got {self.whiten_patch}"),
            (self.logit_scale > 0, f"logit_scale must be > 0, got {self.logit_scale}"),
            (self.pad_mode in PAD_MODES,
             f"pad_mode must be {' or '.join(PAD_MODES)}, got {self.pad_mode!r}"),
            (self.tta in TTA_MODES, f"tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}"),
            (0 <= self.bn_momentum < 1, f"bn_momentum must be in [0, 1), got {self.bn_momentum}"),
            (self.bn_epsilon > 0, f"bn_epsilon must be > 0, got {self.bn_epsilon}"),
            (self.ghost_batch_size is None or self.ghost_batch_size >= 0,
             f"ghost_batch_size must be >= 0, got {self.ghost_batch_size}"),
            (not self.ghost_batch_size or self.batch_size % self.ghost_batch_size == 0,
             f"ghost_batch_size {self.ghost_batch_size} must divide batch_size "
             f"{self.batch_size}"),
            (self.crop_pad >= 0, f"crop_pad must be >= 0, got {self.crop_pad}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (0 <= self.input_dropout < 1,
             f"input_dropout must be in [0, 1), got {self.input_dropout}"),
            (self.validation >= 0, f"validation must be >= 0, got {self.validation}"),
            (self.steps_per_dispatch >= 0,
             f"steps_per_dispatch must be >= 0, got {self.steps_per_dispatch}"),
            (self.checkpoint_every_steps >= 0,
             f"checkpoint_every_steps must be >= 0, got {self.checkpoint_every_steps}"),
            (self.dtype in ("auto", "float32", "bfloat16"),
             f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
        ]
        for ok, message in checks:
            if not ok:
                raise KdError(message)
        check_recipe(self, unset=("bn_lr_factor",))  # with_model_recipe fills it in
        decay_epochs(self.lr_decay_epochs)


# The conv-net recipe of issue 17's CPU proxy (docs/RECIPE.md): ghost BatchNorm over 32 images
# with SiLU (Page's pairing) beat plain BatchNorm with ReLU on validation at both seeds (+0.31
# validation, +0.81 test points, means of three runs each); either alone did not. On top of it,
# frozen BN scales with BN biases at 16x beat learned scales at 4x on validation at both seeds
# (+0.60 and +0.20) and fit 1.3 points more of the training set; learned scales at 16x had lost
# about a validation point against 4x, so the rate follows the scales.
CONVNET_GHOST_BATCH = 32
CONVNET_ACTIVATION = "silu"
CONVNET_BN_SCALE = False
BN_LR_FACTOR = {True: 4.0, False: 16.0}  # by whether BN scales are learned


def with_model_recipe(config: TeacherConfig | DistillConfig) -> TeacherConfig | DistillConfig:
    """``config`` with its unset model options filled in for its trained model's family.

    A conv net gets :data:`CONVNET_ACTIVATION`, frozen BN scales, and ghost BatchNorm over
    :data:`CONVNET_GHOST_BATCH` images where its batch splits into them (plain BatchNorm where
    it does not, so any batch size trains); an MLP keeps its ReLUs and has no BatchNorm. The
    BN learning-rate factor follows whether the scales train (:data:`BN_LR_FACTOR`). This
    runs before the workdir is opened, so config.json records what trained and a checkpoint
    rebuilds the same net.
    """
    convnet = model_takes(config.trained_model, "activation")
    ghost = config.ghost_batch_size
    if ghost is None:
        splits = config.batch_size % CONVNET_GHOST_BATCH == 0
        ghost = CONVNET_GHOST_BATCH if convnet and splits else 0
    activation = config.activation or (CONVNET_ACTIVATION if convnet else "relu")
    bn_scale = config.bn_scale
    if bn_scale is None:
        bn_scale = CONVNET_BN_SCALE if convnet else True  # an MLP has no BatchNorm to freeze
    bn_lr_factor = config.bn_lr_factor if config.bn_lr_factor is not None \
        else BN_LR_FACTOR[bn_scale]
    return dataclasses.replace(config, ghost_batch_size=ghost, activation=activation,
                               bn_scale=bn_scale, bn_lr_factor=bn_lr_factor)


def decay_epochs(text: str) -> tuple[int, ...]:
    """``"150,180,210"`` -> ``(150, 180, 210)``: positive, increasing epochs ("" -> none)."""
    try:
        epochs = tuple(int(e) for e in text.split(",")) if text.strip() else ()
    except ValueError:
        raise KdError(f"lr_decay_epochs must be a comma list of epochs, got {text!r}") from None
    if any(e < 1 for e in epochs) or list(epochs) != sorted(set(epochs)):
        raise KdError(f"lr_decay_epochs must be increasing epochs >= 1, got {text!r}")
    return epochs


@dataclasses.dataclass
class TeacherConfig(RunConfig):
    """``train_teacher.py``: a model trained on labels with cross-entropy."""

    model: str = "resnet18"  # the architecture (kd_jax.core.models.MODELS)
    width: int | None = None  # first-stage channels (resnet default 64)
    # 0.2 came with the learning rate in the validation-split pick; Mueller et al. (2019) found
    # smoothed teachers distill worse; here T=4 students ended 0.15-0.65 points below their
    # smoothed teachers, above both students of the earlier unsmoothed lr-0.4 teachers.
    label_smoothing: float = 0.2

    @property
    def trained_model(self) -> str:
        return self.model

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.label_smoothing < 1:
            raise KdError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclasses.dataclass
class DistillConfig(RunConfig):
    """``distill.py``: a student trained on a frozen teacher's softened outputs."""

    # A teacher's workdir; repeat for an ensemble (YAML: teachers, a list). Default: the
    # latest runs/teacher-*.
    teachers: list[str] | None = dataclasses.field(default=None,
                                                   metadata={"flag": "--teacher-dir"})
    combine: str = "probs"  # an ensemble's target: the mean of probabilities, or of logits
    # How an ensemble's teachers run: stacked (one vmapped forward per architecture), loop (one
    # after the other) or auto (the loop on CPUs, where it is measured faster; else stacked).
    ensemble_layout: str = "auto"
    teacher_model: str | None = None  # if set, refuse a teacher of another architecture
    teacher_width: int | None = None  # if set, refuse a teacher of another width
    # The distillation loss (kd_jax.core.losses.LOSSES): kd (Hinton et al. 2015), dkd (Zhao et
    # al. 2022; it needs the true class, so alpha < 1) or dist (Huang et al. 2022). A loss's
    # own settings are the fields named after it (dkd_beta is dkd's beta); paper defaults.
    loss: str = "kd"
    standardize_logits: bool = False  # z-score every logit row first (Sun et al. 2024)
    dkd_alpha: float = 1.0  # weight of TCKD, the target-vs-rest KL
    dkd_beta: float = 8.0  # weight of NCKD, the KL among non-target classes
    dkd_warmup_epochs: int = 20  # the DKD term's weight ramps up linearly over these epochs
    dist_beta: float = 1.0  # weight of DIST's inter-class relation (per image)
    dist_gamma: float = 1.0  # weight of DIST's intra-class relation (per class)
    # A feature method added to the loss (kd_jax.core.features): none, fitnets (Romero et al.
    # 2015: a hint stage through a learned regressor) or at (attention transfer, Zagoruyko &
    # Komodakis 2017). With --alpha 0 it is RepDistiller's setting: cross-entropy + feature.
    feature_loss: str = "none"
    feature_weight: float | None = None  # its weight; default the method's (fitnets 100, at 1000)
    fitnets_hint_stage: int = 1  # the stage regressed (0-based; 1 = RepDistiller's hint layer)
    at_p: float = 2.0  # attention maps are mean_c |A_c|^p
    student: str = "resnet18"  # the student's architecture (see train_teacher.py --model)
    student_width: int | None = None  # the student's first-stage channels
    temperature: float = 4.0  # T of the softened distributions
    alpha: float = 1.0  # weight of the soft term; 1 = labels are never read
    omit_class: str | None = None  # drop this class from the transfer set (Hinton sec. 3)
    transfer_classes: str | None = None  # e.g. "7,8": the transfer set holds only these
    holdout: int = 5000  # with either: last N training images kept aside to choose the bias
    # Also report this fixed offset added to the left-out classes' logits (the paper's 3.5 for
    # an omitted 3; 7.6 for "only 7s and 8s", the same as lowering 7 and 8 by 7.6).
    bias_offset: float | None = None

    @property
    def trained_model(self) -> str:
        return self.student

    def validate(self) -> None:
        super().validate()
        if not self.temperature > 0:
            raise KdError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise KdError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.holdout < 1:
            raise KdError(f"holdout must be >= 1, got {self.holdout}")
        if self.omit_class and self.transfer_classes:
            raise KdError("--omit-class and --transfer-classes exclude each other")
        if self.ensemble_layout not in LAYOUTS:
            raise KdError(f"ensemble_layout must be one of {', '.join(LAYOUTS)}, "
                          f"got {self.ensemble_layout!r}")
        if self.combine not in COMBINE:
            raise KdError(f"combine must be {' or '.join(COMBINE)}, got {self.combine!r}")
        for f in dataclasses.fields(self):
            owner = f.name.split("_")[0]
            if owner in LOSSES and owner != self.loss and getattr(self, f.name) != f.default:
                raise KdError(f"{f.name} is a setting of loss {owner}, not of {self.loss}")
            if (owner in FEATURE_LOSSES and owner != self.feature_loss
                    and getattr(self, f.name) != f.default):
                raise KdError(f"{f.name} is a setting of feature loss {owner}, "
                              f"not of {self.feature_loss}")
        if self.feature_loss == "none" and self.feature_weight is not None:
            raise KdError("feature_weight weighs a feature loss: set --feature-loss too")
        self.feature_method()
        if self.distill_loss().needs_labels and self.alpha == 1:
            raise KdError(f"loss {self.loss} needs each image's true class, so it cannot run "
                          "label-free (alpha 1): pass --alpha below 1 to train on labels too")

    def loss_params(self) -> dict[str, Any]:
        """The chosen loss's own settings, as its builder takes them: the fields named
        ``<loss>_<name>`` (``dkd_beta`` -> ``beta``)."""
        prefix = f"{self.loss}_"
        return {f.name[len(prefix):]: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.startswith(prefix)}

    def feature_method(self) -> FeatureLoss | None:
        """The configured feature method (None for none); ``KdError`` for a bad setting."""
        if self.feature_loss == "none":
            return None
        return make_feature_loss(self.feature_loss, self.feature_weight,
                                 self.fitnets_hint_stage, self.at_p)

    def distill_loss(self) -> DistillLoss:
        """The configured loss; ``KdError`` for an unknown name or a bad setting."""
        return make_loss(self.loss, self.temperature, standardize=self.standardize_logits,
                         **self.loss_params())


def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kind = args[0] if args else hint
        out[f.name] = typing.get_origin(kind) or kind  # list[str] -> list
    return out


def _coerce(name: str, value: Any, kind: type, source: str) -> Any:
    if value is None:
        return None
    if kind is list:  # a list of strings; one string is a list of one
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise KdError(f"{source}: {name} must be a string or a list of strings, got "
                          f"{value!r}")
        return items
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    is_bool = isinstance(value, bool)
    if not isinstance(value, kind) or is_bool != (kind is bool):
        raise KdError(f"{source}: {name} must be {kind.__name__}, got {value!r}")
    return value


def load_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML mapping of config keys; unknown keys and wrong types are errors."""
    import yaml  # only when a config file is given

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise KdError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:  # deep nesting
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KdError(f"{path}: not readable YAML ({reason})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KdError(f"{path}: a config must be a mapping of keys to values, "
                      f"found {type(data).__name__}")
    kinds = _field_types(cls)
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in kinds:
            raise KdError(f"{path}: unknown config key {key!r}")
        out[name] = _coerce(name, value, kinds[name], str(path))
    return out


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: the one on its line, else the block above it.

    The comments beside the defaults are where their reasons are written; ``--help`` shows
    them, so flag help and the code cannot drift apart.
    """
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        block: list[str] = []
        for line in inspect.getsource(klass).splitlines():
            code, _, comment = line.strip().partition("#")
            name = code.split(":")[0].strip()
            if not code:
                block = block + [comment.strip()] if comment else []
            elif name.isidentifier() and ":" in code and not code.startswith(("def", "class")):
                out[name] = comment.strip() or " ".join(block)
                block = []
            else:
                block = []
    return out


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    """One ``--flag`` per config field (all default to "not given"), plus --config and --debug;
    each flag's help is its field's comment and default."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file of config keys (flags override it)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    comments = field_comments(cls)
    for name, kind in _field_types(cls).items():
        flag = fields[name].metadata.get("flag") or "--" + name.replace("_", "-")
        default = fields[name].default
        shown = "" if default is None or default == "" else f" (default {default})"
        help_text = (comments.get(name, "") + shown).strip().replace("%", "%%")
        if kind is bool:
            options = {"action": argparse.BooleanOptionalAction}
        elif kind is list:
            options = {"dest": name, "action": "append", "metavar": "DIR"}
        else:
            options = {"type": kind, "metavar": kind.__name__.upper()}
        parser.add_argument(flag, default=None, help=help_text, **options)
    return parser


def resolve(cls: type, args: argparse.Namespace):  # noqa: ANN201 - returns an instance of cls
    """Defaults, then the YAML file, then flags; validated."""
    values = load_yaml(args.config, cls) if args.config else {}
    values.update({k: v for k, v in vars(args).items()
                   if k not in ("config", "debug") and v is not None})
    config = cls(**values)
    config.validate()
    return config


def to_json(config: RunConfig) -> str:
    return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)

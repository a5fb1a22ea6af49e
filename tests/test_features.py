"""Feature distillation (issue 20): FitNets and attention transfer against the papers'
equations in numpy, the zoo's stage outputs, the pairing errors, and the regressor's life:
trained with the student, checkpointed, resumed bit-identically, never exported."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import CrashAfterCheckpoint, finite_differences

import kd_jax
from kd_jax.cli.config import DistillConfig
from kd_jax.core.checkpoint import load_frozen
from kd_jax.core.features import (
    ADAPTERS,
    Regressor,
    attention_loss,
    feature_term,
    hint_loss,
    init_adapters,
    make_feature_loss,
    sow_stages,
    stage_shapes,
)
from kd_jax.core.losses import make_loss
from kd_jax.core.models import MODELS, count_params, create_model, init_variables, model_width
from kd_jax.core.steps import create_state, make_distill_step
from kd_jax.core.teachers import Teacher, make_ensemble
from kd_jax.errors import KdError

rng = np.random.default_rng(0)


# --------------------------------------------------------------------------- numpy, from the papers
def paper_attention(features: np.ndarray, p: float) -> np.ndarray:
    """Zagoruyko & Komodakis (2017), sec. 3.1: F(A) = sum_c |A_c|^p over channels (a sum, where
    the code takes a mean), vectorised and divided by its L2 norm (eq. 2)."""
    q = (np.abs(features) ** p).sum(axis=-1).reshape(len(features), -1)
    return q / np.sqrt((q ** 2).sum(axis=1, keepdims=True))


def paper_at_loss(student: list[np.ndarray], teacher: list[np.ndarray], p: float) -> float:
    return sum(float(np.mean((paper_attention(s, p) - paper_attention(t, p)) ** 2))
               for s, t in zip(student, teacher, strict=True))


def paper_hint_loss(student: np.ndarray, hint: np.ndarray, kernel: np.ndarray,
                    bias: np.ndarray) -> float:
    """Romero et al. (2015), eq. 3, as a mean: a VALID convolution regressor with a ReLU,
    written as explicit sums over the kernel window."""
    k = kernel.shape[0]
    n, h, w, _ = hint.shape
    out = np.zeros_like(hint)
    for i in range(h):
        for j in range(w):
            window = student[:, i:i + k, j:j + k, :]  # n, k, k, c_in
            out[:, i, j, :] = np.einsum("nabc,abcd->nd", window, kernel) + bias
    return float(np.mean((np.maximum(out, 0) - hint) ** 2))


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_attention_transfer_matches_the_paper_in_value_and_gradient(p):
    student = [rng.normal(size=(3, 4, 4, 5)), rng.normal(size=(3, 2, 2, 7))]
    teacher = [rng.normal(size=(3, 4, 4, 6)), rng.normal(size=(3, 2, 2, 3))]
    ours = attention_loss([jnp.asarray(s, jnp.float32) for s in student],
                          [jnp.asarray(t, jnp.float32) for t in teacher], p)
    np.testing.assert_allclose(float(ours), paper_at_loss(student, teacher, p), rtol=1e-5)

    grad = jax.grad(lambda s0: attention_loss([s0, jnp.asarray(student[1])],
                                              [jnp.asarray(t) for t in teacher], p))
    expected = finite_differences(lambda s0: paper_at_loss([s0, student[1]], teacher, p),
                                  student[0])
    np.testing.assert_allclose(np.asarray(grad(jnp.asarray(student[0], jnp.float32))),
                               expected, rtol=2e-3, atol=1e-6)


def test_attention_transfer_ignores_each_images_scale_and_is_zero_on_itself():
    """The maps are normalised per image: scaling one image's features by any positive number
    (the teacher's or the student's, each image its own) changes nothing."""
    student, teacher = rng.normal(size=(4, 4, 4, 3)), rng.normal(size=(4, 4, 4, 8))
    scale = np.array([0.1, 1.0, 7.0, 300.0]).reshape(4, 1, 1, 1)
    base = float(attention_loss([jnp.asarray(student)], [jnp.asarray(teacher)]))
    scaled = float(attention_loss([jnp.asarray(student * scale)], [jnp.asarray(teacher / scale)]))
    np.testing.assert_allclose(scaled, base, rtol=1e-5)
    assert base > 0
    assert float(attention_loss([jnp.asarray(teacher)], [jnp.asarray(teacher * scale)])) < 1e-12


def test_fitnets_hint_matches_the_paper_in_value_and_gradient():
    """A 6x6 student stage regressed onto a 4x4 hint: the paper's kernel 1 + 6 - 4 = 3."""
    student = rng.normal(size=(2, 6, 6, 3))
    hint = np.maximum(rng.normal(size=(2, 4, 4, 5)), 0)
    loss = make_feature_loss("fitnets", weight=1.0, hint_stage=0)
    adapters = init_adapters(loss, (student.shape,), (hint.shape,), seed=0)
    kernel = np.asarray(adapters["hint"]["Conv_0"]["kernel"], np.float64)
    bias = rng.normal(size=5) * 0.1
    adapters["hint"]["Conv_0"]["bias"] = jnp.asarray(bias, jnp.float32)
    assert kernel.shape == (3, 3, 3, 5)

    ours = lambda s, k: feature_term(loss, {"hint": {"Conv_0": {"kernel": k, "bias": bias}}},
                                     [s], [jnp.asarray(hint, jnp.float32)])
    as32 = lambda a: jnp.asarray(a, jnp.float32)
    np.testing.assert_allclose(float(ours(as32(student), as32(kernel))),
                               paper_hint_loss(student, hint, kernel, bias), rtol=1e-5)
    by_student, by_kernel = jax.grad(ours, argnums=(0, 1))(as32(student), as32(kernel))
    np.testing.assert_allclose(
        np.asarray(by_student),
        finite_differences(lambda s: paper_hint_loss(s, hint, kernel, bias), student),
        rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(by_kernel),
        finite_differences(lambda k: paper_hint_loss(student, hint, k, bias), kernel),
        rtol=2e-3, atol=1e-6)
    # The weight multiplies; the hint of a perfect regression is free.
    heavy = make_feature_loss("fitnets", weight=100.0, hint_stage=0)
    np.testing.assert_allclose(
        float(feature_term(heavy, adapters, [as32(student)], [as32(hint)])),
        100 * float(feature_term(loss, adapters, [as32(student)], [as32(hint)])), rtol=1e-6)
    regressed = Regressor(5, 3).apply({"params": adapters["hint"]}, as32(student))
    assert float(hint_loss(regressed, regressed)) == 0.0


# --------------------------------------------------------------------------- the zoo's stages
def expected_stages(name: str) -> list[tuple[int, ...]]:
    """RepDistiller's feature points: the spatial sizes and channels of each stage."""
    width = model_width(name, None)
    if name.startswith("vgg"):
        return [(16, 16, 2 * width), (8, 8, 4 * width), (4, 4, 8 * width), (4, 4, 8 * width)]
    if name.startswith("mlp"):
        return [(width,)] * int(name[3:])
    stages = 4 if name in ("resnet10", "resnet18", "resnet34") else 3
    return [(32 >> s, 32 >> s, width << s) for s in range(stages)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_sows_its_stage_outputs(name):
    shape = (28, 28, 1) if name.startswith("mlp") else (32, 32, 3)
    model = create_model(name, 100)
    variables = jax.eval_shape(lambda: init_variables(model, shape, 0))
    assert "features" not in variables  # initialising records nothing
    shapes = stage_shapes(model.apply, variables, jnp.zeros((2, *shape)), "student")
    assert [s[1:] for s in shapes] == expected_stages(name)
    assert all(s[0] == 2 for s in shapes)


# ------------------------------------------------------------------- small nets of one's own
class Staged(nn.Module):
    """Two conv stages (8x8, then 4x4) that sow their outputs, and a dense head."""

    width: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = sow_stages(self, nn.relu(nn.Conv(self.width, (3, 3))(x)))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = sow_stages(self, nn.relu(nn.Conv(2 * self.width, (3, 3))(x)))
        return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


class Silent(nn.Module):
    """A net that sows nothing."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(10)(x.reshape(len(x), -1))


IMAGES = rng.integers(0, 256, (96, 8, 8, 3), dtype=np.uint8)
LABELS = rng.integers(0, 10, 96)
TEST = {"test": (IMAGES[:32], LABELS[:32])}
QUICK = dict(epochs=2, batch_size=16, progress=False, recipe=kd_jax.Recipe(learning_rate=0.05))


@pytest.fixture(scope="module")
def teacher():
    model = Staged(8)
    return Teacher(model.apply, model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3))))


@pytest.mark.parametrize("method, student, message", [
    ("at", Silent(), "the student sows no stage outputs, which feature distillation needs: "
     "call kd_jax.core.features.sow_stages(self, x) after each of its stages"),
    (make_feature_loss("fitnets", hint_stage=2), Staged(4),
     "fitnets: hint stage 2 does not exist (the student has 2 stages, the teacher 2)"),
    ("unknown", Staged(4), "unknown feature loss 'unknown'; choose one of: fitnets, at"),
])
def test_unpairable_stages_are_one_line_errors(teacher, method, student, message):
    with pytest.raises(KdError) as error:
        kd_jax.distill(student, teacher, IMAGES, features=method, **QUICK)
    assert str(error.value) == message


def test_pairing_rules_name_what_differs():
    at, fitnets = make_feature_loss("at"), make_feature_loss("fitnets", hint_stage=0)
    with pytest.raises(KdError, match=r"^at: the student has 3 stages, the teacher 4; "):
        init_adapters(at, ((1, 32, 32, 4),) * 3, ((1, 32, 32, 4),) * 4, 0)
    with pytest.raises(KdError, match=r"^at: stage 0 is \(16, 16\) in the student and \(8, 8\)"):
        init_adapters(at, ((1, 16, 16, 4),), ((1, 8, 8, 4),), 0)
    with pytest.raises(KdError, match=r"^fitnets: no convolution maps the student's 8x8 hint "
                                      r"stage to the teacher's 16x16$"):
        init_adapters(fitnets, ((1, 8, 8, 4),), ((1, 16, 16, 4),), 0)
    assert init_adapters(at, ((1, 8, 8, 4),), ((1, 8, 8, 9),), 0) == {}


def test_an_ensemble_with_a_feature_method_is_refused(teacher):
    with pytest.raises(KdError) as error:
        kd_jax.distill(Staged(4), [teacher, teacher], IMAGES, features="at", **QUICK)
    assert str(error.value) == "feature loss at distills from one teacher, got 2"


def test_a_label_free_feature_step_takes_no_labels(teacher):
    student = Staged(4)
    variables = student.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    step = make_distill_step(make_ensemble([teacher]), make_loss("kd", 4.0),
                             features=make_feature_loss("at"))
    import optax

    state = create_state(student, variables, optax.sgd(0.1))
    images = jnp.asarray(IMAGES[:16], jnp.float32) / 255
    _, metrics = jax.jit(lambda step, state, images: step(state, images, jax.random.key(0)))(
        step, state, images)
    assert np.isfinite(float(metrics["distill_loss"]))
    with pytest.raises(TypeError):
        step(state, images, jnp.asarray(LABELS[:16]), jax.random.key(0))


def test_the_feature_term_trains_the_student_towards_the_teachers_stages(teacher):
    """FitNets with CE (RepDistiller's alpha 0) moves the regressor, and its hint loss falls."""
    student = Staged(4)
    loss = make_feature_loss("fitnets", hint_stage=1)
    state, history = kd_jax.distill(student, teacher, IMAGES, labels=LABELS, alpha=0.0,
                                    features=loss, eval_sets=TEST, **{**QUICK, "epochs": 4})
    start = student.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    shapes = lambda m, v: stage_shapes(m.apply, v, jnp.zeros((1, 8, 8, 3)), "x")
    first = init_adapters(loss, shapes(student, start), shapes(Staged(8), teacher.variables), 0)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), first,
                         state.params[ADAPTERS])
    assert min(jax.tree.leaves(moved)) > 0
    assert history[-1]["distill_loss"] < history[0]["distill_loss"]


# ------------------------------------------------------------------ checkpoint, resume, export
def test_fitnets_resumes_bit_identically_and_its_regressor_is_never_shipped(teacher, tmp_path):
    """6 steps an epoch, a checkpoint every 4: the first call dies at step 4, mid-epoch 1."""
    settings = dict(features="fitnets", eval_sets=TEST, checkpoint_every_steps=4, **QUICK)
    whole, _ = kd_jax.distill(Staged(4), teacher, IMAGES, workdir=tmp_path / "whole",
                              **settings)
    with pytest.raises(RuntimeError, match="crashed"):
        kd_jax.distill(Staged(4), teacher, IMAGES, workdir=tmp_path / "cut",
                       hooks=[CrashAfterCheckpoint(4)], **settings)
    resumed, _ = kd_jax.distill(Staged(4), teacher, IMAGES, workdir=tmp_path / "cut",
                                resume=True, **settings)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert ADAPTERS in whole.params and ADAPTERS not in whole.inference_variables()["params"]

    frozen = load_frozen(tmp_path / "cut")
    assert ADAPTERS not in frozen.variables["params"]
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    own = {k: v for k, v in whole.params.items() if k != ADAPTERS}
    assert summary["params"] == count_params(own) == count_params(frozen.variables["params"])
    assert summary["adapter_params"] == 8 * 16 + 16  # a 1x1 conv from 8 to 16 channels
    shipped = kd_jax.Teacher.from_workdir(tmp_path / "cut", model=Staged(4))
    x = jnp.asarray(IMAGES[:4], jnp.float32)
    np.testing.assert_array_equal(np.asarray(shipped.apply_fn(shipped.variables, x)),
                                  np.asarray(Staged(4).apply(whole.inference_variables(), x)))


# --------------------------------------------------------------------------- the config
def test_config_builds_the_feature_method_and_refuses_a_stray_setting():
    config = DistillConfig(feature_loss="at", alpha=0.0, at_p=4.0)
    config.validate()
    assert config.feature_method() == make_feature_loss("at", 1000.0, 1, 4.0)
    assert DistillConfig().feature_method() is None
    for fields, message in [
        (dict(feature_loss="fitnets", at_p=3.0),
         "at_p is a setting of feature loss at, not of fitnets"),
        (dict(feature_weight=5.0),
         "feature_weight weighs a feature loss: set --feature-loss too"),
        (dict(feature_loss="at", feature_weight=-1.0),
         "feature loss at: weight must be >= 0, got -1.0"),
    ]:
        with pytest.raises(KdError) as error:
            DistillConfig(**fields).validate()
        assert str(error.value) == message


def test_cli_distills_with_fitnets_and_ships_the_student_alone(tmp_path):
    """The whole job, label-free: --feature-loss fitnets adds the hint term to Hinton's loss;
    config and summary record it; the checkpoint restores without the regressor."""
    from _helpers import random_cifar_records, write_cifar_binary
    from test_bad_inputs import make_run

    from kd_jax.cli.jobs import distill
    from kd_jax.cli.main import main

    teacher = make_run(tmp_path / "teacher", model="mlp1", width=8)
    data_dir = write_cifar_binary(tmp_path / "cifar", per_batch=16, test=16,
                                  records=random_cifar_records)
    argv = ["--data-dir", data_dir, "--teacher-dir", teacher, "--workdir", tmp_path / "student",
            "--student", "mlp1", "--student-width", "4", "--feature-loss", "fitnets",
            "--feature-weight", "10", "--fitnets-hint-stage", "0", "--epochs", "1",
            "--batch-size", "16", "--eval-batch-size", "16", "--no-progress"]
    assert main(DistillConfig, distill, "", [str(a) for a in argv]) == 0
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert (config["feature_loss"], config["feature_weight"]) == ("fitnets", 10.0)
    assert summary["adapter_params"] == 4 * 8 + 8  # a dense layer from 4 hidden units to 8
    frozen = load_frozen(tmp_path / "student")
    assert ADAPTERS not in frozen.variables["params"]
    assert summary["params"] == count_params(frozen.variables["params"])

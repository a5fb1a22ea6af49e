"""The distillation losses wired into the step, the API and the config (issue 20).

Tiny MLPs on random arrays: what is checked is the plumbing (which loss, its settings, its
labels, its warm-up by epoch), the losses' values being tests/test_losses.py's concern.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kd_jax
from kd_jax.cli.config import DistillConfig
from kd_jax.core.losses import distillation_loss, kd_loss, make_loss
from kd_jax.core.models import MLP
from kd_jax.core.optim import Recipe, make_optimizer
from kd_jax.core.steps import create_state, make_distill_step
from kd_jax.core.teachers import Teacher, make_ensemble
from kd_jax.errors import KdError

CLASSES = 10


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(64, 4, 4, 1)).astype(np.float32)
    labels = rng.integers(0, CLASSES, 64).astype(np.int32)
    teacher, student = MLP((32,), CLASSES), MLP((16,), CLASSES)
    sample = jnp.asarray(images[:1])
    t_vars = teacher.init(jax.random.key(1), sample)
    s_vars = student.init(jax.random.key(2), sample)
    return images, labels, Teacher(teacher.apply, t_vars), student, s_vars


LABEL_FREE_DKD = ("loss dkd needs the true class, so it cannot run label-free (alpha == 1): "
                  "pass alpha < 1 and labels")


def test_label_free_dkd_is_refused_by_the_api(setup):
    images, labels, teacher, student, _ = setup
    for given in (None, labels):
        with pytest.raises(KdError) as error:
            kd_jax.distill(student, teacher, images, labels=given, loss="dkd")
        assert str(error.value) == LABEL_FREE_DKD
    with pytest.raises(KdError) as error:
        kd_jax.distill(student, teacher, images, loss="dkd", alpha=0.5)
    assert str(error.value) == "alpha = 0.5 < 1 mixes in a hard-label term: pass labels"


def test_config_builds_the_chosen_loss_with_its_settings():
    dkd = DistillConfig(loss="dkd", alpha=0.5, temperature=2.0, dkd_beta=2.0,
                        dkd_warmup_epochs=5, standardize_logits=True)
    dkd.validate()
    loss = dkd.distill_loss()
    assert (loss.name, loss.temperature, loss.standardize, loss.needs_labels) == (
        "dkd", 2.0, True, True)
    assert loss.params == {"alpha": 1.0, "beta": 2.0, "warmup_epochs": 5}
    assert loss.warmup_epochs == 5
    dist = DistillConfig(loss="dist", dist_gamma=0.5).distill_loss()
    assert (dist.name, dist.params, dist.standardize) == (
        "dist", {"beta": 1.0, "gamma": 0.5}, False)
    assert DistillConfig().distill_loss().name == "kd"


@pytest.mark.parametrize("epoch", [0, 3, 30])
def test_distill_step_warms_dkd_up_by_its_steps_epoch(setup, epoch):
    """The step's loss is the one distillation_loss gives at epoch state.step // (steps per
    epoch): DKD's weight min((epoch + 1) / 20, 1), the CE term unscaled."""
    images, labels, teacher, student, s_vars = setup
    loss, per_epoch = make_loss("dkd", 4.0), 4
    step = make_distill_step(make_ensemble([teacher]), loss, 0.5, steps_per_epoch=per_epoch)
    tx, _ = make_optimizer(Recipe(0.1, warmup_fraction=0.0), 100)
    state = create_state(student, s_vars, tx).replace(step=jnp.asarray(epoch * per_epoch + 2))
    x, y = jnp.asarray(images[:16]), jnp.asarray(labels[:16])
    _, metrics = jax.jit(step)(state, x, y, jax.random.key(0))
    target = jax.nn.log_softmax(teacher.apply_fn(teacher.variables, x) / 4.0)
    expected = distillation_loss(student.apply(s_vars, x), target, loss, 0.5, y, epoch)
    assert float(metrics["distill_loss"]) == pytest.approx(float(expected), rel=1e-5)
    unwarmed = distillation_loss(student.apply(s_vars, x), target,
                                 make_loss("dkd", 4.0, warmup_epochs=0), 0.5, y)
    assert (float(expected) < float(unwarmed)) == (epoch < 19)


def test_a_warmed_up_loss_needs_the_epoch_length(setup):
    _, _, teacher, _, _ = setup
    with pytest.raises(ValueError, match="loss dkd warms up over epochs: pass steps_per_epoch"):
        make_distill_step(make_ensemble([teacher]), make_loss("dkd", 4.0), 0.5)


@pytest.mark.parametrize(("loss", "alpha"), [("dkd", 0.5), ("dist", 1.0)])
def test_api_distills_with_each_loss(setup, loss, alpha):
    images, labels, teacher, student, _ = setup
    _, history = kd_jax.distill(
        student, teacher, images, labels=labels if alpha < 1 else None, loss=loss, alpha=alpha,
        temperature=4.0, epochs=2, batch_size=16, progress=False,
        recipe=Recipe(0.05, warmup_fraction=0.0, lr_schedule="step", lr_decay_epochs=(1,)),
        eval_sets={"test": (images[:32], labels[:32])})
    assert len(history) == 2
    assert all(np.isfinite(row["distill_loss"]) for row in history)
    assert history[0]["learning_rate"] == pytest.approx(0.05)
    assert history[1]["learning_rate"] == pytest.approx(0.005)


def test_cli_distills_with_dkd_from_labels(tmp_path):
    """The whole job: --loss dkd with --alpha below 1 reads the labels and runs; summary and
    config record the loss and its settings."""
    import json

    from _helpers import random_cifar_records, write_cifar_binary
    from test_bad_inputs import make_run

    from kd_jax.cli.config import DistillConfig
    from kd_jax.cli.jobs import distill
    from kd_jax.cli.main import main

    teacher = make_run(tmp_path / "teacher")
    data_dir = write_cifar_binary(tmp_path / "cifar", per_batch=16, test=16,
                                  records=random_cifar_records)
    argv = ["--data-dir", data_dir, "--teacher-dir", teacher, "--workdir", tmp_path / "student",
            "--student", "mlp1", "--student-width", "8", "--loss", "dkd", "--alpha", "0.5",
            "--dkd-beta", "2", "--standardize-logits", "--epochs", "2", "--batch-size", "16",
            "--eval-batch-size", "16", "--no-progress"]
    assert main(DistillConfig, distill, "", [str(a) for a in argv]) == 0
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert summary["loss"] == "dkd" and np.isfinite(summary["distill_loss"])
    assert (config["dkd_beta"], config["standardize_logits"], config["alpha"]) == (2.0, True, 0.5)


def test_distill_step_standardizes_the_teachers_logits_too(setup):
    """With standardize the step forms the target from each teacher's z-scored logits: its
    loss is the standardized loss of the raw logits, and a teacher whose logits are shifted
    and scaled gives the same step."""
    images, labels, teacher, student, s_vars = setup
    loss = make_loss("kd", 4.0, standardize=True)
    tx, _ = make_optimizer(Recipe(0.1, warmup_fraction=0.0), 100)
    state = create_state(student, s_vars, tx)
    x = jnp.asarray(images[:16])

    def step_loss(scale, shift):
        scaled = Teacher(lambda v, inputs, train: scale * teacher.apply_fn(v, inputs) + shift,
                         teacher.variables)
        step = make_distill_step(make_ensemble([scaled]), loss)
        return float(step(state, x, jax.random.key(0))[1]["distill_loss"])

    z = lambda logits: (logits - logits.mean(-1, keepdims=True)) / logits.std(-1, keepdims=True)
    target = jax.nn.log_softmax(z(teacher.apply_fn(teacher.variables, x)) / 4.0)
    expected = float(kd_loss(z(student.apply(s_vars, x)), target, 4.0))
    assert step_loss(1.0, 0.0) == pytest.approx(expected, rel=1e-4)
    assert step_loss(7.0, -3.0) == pytest.approx(expected, rel=1e-4)

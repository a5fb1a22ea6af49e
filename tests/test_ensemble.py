"""Distilling an ensemble (Hinton et al. 2015, sec. 4): the target, the stacked forward, the
label-freeness and the command line with several --teacher-dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import relabelled_copy, softmax, write_cifar_binary

import kd_jax
from kd_jax.cli import jobs
from kd_jax.cli.config import DistillConfig, TeacherConfig
from kd_jax.core.augment import normalize
from kd_jax.core.data import load_cifar10
from kd_jax.core.losses import make_loss
from kd_jax.core.models import create_model, init_variables
from kd_jax.core.optim import make_optimizer
from kd_jax.core.steps import create_state, make_distill_step
from kd_jax.core.teachers import (
    Teacher,
    ensemble_eval_logits,
    make_ensemble,
    per_teacher,
    resolve_layout,
    target_log_probs,
    teacher_logits,
)
from kd_jax.errors import KdError


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_target_is_the_mean_of_softened_probabilities(temperature):
    """The paper's ensemble: the arithmetic mean of each teacher's softmax(z / T)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (3, 5, 10))
    expected = softmax(logits / temperature).mean(0)
    got = target_log_probs([jnp.asarray(logits[:2]), jnp.asarray(logits[2:])], temperature)
    np.testing.assert_allclose(np.exp(np.asarray(got)), expected, rtol=1e-5, atol=1e-7)
    geometric = target_log_probs([jnp.asarray(logits)], temperature, "logits")
    np.testing.assert_allclose(np.exp(np.asarray(geometric)),
                               softmax(logits.mean(0) / temperature), rtol=1e-5, atol=1e-7)
    assert not np.allclose(np.exp(np.asarray(geometric)), expected, atol=1e-3)
    np.testing.assert_allclose(np.exp(ensemble_eval_logits(list(logits))),
                               softmax(logits).mean(0), rtol=1e-12)


def test_one_teacher_target_is_exactly_its_softened_log_probabilities():
    logits = jnp.asarray(np.random.default_rng(1).normal(0, 4, (1, 6, 10)), jnp.float32)
    for combine in ("probs", "logits"):
        np.testing.assert_array_equal(target_log_probs([logits], 4.0, combine),
                                      jax.nn.log_softmax(logits[0] / 4.0))


def small(width: int, seed: int):
    model = create_model("resnet8", 10, width)
    return model, init_variables(model, (32, 32, 3), seed)


def convolutions(ensemble, images) -> int:
    """How many convolutions the jaxpr of the ensemble's forward holds."""
    jaxpr = jax.make_jaxpr(lambda v: teacher_logits(ensemble.apply_fns, ensemble.sizes, v,
                                                    images))(ensemble.stacked)
    return str(jaxpr).count("conv_general_dilated")


def test_one_architecture_runs_as_one_stacked_forward():
    """Four teachers of one architecture, stacked: one group, one vmapped forward (the jaxpr
    has the convolutions of one network, batched), whatever their number."""
    model, _ = small(4, 0)
    four = make_ensemble([Teacher(model.apply, small(4, s)[1]) for s in range(4)], "stacked")
    one = make_ensemble([Teacher(model.apply, small(4, 0)[1])], "stacked")
    assert four.sizes == (4,) and four.order == ((0, 0), (0, 1), (0, 2), (0, 3))
    images = jnp.zeros((2, 32, 32, 3))
    assert convolutions(four, images) == convolutions(one, images) > 0
    mixed = make_ensemble([Teacher(model.apply, small(4, 0)[1]),
                           Teacher(small(8, 1)[0].apply, small(8, 1)[1]),
                           Teacher(model.apply, small(4, 2)[1])], "stacked")
    assert mixed.sizes == (2, 1) and mixed.order == ((0, 0), (1, 0), (0, 1))


def test_the_loop_layout_runs_each_teacher_and_gives_the_stacked_target():
    """The loop (auto's choice on CPUs) runs the four forwards one after the other: four
    networks' convolutions in the jaxpr, and the same logits per teacher as the stacked run."""
    model, _ = small(4, 0)
    teachers = [Teacher(model.apply, small(4, s)[1]) for s in range(4)]
    loop, stacked = make_ensemble(teachers, "loop"), make_ensemble(teachers, "stacked")
    assert (loop.sizes, loop.layout) == ((1, 1, 1, 1), "loop")
    assert make_ensemble(teachers).layout == resolve_layout("auto", "cpu") == "loop"
    images = jnp.asarray(np.random.default_rng(1).normal(0, 1, (4, 32, 32, 3)), jnp.float32)
    assert convolutions(loop, images) == 4 * convolutions(stacked, images)
    logits = lambda e: per_teacher(e, teacher_logits(e.apply_fns, e.sizes, e.stacked, images))
    for a, b in zip(logits(loop), logits(stacked), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_auto_stacks_on_accelerators_and_a_bad_layout_is_one_line():
    assert [resolve_layout("auto", b) for b in ("cpu", "gpu", "tpu")] == ["loop", "stacked",
                                                                         "stacked"]
    assert resolve_layout("stacked", "cpu") == "stacked"
    with pytest.raises(KdError) as error:
        resolve_layout("vmap")
    assert str(error.value) == "ensemble layout must be one of auto, stacked, loop, got 'vmap'"


def test_duplicated_teachers_distill_the_same_student_as_one():
    """Two copies of a teacher are that teacher: the ensemble's target equals its own (in the
    stacked layout; the loop's logits equal the stacked ones, tested above)."""
    teacher, variables = small(8, 3)
    student, start = small(4, 4)
    images = jnp.asarray(np.random.default_rng(2).normal(0, 1, (16, 32, 32, 3)), jnp.float32)
    tx, _ = make_optimizer(kd_jax.Recipe(0.05, warmup_fraction=0), 100)

    def train(teachers):
        step = jax.jit(lambda step, state, rng: step(state, images, rng))
        state = create_state(student, start, tx)
        distill = make_distill_step(make_ensemble(teachers, "stacked"), make_loss("kd", 4.0))
        for i in range(5):
            state, _ = step(distill, state, jax.random.key(i))
        return jax.tree.leaves(state.params)

    once = train([Teacher(teacher.apply, variables)])
    twice = train([Teacher(teacher.apply, variables), Teacher(teacher.apply, variables)])
    for a, b in zip(once, twice, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Three tiny teacher runs: two MLPs of one hidden layer of 16 units (seeds 0, 1) and one
    of two layers of 32 (another architecture and width). MLPs keep the jobs' compilation
    short; the convolutional ensembles are the step tests' above."""
    root = tmp_path_factory.mktemp("ensemble")
    data = write_cifar_binary(root / "cifar")
    runs = []
    for name, model, width, seed in (("a", "mlp1", 16, 0), ("b", "mlp1", 16, 1),
                                     ("c", "mlp2", 32, 2)):
        jobs.train_teacher(TeacherConfig(data_dir=str(data), workdir=str(root / name), epochs=1,
                                         batch_size=40, eval_batch_size=40, model=model,
                                         width=width, seed=seed, progress=False))
        runs.append(str(root / name))
    return data, runs


def distill_config(data, workdir, teachers, **extra):
    return DistillConfig(data_dir=str(data), workdir=str(workdir), teachers=teachers, epochs=1,
                         batch_size=40, eval_batch_size=40, student="mlp1", student_width=8,
                         progress=False, **extra)


def test_teachers_of_different_architectures_and_widths_in_one_run(teachers, tmp_path):
    data, runs = teachers
    summary = jobs.distill(distill_config(data, tmp_path / "s", runs))
    assert [t["workdir"] for t in summary["teachers"]] == runs
    per_teacher = [t["test_accuracy"] for t in summary["teachers"]]
    alone = [json.loads((Path(r) / "summary.json").read_text())["test_accuracy"] for r in runs]
    assert per_teacher == alone  # each teacher's own figure, restored exactly
    # The ensemble's figure: its mean softmax over the three teachers, computed here.
    dataset = load_cifar10(data)
    x = normalize(dataset.test_images, dataset.mean, dataset.std)
    probs = np.mean([jax.nn.softmax(teacher.apply_fn(teacher.variables, x, train=False))
                     for teacher in map(kd_jax.Teacher.from_workdir, runs)], axis=0)
    assert summary["teacher_test_accuracy"] == np.mean(probs.argmax(-1) == dataset.test_labels)
    assert "agreement" in summary
    assert summary["ensemble_layout"] == "loop"  # auto, on the CPU


def test_a_multi_teacher_student_never_sees_a_label(teachers, tmp_path):
    """Scrambled training labels leave a three-teacher student bit-identical."""
    data, runs = teachers
    scrambled = relabelled_copy(data, tmp_path / "scrambled", 7)

    def params(folder, name):
        config = distill_config(folder, tmp_path / name, runs)
        jobs.distill(config)
        return jax.tree.leaves(kd_jax.Teacher.from_workdir(tmp_path / name).variables)

    for a, b in zip(params(data, "true"), params(scrambled, "permuted"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_teacher_of_other_data_is_refused_by_name(teachers, tmp_path):
    data, runs = teachers
    other = Path(shutil.copytree(runs[1], tmp_path / "other"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "dataset": "mnist"}))
    with pytest.raises(KdError, match=f"^{other}: the teacher was trained on mnist, this run "
                                      "uses cifar10$"):
        jobs.distill(distill_config(data, tmp_path / "s", [runs[0], str(other)]))

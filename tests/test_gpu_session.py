"""benchmarks/gpu_session.sh, the one script a lent GPU runs: which variant it picks, which flags
reach which job, and what it brings back. GPU time is too scarce to find a shell bug on the
device, and its KD_SMOKE switch takes ten minutes on a CPU, so here every job is a stand-in: a
``python`` earlier on PATH records the command and writes the summary a run would, while
everything else (the script's own Python snippets) runs on the real interpreter."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from _helpers import REPO

from kd_jax.cli import config

# The stand-in's summaries by run name: ls0 wins on validation while lr3.2 wins on test, so a
# script choosing by test accuracy picks the wrong one.
VAL_TEST = {"base": (0.80, 0.80), "ls0": (0.85, 0.70), "lr3.2": (0.82, 0.90)}

STAND_IN = f"""#!{sys.executable}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
if not args or not args[0].endswith(".py"):  # the script's own snippets: the real thing
    os.execv({sys.executable!r}, [{sys.executable!r}, *args])
with open(os.environ["KD_TEST_CALLS"], "a") as calls:
    calls.write(json.dumps(args) + "\\n")
if "--workdir" in args:
    workdir = Path(args[args.index("--workdir") + 1])
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "checkpoints").mkdir(exist_ok=True)
    (workdir / "checkpoints" / "state.bin").write_bytes(b"big")
    val, test = {VAL_TEST!r}.get(workdir.name, (0.5, 0.5))
    summary = {{"val_accuracy": val, "test_accuracy": test}}
    (workdir / "summary.json").write_text(json.dumps(summary))
"""


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One run of the script against the stand-in: (calls, work dir, out dir, stdout)."""
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    root = tmp_path_factory.mktemp("gpu_session")
    bin_dir, work, out = root / "bin", root / "work", root / "out"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(STAND_IN)
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "KD_TEST_CALLS": str(root / "calls.jsonl"), "JAX_PLATFORMS": "cpu"}
    env.pop("KD_SMOKE", None)
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", str(root / "data"), str(work),
                           str(out), "600"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300, check=True)
    calls = [json.loads(line) for line in (root / "calls.jsonl").read_text().splitlines()]
    return calls, work, out, done.stdout


def runs_of(calls: list[list[str]], script: str, folder: str) -> dict[str, list[str]]:
    """Each call of ``script`` with a workdir in ``folder``, by the workdir's name."""
    workdirs = {Path(c[c.index("--workdir") + 1]): c for c in calls
                if c[0] == script and "--workdir" in c}
    return {path.name: c for path, c in workdirs.items() if path.parent.name == folder}


def test_every_variant_is_screened_on_validation_with_its_flags_and_no_bar(session):
    calls, _, _, _ = session
    sweep = runs_of(calls, "train_teacher.py", "sweep")
    assert len(sweep) == 21
    for args in sweep.values():
        assert "|" not in args
        assert args[args.index("--validation") + 1] == "5000"
        assert args[args.index("--tta") + 1] == "flip_translate"
    recipe = {name: teacher_config(args) for name, args in sweep.items()}
    assert recipe["lr3.2"].learning_rate == 3.2
    assert recipe["ls0"].label_smoothing == 0
    before_issue_17 = {"crop_pad": 4, "pad_mode": "zeros", "alternating_flip": False,
                       "bn_lr_factor": 1.0, "ghost_batch_size": 0, "activation": "relu",
                       "bn_scale": True}
    assert augmentation(recipe["old"]) == before_issue_17
    assert augmentation(recipe["base"]) == augmentation(config.TeacherConfig())
    assert augmentation(recipe["randflip"]) == {**augmentation(recipe["base"]),
                                                "alternating_flip": False}
    assert augmentation(recipe["no-ghost"]) == {**augmentation(recipe["base"]),
                                                "ghost_batch_size": 0}
    assert augmentation(recipe["crop0"]) == {**augmentation(recipe["base"]),
                                             "ghost_batch_size": 0, "activation": "relu",
                                             "bn_scale": True, "bn_lr_factor": 4.0}
    assert augmentation(recipe["bn-scale"]) == {**augmentation(recipe["base"]),
                                                "bn_scale": True, "bn_lr_factor": 4.0}
    for pad in (2, 4):
        assert augmentation(recipe[f"crop{pad}"]) == {**augmentation(recipe["base"]),
                                                      "crop_pad": pad}
    keller = recipe["keller"]
    assert (augmentation(keller), keller.learning_rate, keller.cutout, keller.label_smoothing) \
        == ({**before_issue_17, "pad_mode": "reflect"}, 0.2, 12, 0)


def teacher_config(args: list[str]) -> config.TeacherConfig:
    """What train_teacher.py would run with these arguments (the stand-in's record of them)."""
    parser = config.build_parser(config.TeacherConfig, "")
    return config.resolve(config.TeacherConfig, parser.parse_args(args[1:]))


def augmentation(recipe: config.TeacherConfig) -> dict:
    """The settings issue 17 changed, as the run fills them in for its model."""
    resolved = config.with_model_recipe(recipe)
    return {name: getattr(resolved, name)
            for name in ("crop_pad", "pad_mode", "alternating_flip", "bn_lr_factor",
                         "bn_scale", "ghost_batch_size", "activation")}


def test_the_pick_is_the_best_validation_accuracy_and_its_teacher_flags_reach_teachers_only(
        session):
    calls, work, _, _ = session
    assert (work / "chosen_flags.txt").read_text() == "all runs:  / teacher only:  " \
                                                      "--label-smoothing 0\n"
    teachers = runs_of(calls, "train_teacher.py", "runs")
    students = runs_of(calls, "distill.py", "runs")
    assert sorted(teachers) == ["teacher-s0", "teacher-s1", "teacher-s2"]
    assert sorted(students) == ["student-r18-s0", "student-r18-s1", "student-r18-s2",
                                "student-r18w32-s0"]
    for seed in range(3):
        teacher = teachers[f"teacher-s{seed}"]
        assert teacher[teacher.index("--seed") + 1] == str(seed)
        assert teacher[-2:] == ["--label-smoothing", "0"]
        student = students[f"student-r18-s{seed}"]
        assert Path(student[student.index("--teacher-dir") + 1]).name == f"teacher-s{seed}"
        assert "--label-smoothing" not in student


def test_the_benchmarks_run_last_and_the_logs_come_back_without_checkpoints(session):
    calls, _, out, stdout = session
    scripts = [c[0] for c in calls]
    assert scripts[-2:] == ["benchmarks/throughput.py", "benchmarks/ensemble_step.py"]
    assert "best by val_accuracy: ls0" in stdout
    with tarfile.open(out / "results.tgz") as packed:
        names = packed.getnames()
    assert "./sweep/ls0/summary.json" in names and "./chosen_flags.txt" in names
    assert "./runs/teacher-s2/summary.json" in names and "./throughput.log" in names
    assert not [n for n in names if "checkpoints" in n]

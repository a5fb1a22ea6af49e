"""benchmarks/sweep.py, the runner behind every committed ablation table: its checks, the
commands it builds, the order it starts runs in, and the table it prints."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
from _helpers import REPO

spec = importlib.util.spec_from_file_location("sweep", REPO / "benchmarks" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)

COMMON = {"teacher": ["--width", "16"], "distill": ["--validation", "5"]}


def write_sweep(tmp_path: Path, runs: dict) -> Path:
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"common": COMMON, "runs": runs}))
    return path


def test_a_distill_run_must_name_runs_as_its_teachers(tmp_path):
    path = write_sweep(tmp_path, {"t": {"job": "teacher", "flags": []},
                                  "s": {"job": "distill", "teacher": ["t", "nope"], "flags": []}})
    with pytest.raises(SystemExit, match=rf"^{path}: run s: teacher \['nope'\] is not a run$"):
        sweep.load_sweep(path)


def test_a_run_must_be_a_teacher_or_distill_job(tmp_path):
    path = write_sweep(tmp_path, {"t": {"job": "train", "flags": []}})
    with pytest.raises(SystemExit, match=rf"^{path}: run t: job must be teacher or distill$"):
        sweep.load_sweep(path)


def test_command_puts_common_flags_first_then_the_runs_then_its_teachers(tmp_path):
    runs = {"s": {"job": "distill", "teacher": ["t", "u"], "flags": ["--seed", "1"]}}
    plan = {"common": COMMON, "runs": runs}
    expected = [sys.executable, str(REPO / "distill.py"), "--data-dir", "D",
                "--workdir", str(tmp_path / "s"), "--no-progress", "--validation", "5",
                "--seed", "1", "--teacher-dir", str(tmp_path / "t"),
                "--teacher-dir", str(tmp_path / "u")]
    assert sweep.command(plan, "s", tmp_path, "D") == expected
    # A run that was started before (its config.json exists) continues its own checkpoints.
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "config.json").write_text("{}")
    assert sweep.command(plan, "s", tmp_path, "D") == expected[:7] + ["--resume"] + expected[7:]


FAKE_JOB = """
import pathlib, sys
name, out = sys.argv[1], pathlib.Path(sys.argv[2])
with open(out / "started.txt", "a") as log:
    log.write(name + "\\n")
if name.startswith("bad"):
    sys.exit(3)
(out / name).mkdir(exist_ok=True)
(out / name / "summary.json").write_text("{}")
"""


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) not installed")
def test_runs_start_in_file_order_after_their_teachers_and_a_failure_stops_its_students(
        tmp_path, monkeypatch, capsys):
    runs = {"student": {"job": "distill", "teacher": "t", "flags": []},
            "t": {"job": "teacher", "flags": []},
            "bad": {"job": "teacher", "flags": []},
            "orphan": {"job": "distill", "teacher": "bad", "flags": []},
            "done": {"job": "teacher", "flags": []}}
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "summary.json").write_text("{}")
    monkeypatch.setattr(sweep, "command", lambda plan, name, out, data_dir:
                        [sys.executable, "-c", FAKE_JOB, name, str(out)])
    with pytest.raises(SystemExit, match=r"^cannot start \['orphan'\]: their teachers failed$"):
        sweep.run_all({"runs": runs}, tmp_path, "", sweep.all_cores()[:1], poll_seconds=0.05)
    # One core: a student waits for its teacher, a finished run is skipped.
    assert (tmp_path / "started.txt").read_text().split() == ["t", "student", "bad"]
    assert "bad: FAILED (exit 3)" in capsys.readouterr().out


def test_table_lists_finished_runs_in_file_order_as_percentages(tmp_path):
    runs = {"base": {"job": "teacher", "flags": []},
            "unfinished": {"job": "teacher", "flags": ["--seed", "1"]},
            "kd": {"job": "distill", "teacher": "base", "flags": ["--temperature", "4"]}}
    for name, summary in {"base": {"val_accuracy": 0.8354, "test_accuracy": 0.82481},
                          "kd": {"test_accuracy": 0.75, "agreement": 0.81111}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "unfinished").mkdir()
    assert sweep.table({"runs": runs}, tmp_path).splitlines() == [
        "| run | flags | val acc. | val TTA | test acc. | test TTA | train acc. | agreement |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| base | `(defaults)` | 83.54 % |  | 82.48 % |  |  |  |",
        "| kd | `--temperature 4` |  |  | 75.00 % |  |  | 81.11 % |"]


def test_plot_draws_the_finished_runs_curves(tmp_path):
    pytest.importorskip("matplotlib")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        rows = [{"epoch": e, "val_accuracy": 0.1 * e, "train_accuracy": 0.1 * e} for e in (1, 2)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
        (tmp_path / name / "summary.json").write_text("{}")
    runs = {name: {"job": "teacher", "flags": []} for name in ("a", "b", "unfinished")}
    assert sweep.plot({"runs": runs}, tmp_path).startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(FileNotFoundError, match="unfinished"):
        sweep.plot({"runs": runs}, tmp_path, ["a", "unfinished"])

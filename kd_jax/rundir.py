"""A run's directory: resolved config, metrics JSONL, summary, plots and checkpoints.

    <workdir>/config.json      the resolved config (also what restores a frozen model)
    <workdir>/metrics.jsonl    one JSON object per finished epoch
    <workdir>/summary.json     the final figures
    <workdir>/curves.png       loss and accuracy curves
    <workdir>/checkpoints/     orbax: latest/ and best/
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from kd_jax.config import RunConfig, to_json
from kd_jax.errors import KdError

RUNS_ROOT = Path("runs")
# Settings that may differ between an interrupted run and its --resume.
_RESUMABLE = {"resume", "overwrite", "progress", "workdir", "data_dir", "checkpoint_every_steps"}


class RunDir:
    """Files of one run; created by :meth:`prepare`."""

    def __init__(self, path: Path):
        self.path = path
        self.config_path = path / "config.json"
        self.metrics_path = path / "metrics.jsonl"
        self.summary_path = path / "summary.json"
        self.plot_path = path / "curves.png"

    @classmethod
    def prepare(cls, config: RunConfig, job: str) -> RunDir:
        """Create or reopen the workdir; refuse to mix two different runs in one folder."""
        path = Path(config.workdir or RUNS_ROOT / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}")
        run = cls(path)
        if run.config_path.exists():
            if config.resume:
                run._check_same_run(config)
            elif config.overwrite:
                for name in ("metrics.jsonl", "summary.json", "curves.png"):
                    (path / name).unlink(missing_ok=True)
                shutil.rmtree(path / "checkpoints", ignore_errors=True)
            else:
                raise KdError(f"{path} already holds a run; pass --resume to continue it or "
                              "--overwrite to replace it")
        try:
            path.mkdir(parents=True, exist_ok=True)
            _atomic_write(run.config_path, to_json(dataclasses.replace(config, workdir=str(path))))
        except OSError as e:
            raise KdError(f"{path}: cannot write the workdir ({e.strerror})") from None
        return run

    def _check_same_run(self, config: RunConfig) -> None:
        saved = read_json(self.config_path)
        now = json.loads(to_json(config))
        changed = sorted(k for k in now if k not in _RESUMABLE and saved.get(k) != now[k])
        if changed:
            raise KdError(f"{self.path} holds a run with different settings "
                          f"({', '.join(changed)}); resume with the same settings or use "
                          "another --workdir")

    def read_metrics(self, up_to_epoch: int | None = None) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        try:
            rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines()
                    if line]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KdError(f"{self.metrics_path}: unreadable ({e})") from None
        return [r for r in rows if up_to_epoch is None or r["epoch"] <= up_to_epoch]

    def write_metrics(self, rows: list[dict]) -> None:
        """Rewrite metrics.jsonl (atomically) with exactly ``rows``."""
        _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    def write_summary(self, summary: dict) -> None:
        _atomic_write(self.summary_path, json.dumps(summary, indent=2) + "\n")


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; anything else (unreadable, not JSON, not an object) is a
    one-line ``KdError``."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise KdError(f"{path}: unreadable ({e})") from None
    if not isinstance(value, dict):
        raise KdError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_run(job: str, root: Path = RUNS_ROOT) -> Path:
    """The newest ``runs/<job>-*`` folder that holds a checkpoint."""
    runs = sorted(p for p in root.glob(f"{job}-*") if (p / "checkpoints" / "latest").is_dir())
    if not runs:
        raise KdError(f"no {job} run found under {root}/; train one first or pass --teacher-dir")
    return runs[-1]


def _cell(key: str, value: object) -> str:
    """Accuracies and agreements as percentages, other floats to 4 significant digits."""
    if isinstance(value, float):
        if "accuracy" in key or "agreement" in key:
            return f"{100 * value:.2f}%"
        return f"{value:.4g}"
    return str(value)


def format_row(row: dict) -> str:
    """One epoch's metrics on one line."""
    return "  ".join(f"{k} {_cell(k, v)}" for k, v in row.items())


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``columns``, one line per row."""
    cells = [[_cell(c, r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)

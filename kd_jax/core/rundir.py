"""A run's directory: resolved config, metrics JSONL, summary, plots and checkpoints.

    <workdir>/config.json      the resolved config (also what restores a frozen model)
    <workdir>/metrics.jsonl    one JSON object per finished epoch
    <workdir>/summary.json     the final figures
    <workdir>/curves.png       loss and accuracy curves
    <workdir>/checkpoints/     orbax: latest/ and best/
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Collection
from pathlib import Path

import jax

from kd_jax.core.plots import plot_history
from kd_jax.errors import KdError

_PACKAGES = ("kd-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


class RunDir:
    """Files of one run; created by :meth:`prepare`."""

    def __init__(self, path: Path):
        self.path = path
        self.config_path = path / "config.json"
        self.metrics_path = path / "metrics.jsonl"
        self.summary_path = path / "summary.json"
        self.plot_path = path / "curves.png"

    @classmethod
    def prepare(cls, path: str | Path, config: dict, *, resume: bool = False,
                overwrite: bool = False, resumable: Collection[str] = ()) -> RunDir:
        """Create or reopen the workdir ``path`` for a run described by ``config`` (JSON-able);
        refuse to mix two different runs in one folder. Keys in ``resumable`` may differ
        between an interrupted run and its resumption."""
        path = Path(path)
        run = cls(path)
        if run.config_path.exists():
            if resume:
                run._check_same_run(config, resumable)
            elif overwrite:
                for name in ("metrics.jsonl", "summary.json", "curves.png"):
                    (path / name).unlink(missing_ok=True)
                shutil.rmtree(path / "checkpoints", ignore_errors=True)
            else:
                raise KdError(f"{path} already holds a run; resume it (--resume, resume=True) "
                              "or replace it (--overwrite, overwrite=True)")
        try:
            path.mkdir(parents=True, exist_ok=True)
            _atomic_write(run.config_path, json.dumps(config, indent=2, sort_keys=True))
        except OSError as e:
            raise KdError(f"{path}: cannot write the workdir ({e.strerror})") from None
        return run

    def _check_same_run(self, config: dict, resumable: Collection[str]) -> None:
        saved = read_json(self.config_path)
        now = json.loads(json.dumps(config))
        changed = sorted(k for k in now if k not in resumable and saved.get(k) != now[k])
        if changed:
            raise KdError(f"{self.path} holds a run with different settings "
                          f"({', '.join(changed)}); resume with the same settings or use "
                          "another workdir")

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

    def write_plot(self, history: list[dict], title: str,
                   reference_accuracy: float | None = None, reference: str = "teacher") -> None:
        plot_history(history, self.plot_path, title, reference_accuracy, reference)


class ReaderRunDir(RunDir):
    """The run directory as processes other than 0 of a multi-process run see it: they read
    (resume), process 0 writes."""

    def write_metrics(self, rows: list[dict]) -> None:
        pass

    def write_summary(self, summary: dict) -> None:
        pass

    def write_plot(self, history: list[dict], title: str,
                   reference_accuracy: float | None = None, reference: str = "teacher") -> None:
        pass


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


def environment() -> dict:
    """What made a run: package versions, Python, the devices, and the git commit when kd-jax
    runs from a checkout (``git_dirty``: with uncommitted changes)."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    devices = jax.devices()
    return {**versions, "python": platform.python_version(), "platform": jax.default_backend(),
            "device_kind": devices[0].device_kind, "device_count": len(devices), **_git()}


def _git() -> dict:
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / ".git").exists():
        return {}
    try:
        run = lambda *args: subprocess.run(["git", "-C", str(checkout), *args], timeout=10,
                                           capture_output=True, text=True, check=True).stdout
        return {"git_commit": run("rev-parse", "HEAD").strip(),
                "git_dirty": bool(run("status", "--porcelain", "--untracked-files=no").strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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

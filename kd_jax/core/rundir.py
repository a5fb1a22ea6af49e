"""A run's directory: resolved config, metrics JSONL, summary, plots and checkpoints.

    <workdir>/config.json      the resolved config (also what restores a frozen model)
    <workdir>/metrics.jsonl    one JSON object per finished epoch
    <workdir>/summary.json     the final figures
    <workdir>/curves.png       loss and accuracy curves
    <workdir>/checkpoints/     orbax: latest/ and best/
    <workdir>/run.lock         while a run lives: its pid, host and start time (core.lock)

A failed write (a full disk, a quota, a read-only folder) is a one-line ``WriteFailed`` naming
the file, and leaves the file as it was.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Collection
from pathlib import Path

import jax

from kd_jax.core.lock import WorkdirLock
from kd_jax.core.plots import render_history
from kd_jax.errors import KdError, WriteFailed

_PACKAGES = ("kd-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


class RunDir:
    """Files of one run; created by :meth:`prepare`, which locks the workdir until
    :meth:`close` (or the end of a ``with`` block)."""

    def __init__(self, path: Path, lock: WorkdirLock | None = None):
        self.path, self.lock = path, lock
        self.config_path = path / "config.json"
        self.metrics_path = path / "metrics.jsonl"
        self.summary_path = path / "summary.json"
        self.plot_path = path / "curves.png"

    @classmethod
    def prepare(cls, path: str | Path, config: dict, *, resume: bool = False,
                overwrite: bool = False, resumable: Collection[str] = ()) -> RunDir:
        """Create or reopen and lock the workdir ``path`` for a run described by ``config``
        (JSON-able); refuse a workdir another run holds, or one holding a different run. Keys
        in ``resumable`` may differ between an interrupted run and its resumption."""
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            run = cls(path, WorkdirLock.acquire(path))
        except OSError as e:
            raise KdError(f"{path}: cannot write the workdir ({e.strerror})") from None
        try:
            run._reopen(config, resume, overwrite, resumable)
        except BaseException:
            run.close()
            raise
        return run

    def _reopen(self, config: dict, resume: bool, overwrite: bool,
                resumable: Collection[str]) -> None:
        if self.config_path.exists():
            if resume:
                self._check_same_run(config, resumable)
            elif overwrite:
                for name in ("metrics.jsonl", "summary.json", "curves.png"):
                    (self.path / name).unlink(missing_ok=True)
                shutil.rmtree(self.path / "checkpoints", ignore_errors=True)
            else:
                raise KdError(f"{self.path} already holds a run; resume it (--resume, "
                              "resume=True) or replace it (--overwrite, overwrite=True)")
        try:
            _atomic_write(self.config_path, json.dumps(config, indent=2, sort_keys=True))
        except WriteFailed as e:
            raise KdError(f"{self.path}: cannot write the workdir ({e.reason})") from None

    def close(self) -> None:
        """Let go of the workdir: another run may now take it."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        png = render_history(history, title, reference_accuracy, reference)
        if png is None:
            print(f"matplotlib is not installed: {self.plot_path} not written")
            return
        _atomic_write(self.plot_path, png)


class ReaderRunDir(RunDir):
    """The run directory as processes other than 0 of a multi-process run see it: they read
    (resume), process 0 writes (and holds the lock)."""

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


def _atomic_write(path: Path, content: str | bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file; a failed
    write removes its temporary file (on a full disk, that frees what it took)."""
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    write: Callable = tmp.write_bytes if isinstance(content, bytes) else tmp.write_text
    try:
        write(content)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # a read-only folder refuses even that
            tmp.unlink(missing_ok=True)
        raise WriteFailed(path, e.strerror or type(e).__name__) from e


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

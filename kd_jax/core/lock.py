"""One writer per workdir: a run holds an exclusive ``flock`` on ``<workdir>/run.lock``.

Two processes writing one run (a second ``--resume`` started while the first still trains, an
``--overwrite`` of a live run) would interleave checkpoints and metrics rows. The lock belongs
to an open file, so the kernel drops it however the holder ends, SIGKILL included: a file left
behind by a killed run is never a stale lock, and the next run simply takes it. The file names
its holder (pid, host, start time) for the message a refused run prints; it is removed when the
holder lets go. On Linux, ``flock`` on NFS is carried by the server's byte-range locks, so a
run on another host sharing the folder is refused too.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from kd_jax.errors import KdError

LOCK_NAME = "run.lock"


class WorkdirLock:
    """The held lock of one workdir; :meth:`release` (or the process's end) lets it go."""

    def __init__(self, file: BinaryIO, path: Path):
        self.file, self.path = file, path

    @classmethod
    def acquire(cls, workdir: Path) -> WorkdirLock:
        """Lock ``workdir`` (which must exist) for this process, or raise a one-line
        ``KdError`` naming the run that holds it."""
        path = workdir / LOCK_NAME
        while True:
            # Unbuffered: a write that fails (a full disk) fails here, not at close.
            file = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+b", buffering=0)
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(file.read())
                file.close()
                raise KdError(f"{workdir} is in use by another run ({holder}); wait for it to "
                              "end or use another workdir") from None
            # A holder removes the file as it lets go: what we locked may be that removed
            # file, while a third run locks a new one. Only the file the path names counts.
            if _same_file(file, path):
                break
            file.close()
        lock = cls(file, path)
        try:
            file.truncate(0)
            started = datetime.now().astimezone().isoformat("T", "seconds")
            file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "started": started}).encode())
        except OSError:  # a full disk: no holder named, no lock kept
            lock.release()
            raise
        return lock

    def release(self) -> None:
        """Remove the lock file, then let go (the other order would let a run lock the file
        about to be removed). A read-only workdir keeps the file: harmless, it is no lock."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        self.file.close()


def _same_file(file: BinaryIO, path: Path) -> bool:
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(file.fileno())
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _holder(text: bytes) -> str:
    """"pid P on host H, started T" from the lock file, as far as it can be read (the holder
    may be between locking and writing it)."""
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return "holder unknown"

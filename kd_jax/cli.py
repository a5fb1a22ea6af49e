"""Shared command-line handling: flags -> config -> job, user errors as one line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from kd_jax.config import build_parser, resolve
from kd_jax.errors import KdError


def main(config_class: type, job: Callable, description: str,
         argv: Sequence[str] | None = None) -> int:
    """Run ``job(config)``; a ``KdError`` prints ``error: ...`` and exits 2 (``--debug``: raise)."""
    args = build_parser(config_class, description).parse_args(argv)
    return run_guarded(lambda: job(resolve(config_class, args)), args.debug)


def run_guarded(job: Callable[[], object], debug: bool = False) -> int:
    """Run ``job()``; a ``KdError`` prints ``error: ...`` and returns 2 (``debug``: raise)."""
    try:
        job()
    except KdError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

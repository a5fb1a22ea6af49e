"""Shared command-line handling: flags -> config -> job, user errors as one line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from kd_jax import distributed
from kd_jax.config import build_parser, resolve
from kd_jax.errors import KdError


def main(config_class: type, job: Callable, description: str,
         argv: Sequence[str] | None = None) -> int:
    """Run ``job(config)``; a user's error prints ``error: ...`` and exits non-zero.

    ``KdError`` exits 2 (an interrupted run 128 + the signal number); an ``OSError`` that
    escaped the job (a file named by the user that cannot be read or written) is reported the
    same way, as is a second Ctrl-C. ``--debug`` re-raises instead, with the traceback.
    """
    parser = build_parser(config_class, description)
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)

    def start() -> None:
        distributed.initialize(**distributed.pop_arguments(args))
        job(resolve(config_class, args))

    return run_guarded(start, args.debug)


def run_guarded(job: Callable[[], object], debug: bool = False) -> int:
    """Run ``job()``; see :func:`main` for what becomes an ``error: ...`` line."""
    try:
        job()
    except (KdError, OSError, KeyboardInterrupt) as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else getattr(e, "exit_code", 2)
    return 0


def _one_line(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return " ".join(str(error).split()) or type(error).__name__

"""Shared command-line handling: flags -> config -> job, user errors as one line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from kd_jax import distributed
from kd_jax.config import build_parser, resolve
from kd_jax.errors import KdError


def main(config_class: type, job: Callable, description: str,
         argv: Sequence[str] | None = None) -> int:
    """Run ``job(config)``; a ``KdError`` prints ``error: ...`` and exits 2 (``--debug``: raise)."""
    parser = build_parser(config_class, description)
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        distributed.initialize(**distributed.pop_arguments(args))
        job(resolve(config_class, args))
    except KdError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

"""The command-line entry points: flags -> config -> job, user errors as one line.

``kd-train-teacher`` / ``python train_teacher.py`` and ``kd-distill`` / ``python distill.py``
call :func:`train_teacher_main` and :func:`distill_main`: set up the CPU (before any jax
backend starts), parse flags and YAML into a config, join a multi-host run if asked, run the
job under :func:`kd_jax.errors.run_guarded`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from kd_jax.cli import distributed, runtime
from kd_jax.cli.config import DistillConfig, TeacherConfig, build_parser, resolve
from kd_jax.cli.jobs import distill, train_teacher
from kd_jax.core.trainer import Hook
from kd_jax.errors import Interrupted, run_guarded

TEACHER_HELP = ("Train a teacher on labels (CIFAR-10 by default). Every flag is also a key of "
                "a --config YAML file; flags override the file.")
DISTILL_HELP = ("Distill a student from frozen teachers' outputs (by default T^2 * KL of the "
                "softened distributions; --loss dkd or dist for DKD or DIST). Every flag is "
                "also a key of a --config YAML file; flags override the file.")


def main(config_class: type, job: Callable, description: str,
         argv: Sequence[str] | None = None, hooks: Sequence[Hook] = ()) -> int:
    """Run ``job(config, hooks)``; a user's error prints ``error: ...`` and exits non-zero.

    ``--debug`` re-raises instead, with the traceback. ``hooks`` reach the training loop
    (the tests' fault injection comes this way).
    """
    parser = build_parser(config_class, description)
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.debug:
        logging.getLogger("absl").addFilter(_not_an_orbax_error)  # (added once, however often)

    def start() -> None:
        distributed.initialize(**distributed.pop_arguments(args))
        try:
            job(resolve(config_class, args), hooks)
        except Interrupted as stopped:
            stopped.args = (f"{stopped}; rerun the same command with --resume to continue",)
            raise

    return run_guarded(start, args.debug)


def _not_an_orbax_error(record: logging.LogRecord) -> bool:
    """A filter leaving a failed checkpoint write to kd-jax's one ``error:`` line (what failed,
    where, which checkpoint is intact): orbax logs the failure from each of its threads,
    traceback and all, before it reaches kd-jax. Those logs show under ``--debug``."""
    return record.levelno < logging.ERROR or "orbax" not in record.pathname


def train_teacher_main(argv: Sequence[str] | None = None, hooks: Sequence[Hook] = ()) -> int:
    runtime.configure()
    return main(TeacherConfig, train_teacher, TEACHER_HELP, argv, hooks)


def distill_main(argv: Sequence[str] | None = None, hooks: Sequence[Hook] = ()) -> int:
    runtime.configure()
    return main(DistillConfig, distill, DISTILL_HELP, argv, hooks)


def run_teacher() -> None:
    """The ``kd-train-teacher`` command."""
    sys.exit(train_teacher_main())


def run_distill() -> None:
    """The ``kd-distill`` command."""
    sys.exit(distill_main())

"""Train a teacher on CIFAR-10 with labels: ``python train_teacher.py [--flags]`` (see --help)."""

import sys

import kd_jax.runtime  # noqa: F401  (the fast CPU setup; must come before jax is imported)

# isort: split
from kd_jax.cli import main
from kd_jax.config import TeacherConfig
from kd_jax.jobs import train_teacher

if __name__ == "__main__":
    sys.exit(main(TeacherConfig, train_teacher, __doc__))

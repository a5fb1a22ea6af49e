"""Train a teacher on CIFAR-10 with labels: ``python train_teacher.py [--flags]`` (see --help)."""

import sys

from kd_jax.cli.main import train_teacher_main

if __name__ == "__main__":
    sys.exit(train_teacher_main())

"""Distill a student from a frozen teacher's outputs alone: ``python distill.py --temperature 4``.
"""

import sys

import kd_jax.runtime  # noqa: F401  (the fast CPU setup; must come before jax is imported)

# isort: split
from kd_jax.cli import main
from kd_jax.config import DistillConfig
from kd_jax.jobs import distill

if __name__ == "__main__":
    sys.exit(main(DistillConfig, distill, __doc__))

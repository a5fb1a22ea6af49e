"""Distill a student from a frozen teacher's outputs alone: ``python distill.py --temperature 4``.
"""

import sys

from kd_jax.cli import main
from kd_jax.config import DistillConfig
from kd_jax.jobs import distill

if __name__ == "__main__":
    sys.exit(main(DistillConfig, distill, __doc__))

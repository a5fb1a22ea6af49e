"""Distill a student from a frozen teacher's outputs alone: ``python distill.py --temperature 4``.
"""

import sys

from kd_jax.cli.main import distill_main

if __name__ == "__main__":
    sys.exit(distill_main())

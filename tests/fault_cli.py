"""``python tests/fault_cli.py {teacher|distill} [flags]``: a job's command line with the
:class:`faults.FaultHook` of ``$KD_JAX_FAULT`` installed (none when it is unset)."""

import os
import sys

from faults import FAULT_ENV, FaultHook

from kd_jax.cli.main import distill_main, train_teacher_main

if __name__ == "__main__":
    spec = os.environ.get(FAULT_ENV)
    hooks = [FaultHook(spec)] if spec else []
    entry = {"teacher": train_teacher_main, "distill": distill_main}[sys.argv[1]]
    sys.exit(entry(sys.argv[2:], hooks))

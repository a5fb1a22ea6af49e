"""Multi-host runs: one process per host, all joined by ``jax.distributed`` into one mesh.

Every process runs the same command. Each one reads the whole dataset into host memory and
puts it on its own devices, and each step's global batch is split over the mesh's ``data``
axis, so every device trains on its slice of the same global batch. For CIFAR-10 (184 MB as
uint8) that is the right trade: it fits on every device many times over, shuffling stays one
global permutation computed alike everywhere (a seed gives the same run on any number of
processes), and no host work or host-to-device copy happens per step. Per-process file shards
pay only for datasets larger than a device's memory, which kd-jax does not train on.

One process (index 0) prints and writes the run's files; orbax checkpoints are saved and
restored by all processes together, into a ``--workdir`` they all reach.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from kd_jax.errors import KdError

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--coordinator-address``, ``--num-processes``, ``--process-id`` (else the env vars)."""
    group = parser.add_argument_group("multi-host (jax.distributed; default from the env vars "
                                      + ", ".join(ENV.values()) + ")")
    group.add_argument("--coordinator-address", metavar="HOST:PORT", default=None,
                       help="process 0's address; giving it starts a multi-process run")
    group.add_argument("--num-processes", type=int, default=None)
    group.add_argument("--process-id", type=int, default=None)


def pop_arguments(args: argparse.Namespace) -> dict:
    """Take the multi-host settings out of ``args``, filled in from the environment."""
    settings = {}
    for name, env in ENV.items():
        value = getattr(args, name)
        delattr(args, name)
        if value is None and os.environ.get(env):
            try:
                value = os.environ[env] if name == "coordinator_address" else int(os.environ[env])
            except ValueError:
                raise KdError(f"{env} must be an integer, got {os.environ[env]!r}") from None
        settings[name] = value
    return settings


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None) -> None:
    """Join the other processes when a coordinator is named; a single process otherwise."""
    if coordinator_address is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise KdError("--num-processes / --process-id need --coordinator-address")
        return
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (RuntimeError, ValueError) as e:
        raise KdError(f"jax.distributed.initialize({coordinator_address}) failed: "
                      f"{str(e).splitlines()[0]}") from None


def is_writer() -> bool:
    """Whether this process prints and writes the run's files (process 0)."""
    return jax.process_index() == 0


def writer_succeeded(ok: bool) -> bool:
    """Process 0's ``ok``, on every process (the others' ``ok`` is ignored).

    A collective: every process must call it, so a step only process 0 takes (preparing the
    workdir) ends in this call whether it succeeded or not, and the others learn which.
    """
    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))

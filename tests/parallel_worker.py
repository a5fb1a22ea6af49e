"""Runs a few teacher and distill steps on a mesh and prints the resulting parameters as JSON.

Started in a subprocess by ``test_parallel.py`` and ``test_distributed.py``, because the number
of host devices (``XLA_FLAGS``) and ``jax.distributed`` are fixed when jax initialises.

    python tests/parallel_worker.py [--devices N] [--process-id I --num-processes P --port N]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from kd_jax.core import conv as kd_conv  # noqa: E402
from kd_jax.core.augment import Augmentation  # noqa: E402
from kd_jax.core.evaluation import make_predict  # noqa: E402
from kd_jax.core.models import create_model, init_variables  # noqa: E402
from kd_jax.core.optim import Recipe, make_optimizer  # noqa: E402
from kd_jax.core.steps import (  # noqa: E402
    create_state,
    epoch_order,
    hinton_step,
    make_teacher_step,
    run_steps,
)
from kd_jax.errors import KdError  # noqa: E402

BATCH, STEPS, SHAPE = 8, 3, (8, 8, 3)
SHARDING: dict[str, dict] = {}  # per kind: what the compiled step does across devices
AUGMENTATION = Augmentation(crop_pad=2, flip=True, mean=(0.5,) * 3, std=(0.25,) * 3)


def global_array(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """The same host array on every device of the mesh, whichever processes hold them."""
    sharding = NamedSharding(mesh, P())
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def train(kind: str, mesh: Mesh, dtype: str = "float32") -> tuple[dict, list[float]]:
    """``STEPS`` steps of ``kind`` on fixed random data; returns (variables, losses)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2 * BATCH, *SHAPE), np.uint8)
    labels = rng.integers(0, 10, 2 * BATCH).astype(np.int32)
    model = create_model("resnet8", 10, 4, dtype)
    tx, _ = make_optimizer(Recipe(0.05, weight_decay=5e-4, warmup_fraction=0), 100)
    state = create_state(model, init_variables(model, SHAPE, 0), tx)
    if kind == "teacher":
        step, arrays = make_teacher_step(), (images, labels)
    else:
        teacher = create_model("resnet8", 10, 8, dtype)
        teacher_vars = jax.tree.map(lambda a: global_array(np.asarray(a), mesh),
                                    init_variables(teacher, SHAPE, 1))
        step, arrays = hinton_step(teacher.apply, teacher_vars, 4.0), (images,)
    state = jax.tree.map(lambda a: global_array(np.asarray(a), mesh), state)
    arrays = tuple(global_array(a, mesh) for a in arrays)
    key = jax.random.key(0)
    order = global_array(np.asarray(epoch_order(key, 0, 2 * BATCH, BATCH, 2)), mesh)
    compiled = run_steps.lower(step, state, arrays, order, np.int32(2), np.int32(0), key,
                               length=1, augmentation=AUGMENTATION, mesh=mesh).compile()
    SHARDING[kind] = {
        "all_reduce": "all-reduce" in compiled.as_text(),
        "all_gather": "all-gather" in compiled.as_text(),
        "collective_in_loop": collective_in_loop(compiled.as_text()),
        "state_replicated": all(s.is_fully_replicated
                                for s in jax.tree.leaves(compiled.output_shardings[0]))}
    losses = []
    for i in range(STEPS):  # the executable inspected above, not a second compilation
        state, metrics = compiled(step, state, arrays, order, np.int32(2), np.int32(i % 2), key)
        losses.append(float(np.asarray(next(v for k, v in metrics.items() if "loss" in k))[0]))
    return {"params": state.params, "batch_stats": state.batch_stats}, losses


def collective_in_loop(hlo: str) -> bool:
    """Whether a while loop's body (or anything it calls) holds a cross-device collective.

    Devices reaching the collectives of different loops in different orders deadlock XLA:CPU.
    """
    computations = {m.group(1): block for block in re.split(r"\n(?=\S)", hlo)
                    if (m := re.match(r"(?:ENTRY )?%?([\w.\-]+) ", block))}
    called = r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)"

    def holds(name: str, seen: set[str]) -> bool:
        if name in seen or name not in computations:
            return False
        seen.add(name)
        block = computations[name]
        return ("all-reduce" in block or "all-gather" in block
                or any(holds(c, seen) for c in re.findall(called, block)))

    return any(holds(body, set()) for body in re.findall(r"body=%?([\w.\-]+)", hlo))


def bf16_conv(mesh: Mesh) -> list[float]:
    """A bf16 convolution's value and gradients (kd_jax.core.conv's matrix products) with the batch
    sharded over the mesh, gathered."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(BATCH, *SHAPE[:2], 4)).astype(jnp.bfloat16)
    w = rng.normal(size=(3, 3, 4, 6)).astype(jnp.bfloat16)
    dims = ("NHWC", "HWIO", "NHWC")

    def value_and_grads(x, w):
        # One image per step of the loops, so that they run over the sharded batch here too
        # (these images are far smaller than a real chunk), and matrix products for these few
        # channels.
        y, vjp = jax.vjp(lambda x, w: kd_conv.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=dims, chunk_values=1,
            matmul_min_channels=1), x, w)
        return (y, *vjp(jnp.cos(y)))

    sharded = jax.make_array_from_callback(x.shape, NamedSharding(mesh, P("data")),
                                           lambda index: x[index])
    outs = jax.jit(value_and_grads, out_shardings=NamedSharding(mesh, P()))(sharded, w)
    return flat(outs)


def flat(tree) -> list[float]:
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tree)]
                          ).tolist()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=0, help="use the first N devices (0 = all)")
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    if a.process_id is not None:
        # The shutdown barrier's timeout counts from the first process to finish; on a loaded
        # CI machine jax's 300 s default was once too short. The test's own limit (600 s,
        # run_processes) still ends a hung pair.
        jax.distributed.initialize(f"localhost:{a.port}", a.num_processes, a.process_id,
                                   shutdown_timeout_seconds=600)
        # Gloo builds its context at the first collective and waits only 30 s (fixed in
        # jaxlib, not settable here) for the other process to join; before the training
        # step's first collective, each process compiles for a time that differs on a loaded
        # machine. A collective now, right after initialize, builds it while both are in step.
        multihost_utils.sync_global_devices("gloo context")
    devices = jax.devices()[: a.devices or None]
    mesh = Mesh(np.array(devices), ("data",))
    out = {"devices": len(devices), "processes": jax.process_count()}
    for kind in ("teacher", "distill"):
        variables, out[f"{kind}_losses"] = train(kind, mesh)
        out[kind] = flat(variables)
        if kind == "teacher":
            images = np.random.default_rng(1).integers(0, 256, (12, *SHAPE), np.uint8)
            predict = make_predict(create_model("resnet8", 10, 4), AUGMENTATION, BATCH, mesh)
            out["logits"] = np.asarray(predict(variables, global_array(images, mesh))).tolist()
    out["bf16_conv"] = bf16_conv(mesh)
    out["sharding"] = SHARDING
    try:
        make_predict(create_model("resnet8", 10, 4), AUGMENTATION, 6, mesh)
    except KdError as e:
        out["indivisible_error"] = str(e)
    # Leave together, so that neither process waits long at the shutdown barrier.
    multihost_utils.sync_global_devices("results ready")
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

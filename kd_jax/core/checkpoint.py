"""orbax checkpoints of a run: the latest (for --resume) and the best, plus frozen restore.

Layout under a workdir: ``checkpoints/latest/<step>`` and ``checkpoints/best/<step>``, each the
whole train state (params, batch_stats, optimizer state, step) in orbax's own format. orbax
writes into a temporary folder and renames it when complete, so a crash mid-write leaves the
previous checkpoint as the latest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from kd_jax.core.models import create_model, model_options
from kd_jax.core.rundir import read_json
from kd_jax.errors import KdError


class RunCheckpoints:
    """The two checkpoint series of one run.

    A ``latest`` checkpoint holds two items: ``default``, the train state, and ``meter``, the
    running sums of the epoch's train metrics up to that step (empty at an epoch boundary), so
    a run resumed mid-epoch reports the same epoch means as one never stopped. Both items are
    committed together: a checkpoint is either whole or ignored.
    """

    def __init__(self, workdir: str | Path, keep_latest: int = 2):
        root = Path(workdir).absolute() / "checkpoints"
        # cleanup_tmp_directories: a process killed mid-write leaves a temporary folder behind.
        options = lambda keep: ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                            cleanup_tmp_directories=True)
        self.latest = ocp.CheckpointManager(root / "latest", options=options(keep_latest),
                                            item_names=("default", "meter"))
        self.best = ocp.CheckpointManager(root / "best", options=options(1))

    def save(self, state: Any, meter: dict, is_best: bool = False) -> None:
        step = int(state.step)
        self.latest.save(step, args=ocp.args.Composite(default=ocp.args.StandardSave(state),
                                                       meter=ocp.args.JsonSave(meter)))
        if is_best:
            # orbax names its multi-process commit barrier after the step alone: two managers
            # committing the same step at once collide ("barrier already ongoing") and hang.
            self.latest.wait_until_finished()
            self.save_best(state)

    def save_best(self, state: Any) -> None:
        """Save ``state`` as the best, unless its step is already there (a resumed run redoes
        the steps a killed one may have saved)."""
        step = int(state.step)
        if step not in self.best.all_steps():
            self.best.save(step, args=ocp.args.StandardSave(state))

    def restore_latest(self, like: Any) -> tuple[Any, dict] | None:
        """The latest complete (state, meter), the state shaped and sharded like ``like``;
        None when there is none."""
        step = self.latest.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self.latest.restore(step, args=ocp.args.Composite(
                default=ocp.args.StandardRestore(abstract), meter=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many kinds of errors for damaged files
            raise KdError(f"{self.latest_path()}: corrupt or unreadable checkpoint "
                          f"({type(e).__name__}); delete it to resume from the one before"
                          ) from None
        return restored["default"], restored["meter"]

    def latest_path(self) -> Path:
        return Path(self.latest.directory) / str(self.latest.latest_step())

    def close(self) -> None:
        """Block until async writes are on disk."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        self.latest.close()
        self.best.close()


@dataclass(frozen=True)
class FrozenModel:
    """A trained model as a fixed function: its config and inference variables."""

    config: dict  # the run's resolved config (model name, width, dataset, ...)
    variables: dict  # {"params": ..., "batch_stats": ...}
    checkpoint: Path

    def build(self, num_classes: int, dtype: Any = jnp.float32,
              conv: nn.Module | None = None) -> nn.Module:
        """The registered model this run trained, with the options its config names."""
        name, width = self.model_spec
        return create_model(name, num_classes, width, dtype, conv=conv,
                            **model_options(self.config))

    @property
    def model_spec(self) -> tuple[str, int | None]:
        """(registered model name, width), whether the run trained a teacher or a student."""
        if "student" in self.config:
            return self.config["student"], self.config.get("student_width")
        if "model" in self.config:
            return self.config["model"], self.config.get("width")
        raise KdError("config.json names no model (neither 'model' nor 'student')")


def _on_one_device(metadata: Any) -> Any:
    """A restore target: every array as saved, but placed on this process's first device.

    Without one, orbax places arrays as they were sharded when saved, which fails wherever
    the devices differ: a teacher trained on a GPU or on several CPU devices, loaded here.
    """
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        metadata)


def load_frozen(workdir: str | Path) -> FrozenModel:
    """Restore the last checkpoint of a finished (or interrupted) run for inference."""
    workdir = Path(workdir).absolute()  # orbax refuses relative paths
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise KdError(f"{workdir}: not a kd-jax run (no config.json)")
    config = read_json(config_path)
    root = workdir / "checkpoints" / "latest"
    steps = ocp.utils.checkpoint_steps(root) if root.is_dir() else []
    if not steps:
        raise KdError(f"{workdir}: no checkpoint found under {root}")
    step = max(steps)
    path = root / str(step)
    # Through a manager that knows both items' handlers: restoring the item folder on its own
    # works too, but logs a warning about metadata orbax keeps one level up, on every load.
    handlers = {"default": ocp.StandardCheckpointHandler(), "meter": ocp.JsonCheckpointHandler()}
    try:
        with ocp.CheckpointManager(root, item_handlers=handlers,
                                   options=ocp.CheckpointManagerOptions(create=False)) as manager:
            target = _on_one_device(manager.item_metadata(step)["default"])
            restored = manager.restore(step, args=ocp.args.Composite(
                default=ocp.args.StandardRestore(target)))["default"]
    except Exception as e:  # orbax raises many kinds of errors for damaged files
        raise KdError(f"{path}: corrupt or unreadable checkpoint ({type(e).__name__})") from None
    # A run that kept a weight average evaluated it: that is the trained model.
    averaged = bool(restored.get("ema_params"))
    prefix = "ema_" if averaged else ""
    # Models without BatchNorm (MLPs) have no batch_stats collection: leave it out rather
    # than add an empty one, so the tree matches the model's own variables.
    variables = {"params": restored[f"{prefix}params"]}
    if restored.get(f"{prefix}batch_stats"):
        variables["batch_stats"] = restored[f"{prefix}batch_stats"]
    return FrozenModel(config, variables, path)

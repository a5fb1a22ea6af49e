"""How well finished runs fit the images they trained on: accuracy in inference mode on the
un-augmented training split, beside the held-out figures.

A run's ``train_accuracy`` is the mean over its last epoch's augmented, label-smoothed batches,
taken while the weights still move; whether a recipe underfits is a question about the final
weights on the training images themselves, which this answers. The held-out split is
recomputed the same way as a check: it must equal the run's own ``val_accuracy``.

    python benchmarks/fit.py runs/proxy/old-s0 runs/proxy/light-crop0-s0 --data-dir DATA
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kd_jax import Teacher, evaluate  # noqa: E402
from kd_jax.core.augment import Augmentation  # noqa: E402
from kd_jax.core.data import load_dataset  # noqa: E402


def fit(workdir: Path, data_dir: str | None) -> dict[str, float]:
    """Inference-mode accuracy of a finished run on its training and validation images (the
    split its config.json names), with the normalisation it trained with."""
    config = json.loads((workdir / "config.json").read_text())
    dataset = load_dataset(config["dataset"], data_dir).take_train(config["train_subset"])
    (train_images, train_labels), (val_images, val_labels) = dataset.hold_out(
        config["validation"])
    teacher = Teacher.from_workdir(workdir)
    plain = Augmentation(0, False, dataset.mean, dataset.std)
    figures = evaluate(teacher.apply_fn, teacher.variables, train_images, train_labels,
                       augmentation=plain, name="train")
    if config["validation"]:
        figures |= evaluate(teacher.apply_fn, teacher.variables, val_images, val_labels,
                            augmentation=plain, name="val")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", type=Path)
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    print("| run | train acc. (batches) | train acc. (inference) | val acc. | gap |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for workdir in args.workdirs:
        summary = json.loads((workdir / "summary.json").read_text())
        figures = fit(workdir, args.data_dir)
        val = figures.get("val_accuracy", float("nan"))
        print(f"| {workdir.name} | {summary['train_accuracy']:.2%} | "
              f"{figures['train_accuracy']:.2%} | {val:.2%} | "
              f"{figures['train_accuracy'] - val:+.2%} |")


if __name__ == "__main__":
    main()

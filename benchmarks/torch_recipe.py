"""kd-jax's teacher recipe in PyTorch, on the same arrays: is a result the recipe's or ours?

Trains ``torch_resnet``'s twin of a kd-jax ResNet with what ``train_teacher.py`` does: SGD with
Nesterov momentum 0.9, linear warmup then linear decay to zero (kd-jax's own optax schedule,
step by step), weight decay on kernels only, zero-initialised last BatchNorm scale in each block,
He fan-out initialisation, zero-padded random crop and mirror, the same normalisation, the same
label smoothing, the first ``--train-subset`` training images; the defaults are kd-jax's, but
its augmentation, BN rate, BatchNorm and activation are the ones before issue 17
(``train_teacher.py --crop-pad 4 --pad-mode zeros --no-alternating-flip --bn-lr-factor 1
--ghost-batch-size 0 --activation relu --bn-scale``). Prints
the per-epoch figures ``train_teacher.py`` prints, for a side-by-side look at two learning
curves (one CPU thread, PyTorch's defaults otherwise).

    python benchmarks/torch_recipe.py --data-dir ../shared/data --width 16 --train-subset 10000 \\
        --batch-size 128 --learning-rate 0.1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kd_jax import torch_resnet  # noqa: E402
from kd_jax.cli.config import TeacherConfig  # noqa: E402
from kd_jax.core.data import load_dataset  # noqa: E402
from kd_jax.core.optim import Recipe, make_optimizer  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kd = TeacherConfig()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--epochs", type=int, default=kd.epochs)
    p.add_argument("--batch-size", type=int, default=kd.batch_size)
    p.add_argument("--learning-rate", type=float, default=kd.learning_rate)
    p.add_argument("--warmup-fraction", type=float, default=kd.warmup_fraction)
    p.add_argument("--weight-decay", type=float, default=kd.weight_decay)
    p.add_argument("--label-smoothing", type=float, default=kd.label_smoothing)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_model(name: str, width: int) -> torch.nn.Module:
    """The twin, initialised as ``kd_jax.models`` initialises its ResNets."""
    model = torch_resnet.create(name, width)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.1  # flax's momentum=0.9
    for block in model.blocks:
        torch.nn.init.zeros_(block.bn2.weight)
    return model


def augment(images: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Zero-padded random crop and a mirror with probability 1/2, per image (uint8 NCHW)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2))
    out = torch.stack([padded[i, :, y:y + h, x:x + w] for i, (y, x) in enumerate(offsets.tolist())])
    mirror = torch.rand(n) < 0.5
    out[mirror] = out[mirror].flip(3)
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    dataset = load_dataset("cifar10", a.data_dir).take_train(a.train_subset)
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
    train_x, test_x = nchw(dataset.train_images), nchw(dataset.test_images)
    train_y = torch.from_numpy(np.asarray(dataset.train_labels, np.int64))
    test_y = torch.from_numpy(np.asarray(dataset.test_labels, np.int64))
    mean = torch.tensor(dataset.mean).view(1, 3, 1, 1)
    std = torch.tensor(dataset.std).view(1, 3, 1, 1)
    normalize = lambda u8: (u8.float() / 255 - mean) / std

    model = build_model(a.model, a.width)
    kernels = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": kernels, "weight_decay": a.weight_decay},
                           {"params": others, "weight_decay": 0.0}],
                          lr=a.learning_rate, momentum=0.9, nesterov=True)
    steps = len(train_x) // a.batch_size
    # kd-jax's own schedule (warmup, then linear decay), read step by step.
    _, schedule = make_optimizer(Recipe(a.learning_rate, weight_decay=a.weight_decay,
                                               warmup_fraction=a.warmup_fraction),
                                 steps * a.epochs)
    step = 0
    for epoch in range(1, a.epochs + 1):
        model.train()
        start, correct, loss_sum = time.perf_counter(), 0, 0.0
        order = torch.randperm(len(train_x))
        for s in range(steps):
            idx = order[s * a.batch_size:(s + 1) * a.batch_size]
            for group in opt.param_groups:
                group["lr"] = float(schedule(step))
            logits = model(normalize(augment(train_x[idx])))
            loss = F.cross_entropy(logits, train_y[idx], label_smoothing=a.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            correct += (logits.argmax(1) == train_y[idx]).sum().item()
            loss_sum += loss.item()
        model.eval()
        with torch.no_grad():
            right = sum((model(normalize(test_x[i:i + 1000])).argmax(1) == test_y[i:i + 1000])
                        .sum().item() for i in range(0, len(test_x), 1000))
        print(f"epoch {epoch} train_accuracy {correct / (steps * a.batch_size):.4f} "
              f"train_loss {loss_sum / steps:.4f} test_accuracy {right / len(test_x):.4f} "
              f"epoch_seconds {time.perf_counter() - start:.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

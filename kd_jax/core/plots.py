"""PNG plots of a run's metrics (matplotlib is imported only here, only when plotting)."""

from __future__ import annotations

from pathlib import Path


def plot_history(history: list[dict], path: Path, title: str,
                 reference_accuracy: float | None = None, reference: str = "teacher") -> None:
    """Loss and accuracy against epoch; ``reference_accuracy`` (the teacher's, or an
    ensemble's: ``reference`` names it) as a dashed line.

    Skipped with a note where matplotlib is missing (e.g. a bare accelerator image): the
    metrics are on disk and can be plotted later.
    """
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {path} not written")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train_loss", "distill_loss", "test_loss", "test_kl"):
        if key in history[0]:
            loss_ax.plot(epochs, [row[key] for row in history], marker="o", label=key)
    for key in ("train_accuracy", "test_accuracy", "agreement"):
        if key in history[0]:
            acc_ax.plot(epochs, [100 * row[key] for row in history], marker="o", label=key)
    if reference_accuracy is not None:
        acc_ax.axhline(100 * reference_accuracy, color="gray", linestyle="--",
                       label=f"{reference} {100 * reference_accuracy:.2f}%")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="%", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""PNG plots of a run's metrics (matplotlib is imported only here, only when plotting)."""

from __future__ import annotations

import io


def render_history(history: list[dict], title: str, reference_accuracy: float | None = None,
                   reference: str = "teacher") -> bytes | None:
    """A PNG of loss and accuracy against epoch; ``reference_accuracy`` (the teacher's, or an
    ensemble's: ``reference`` names it) as a dashed line. Rendered in memory, so the caller
    writes it like any other run file.

    None where matplotlib is missing (e.g. a bare accelerator image): the metrics are on disk
    and can be plotted later.
    """
    try:
        import matplotlib
    except ImportError:
        return None

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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()

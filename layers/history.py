"""``History``: what ``fit`` returns, one entry per epoch."""
from __future__ import annotations


class History:
    """Per-epoch training record returned by ``Sequential.fit``.

    Attributes:
        history: ``{"loss": [...], "accuracy": [...], "val_loss": [...], ...}``, one value per epoch.
        epoch: the epoch numbers (0-based).
        params: the fit arguments (epochs, batch_size, steps, engine, partitions).

    Example:
        >>> h = History(); h.record(0, {"loss": 0.5}); h.history["loss"]
        [0.5]
    """

    def __init__(self, params: dict | None = None):
        self.history: dict[str, list] = {}
        self.epoch: list[int] = []
        self.params = dict(params or {})

    def record(self, epoch: int, logs: dict) -> None:
        self.epoch.append(int(epoch))
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))

    def last(self) -> dict:
        return {k: v[-1] for k, v in self.history.items() if v}

    def plot(self, path: str, keys=None) -> str:
        """Write the training curves (loss and metrics per epoch) to a PNG at ``path``.

        Needs matplotlib (``pip install matplotlib``). Returns ``path``.
        """
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("History.plot needs matplotlib: pip install matplotlib") from e
        keys = list(keys or [k for k in self.history if not k.startswith("val_")])
        fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
        for ax, k in zip(axes[0], keys):
            ax.plot(self.epoch, self.history[k], marker="o", label=k)
            if "val_" + k in self.history:
                ax.plot(self.epoch, self.history["val_" + k], marker="o", label="val_" + k)
            ax.set_xlabel("epoch"); ax.set_title(k); ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, last={self.last()})"

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

    def figure(self, keys=None):
        """A matplotlib ``Figure`` of the training curves: one panel per key (default: every
        logged value without a ``val_`` prefix), each with its ``val_`` twin when there is one.

        Needs matplotlib (``pip install matplotlib``); uses the non-interactive Agg backend.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError("History.plot needs matplotlib: pip install matplotlib") from e
        keys = list(keys or [k for k in self.history if not k.startswith("val_")])
        unknown = [k for k in keys if k not in self.history]
        if unknown or not keys:
            raise ValueError(f"nothing to plot for keys {unknown or keys}; this history has "
                             f"{sorted(self.history)}")
        fig = Figure(figsize=(4.5 * len(keys), 3.5))
        axes = fig.subplots(1, len(keys), squeeze=False)[0]
        epochs = [e + 1 for e in self.epoch]
        for ax, k in zip(axes, keys):
            ax.plot(epochs, self.history[k], marker="o", label=k)
            if "val_" + k in self.history:
                ax.plot(epochs, self.history["val_" + k], marker="o", label="val_" + k)
            ax.set_xlabel("epoch")
            ax.set_title(k)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        return fig

    def plot(self, path: str, keys=None, dpi: int = 100) -> str:
        """Write the training curves (see :meth:`figure`) to a PNG at ``path``; returns ``path``.

        Example:
            >>> h = History(); h.record(0, {"loss": 0.9, "val_loss": 1.0})
            >>> h.record(1, {"loss": 0.5, "val_loss": 0.7})
            >>> h.plot("curves.png")  # doctest: +SKIP
            'curves.png'
        """
        fig = self.figure(keys)
        fig.savefig(path, dpi=dpi, format="png")
        return path

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, last={self.last()})"

"""The flat-parameter view: every parameter of a model in one float32 vector.

The vector holds parameters in layer order at fixed offsets; ``ParamLayout`` maps a dotted key
(``"2.W"``) to its slice. The in-process loop updates the whole vector; the distributed engine cuts
it into contiguous blocks (see ``block_bounds``) and updates each on its owner.
"""
from __future__ import annotations

import numpy as np

from rddtensor.backend import get_array_module


def block_bounds(size: int, n_blocks: int) -> list[tuple[int, int]]:
    """Cut ``range(size)`` into ``n_blocks`` contiguous blocks, the first ``size % n_blocks`` one longer.

    Example:
        >>> block_bounds(10, 3)
        [(0, 4), (4, 7), (7, 10)]
    """
    if n_blocks <= 0:
        raise ValueError(f"n_blocks must be a positive integer, got {n_blocks}")
    q, r = divmod(int(size), int(n_blocks))
    bounds, start = [], 0
    for i in range(n_blocks):
        stop = start + q + (1 if i < r else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class ParamLayout:
    """Offsets of named parameter tensors inside one flat vector.

    Args:
        entries: ``[(key, shape), ...]`` in layer order.
        buffers: keys of non-trainable entries (updated by adding their all-reduced change,
            never by the optimizer; see ``Layer.buffer_shapes``).

    Example:
        >>> lay = ParamLayout([("0.W", (2, 3)), ("0.b", (2,))])
        >>> lay.size, lay.offsets["0.b"]
        (8, (6, 8))
    """

    def __init__(self, entries, buffers=()):
        self.buffers = frozenset(buffers)
        self.shapes: dict[str, tuple] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for key, shape in entries:
            if key in self.shapes:
                raise ValueError(f"duplicate parameter key {key!r}")
            shape = tuple(int(s) for s in shape)
            n = int(np.prod(shape, dtype=np.int64))
            self.shapes[key] = shape
            self.offsets[key] = (start, start + n)
            start += n
        self.size = start

    @property
    def keys(self) -> list[str]:
        return list(self.shapes)

    def unflatten(self, vec) -> dict:
        """Views (no copies) of ``vec`` reshaped to each parameter's shape."""
        if vec.shape != (self.size,):
            raise ValueError(f"flat vector must have shape ({self.size},), got {vec.shape}")
        return {k: vec[a:b].reshape(self.shapes[k]) for k, (a, b) in self.offsets.items()}

    def flatten(self, arrays: dict, out=None, dtype=np.float32):
        """Pack ``arrays`` (same keys as the layout) into one vector, ``out`` if given.

        Missing keys raise, naming the key; a shape mismatch names both shapes.
        """
        if out is None:
            xp = get_array_module(*arrays.values()) if arrays else np
            out = xp.empty(self.size, dtype=dtype)
        for k, (a, b) in self.offsets.items():
            if k not in arrays:
                raise KeyError(f"missing parameter {k!r}")
            arr = arrays[k]
            if tuple(arr.shape) != self.shapes[k]:
                raise ValueError(f"parameter {k!r} must have shape {self.shapes[k]}, got {tuple(arr.shape)}")
            out[a:b] = arr.reshape(-1)
        return out

    def segments(self, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
        """Parameter-tensor boundaries inside ``[start, stop)``, relative to ``start``.

        LARS/LAMB compute one trust ratio per parameter tensor; a block that cuts through tensors
        passes these segments (the engine then corrects the per-tensor norms across blocks).
        """
        stop = self.size if stop is None else stop
        segs = []
        for a, b in self.offsets.values():
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                segs.append((lo - start, hi - start))
        return segs

    def split_segments(self, start: int = 0, stop: int | None = None):
        """``(trainable, buffers)``: the tensor segments of ``[start, stop)`` (relative to
        ``start``) holding parameters, and those holding buffers."""
        stop = self.size if stop is None else stop
        train, bufs = [], []
        for k, (a, b) in self.offsets.items():
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                (bufs if k in self.buffers else train).append((lo - start, hi - start))
        return train, bufs

    def to_config(self) -> list:
        return [[k, list(s)] for k, s in self.shapes.items()]

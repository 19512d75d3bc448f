"""Training checkpoints on disk: parameter blocks, optimizer slots, step counters, manifest last.

A checkpoint directory holds one sub-directory per saved step::

    checkpoint_dir/
        step-000000012/
            block-00000-of-00002.npz   θ[lo:hi) ("w"), each optimizer slot ("slot.m", ...), lo, hi, step
            block-00001-of-00002.npz
            manifest.json              written last: step counters, fit settings, every block's
                                       size and SHA-256
        step-000000016/ ...

In a distributed fit each block file is written by the partition that owns the block
(``rddtensor.spark.checkpoint``): the driver never gathers θ for a checkpoint; an in-process fit writes
one block. Block files are written under a temporary name and renamed; the manifest is written
(atomically) only once every block is in place, so a directory without ``manifest.json`` is a
checkpoint that did not finish and is never loaded, and a damaged block is detected by its hash.

What resuming needs, and where it is: θ_t and the optimizer slots (the blocks; BatchNorm running
statistics are buffers inside θ), the step ``t`` and the step the fit started from, ``t0``
(epoch = ``(t - t0) // steps_per_epoch``, and the batch within it), the statistics of the
unfinished epoch (so its logged loss and metrics cover all of its batches), and the random
state. Every random draw of training is a pure function of ``(seed, epoch)`` (the row order) or
``(seed, step, partition)`` (dropout masks; ``rddtensor.training.batching.step_rng``), so the seed and the
step *are* the random state: a resumed fit continues bit-identically.

Like model files, checkpoints are data only: ``.npz`` loaded with ``allow_pickle=False`` and JSON.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass

import numpy as np

from rddtensor.layers.base import positive_int
from rddtensor.optim.optimizers import serialize_optimizer
from rddtensor.version import __version__

log = logging.getLogger("rddtensor")

FORMAT = "rddtensor.spark.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_PREFIX = "step-"


def step_dir(directory: str, step: int) -> str:
    return os.path.join(directory, f"{_PREFIX}{int(step):09d}")


def block_name(i: int, n: int) -> str:
    return f"block-{int(i):05d}-of-{int(n):05d}.npz"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    # a unique temporary name: a retried or speculative task may write the same block at once
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_block(sdir: str, i: int, n: int, lo: int, hi: int, step: int, w, slots: dict) -> dict:
    """Write block ``i`` of ``n`` (θ[lo:hi) and its slots at ``step``); returns its manifest entry.

    Writing the same block twice (a retried task) writes the same bytes: idempotent.
    """
    buf = io.BytesIO()
    np.savez(buf, w=np.asarray(w, dtype=np.float32), lo=np.int64(lo), hi=np.int64(hi),
             step=np.int64(step),
             **{"slot." + k: np.asarray(v, dtype=np.float32) for k, v in slots.items()})
    data = buf.getvalue()
    os.makedirs(sdir, exist_ok=True)
    name = block_name(i, n)
    _write_atomic(os.path.join(sdir, name), data)
    return {"file": name, "i": int(i), "lo": int(lo), "hi": int(hi), "step": int(step),
            "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(sdir: str, info: dict, blocks: list) -> str:
    """Write ``manifest.json`` (last): ``info`` plus the block entries; returns its path."""
    blocks = sorted(blocks, key=lambda b: b["lo"])
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "rddtensor_version": __version__,
            **info, "blocks": blocks}
    path = os.path.join(sdir, MANIFEST)
    _write_atomic(path, json.dumps(meta, indent=1).encode())
    _fsync_dir(sdir)
    return path


# --- reading ------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, damaged, or from another format version)."""


@dataclass
class Checkpoint:
    """A complete checkpoint: its directory and its manifest (``meta``)."""

    path: str
    meta: dict

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def load(self):
        """``(θ, slots)`` as float32 arrays, every block checked against the manifest."""
        return load_arrays(self)


def read(sdir: str) -> Checkpoint:
    """The checkpoint in ``sdir``; ``CheckpointError`` says why it cannot be used."""
    path = os.path.join(sdir, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"{sdir!r} is not a complete checkpoint: {MANIFEST} is missing "
                              "(the save did not finish)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint manifest {path!r}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an rddtensor checkpoint manifest")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path!r} has checkpoint format version "
                              f"{meta.get('format_version')!r}; this rddtensor reads version "
                              f"{FORMAT_VERSION} (it was written by rddtensor "
                              f"{meta.get('rddtensor_version', '?')})")
    for b in meta.get("blocks", []):
        f = os.path.join(sdir, b["file"])
        if not os.path.exists(f) or os.path.getsize(f) != b["bytes"]:
            raise CheckpointError(f"checkpoint block {f!r} is missing or has the wrong size")
    return Checkpoint(sdir, meta)


def list_checkpoints(directory: str) -> list:
    """``[(step, path), ...]`` of the step directories in ``directory`` (complete or not), by step."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        if name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit():
            found.append((int(name[len(_PREFIX):]), os.path.join(directory, name)))
    return sorted(found)


def latest(directory: str) -> Checkpoint | None:
    """The newest complete checkpoint in ``directory``, or ``None``.

    Incomplete ones (no manifest: the save was interrupted) are skipped silently; damaged ones
    are skipped with a warning that names them.
    """
    for _, sdir in reversed(list_checkpoints(directory)):
        if not os.path.exists(os.path.join(sdir, MANIFEST)):
            continue
        try:
            return read(sdir)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", sdir, e)
    return None


def _load_block(path: str, entry: dict) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"checkpoint block {path!r} is damaged: its SHA-256 does not match "
                              "the manifest")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        raise CheckpointError(f"checkpoint block {path!r} holds non-numeric data ({e}); "
                              "refusing to load it") from None


def load_arrays(ckpt: Checkpoint):
    """``(θ, slots)`` of ``ckpt`` assembled from its blocks (any block count)."""
    meta = ckpt.meta
    size = int(meta["size"])
    theta = np.empty(size, np.float32)
    slots = {k: np.empty(size, np.float32) for k in meta["slots"]}
    at = 0
    for entry in meta["blocks"]:
        lo, hi = int(entry["lo"]), int(entry["hi"])
        path = os.path.join(ckpt.path, entry["file"])
        arrays = _load_block(path, entry)
        if lo != at or int(arrays["lo"]) != lo or int(arrays["hi"]) != hi or \
                int(arrays["step"]) != ckpt.step or arrays["w"].shape != (hi - lo,):
            raise CheckpointError(f"checkpoint block {path!r} does not hold [{lo}, {hi}) of "
                                  f"step {ckpt.step}")
        theta[lo:hi] = arrays["w"]
        for k in slots:
            if arrays.get("slot." + k, np.empty(0)).shape != (hi - lo,):
                raise CheckpointError(f"checkpoint block {path!r} lacks optimizer slot {k!r}")
            slots[k][lo:hi] = arrays["slot." + k]
        at = hi
    if at != size:
        raise CheckpointError(f"checkpoint {ckpt.path!r} covers {at} of {size} parameters")
    return theta, slots


# --- epoch statistics (loss sum, rows, metric states) as JSON ----------------------------------
def encode_stats(stats: dict) -> dict:
    states = [None if s is None else [{"dtype": np.asarray(a).dtype.str,
                                       "shape": list(np.shape(a)),
                                       "data": np.asarray(a).ravel().tolist()} for a in s]
              for s in stats["states"]]
    return {"loss": float(stats["loss"]), "count": int(stats["count"]), "states": states}


def decode_stats(d: dict) -> dict:
    states = [None if s is None else tuple(
        np.asarray(a["data"], dtype=np.dtype(a["dtype"])).reshape(a["shape"]) for a in s)
        for s in d["states"]]
    return {"loss": float(d["loss"]), "count": int(d["count"]), "states": states}


# --- the policy a fit follows ----------------------------------------------------------------
@dataclass
class Resume:
    """Where a resumed fit continues: ``t0`` (its epochs' origin), ``epoch`` and the statistics
    of that epoch's batches already done (``None`` at an epoch boundary)."""

    step: int
    t0: int
    epoch: int
    stats: dict | None
    path: str


_SETTINGS = ("seed", "batch_size", "shuffle", "n_total")


class Checkpointer:
    """Where and how often a fit saves checkpoints, and how it resumes from them.

    Args:
        directory: the checkpoint directory (created on the first save). In a distributed fit,
            executors write their blocks there, so it must be a filesystem every executor and
            the driver see at the same path (local disk for ``local[*]`` masters; NFS or a
            mounted bucket on a cluster).
        every: save after every ``every`` optimizer steps (global step divisible by it), or
            ``None`` for the end of every epoch.
        settings: the fit's ``seed``, ``batch_size``, ``shuffle`` and ``n_total`` (rows), and
            ``partitions``: saved with each checkpoint, and checked when resuming.
        keep: complete checkpoints kept (older ones are deleted after a save).
    """

    def __init__(self, directory: str, every=None, *, settings: dict, keep: int = 2):
        if not isinstance(directory, (str, os.PathLike)) or not str(directory):
            raise ValueError(f"checkpoint_dir must be a directory path, got {directory!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = None if every is None else positive_int(every, "checkpoint_every")
        self.settings = dict(settings)
        self.keep = positive_int(keep, "keep")
        self.saved: list[int] = []  # steps saved by this fit

    def due(self, step: int, epoch_end: bool) -> bool:
        return epoch_end if self.every is None else step % self.every == 0

    def clip(self, step: int, steps: int) -> int:
        """``steps`` shortened so that a run of iterations from ``step`` ends on a save point."""
        if self.every is None:
            return steps
        return min(steps, self.every - step % self.every)

    def info(self, model, step: int, t0: int, steps_per_epoch: int, stats: dict) -> dict:
        epoch, b = divmod(step - t0, steps_per_epoch)
        return {"step": int(step), "t0": int(t0), "epoch": int(epoch), "step_in_epoch": int(b),
                "steps_per_epoch": int(steps_per_epoch), **self.settings,
                "size": int(model.layout.size), "layout": model.layout.to_config(),
                "slots": sorted(model.slots or {}),
                "optimizer": serialize_optimizer(model.optimizer),
                "epoch_stats": encode_stats(stats) if b else None}

    def commit(self, info: dict, blocks: list) -> str:
        """Write the manifest of step ``info["step"]`` (every block is in place) and prune."""
        step = info["step"]
        sdir = step_dir(self.directory, step)
        if sorted(b["step"] for b in blocks) != [step] * len(blocks):
            raise RuntimeError(f"checkpoint of step {step} got blocks of steps "
                               f"{sorted({b['step'] for b in blocks})}")
        write_manifest(sdir, info, blocks)
        self.saved.append(int(step))
        self._prune()
        return sdir

    def save_local(self, model, t0: int, steps_per_epoch: int, stats: dict) -> str:
        """Save an in-process model's θ and slots as one block."""
        step = model.step
        sdir = step_dir(self.directory, step)
        _clear(sdir)
        block = write_block(sdir, 0, 1, 0, model.layout.size, step, model.theta,
                            model.slots or {})
        return self.commit(self.info(model, step, t0, steps_per_epoch, stats), [block])

    def _prune(self):
        """Keep the newest ``keep`` complete checkpoints; drop older ones and unfinished saves
        older than the newest complete one."""
        found = list_checkpoints(self.directory)
        done = [(s, p) for s, p in found if os.path.exists(os.path.join(p, MANIFEST))]
        newest = done[-1][0] if done else -1
        drop = done[:-self.keep] + [(s, p) for s, p in found
                                    if s < newest and (s, p) not in done]
        for _, p in drop:
            shutil.rmtree(p, ignore_errors=True)

    # --- resuming ---------------------------------------------------------------------------
    def latest(self) -> Checkpoint | None:
        return latest(self.directory)

    def newest_loadable(self):
        """``(checkpoint, θ, slots)`` of the newest complete checkpoint whose blocks all check
        out against its manifest, or ``None``; damaged ones are skipped with a warning."""
        for _, sdir in reversed(list_checkpoints(self.directory)):
            if not os.path.exists(os.path.join(sdir, MANIFEST)):
                continue  # a save that did not finish
            try:
                ckpt = read(sdir)
                theta, slots = ckpt.load()
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", sdir, e)
                continue
            return ckpt, theta, slots
        return None

    def restore(self, model, ckpt: Checkpoint, arrays=None) -> Resume:
        """Load ``ckpt`` into ``model`` (θ, slots, step) after checking it belongs to this fit;
        ``arrays``: its ``(θ, slots)`` if already loaded."""
        meta = ckpt.meta
        for k in _SETTINGS:
            if k in self.settings and meta.get(k) != self.settings[k]:
                raise ValueError(
                    f"cannot resume from {ckpt.path!r}: it was written by a fit with {k}="
                    f"{meta.get(k)!r}, this fit has {k}={self.settings[k]!r}; resume with the "
                    "same data and settings, or use a new checkpoint_dir")
        _check_layout(model, meta, ckpt.path)
        want = sorted(model.optimizer.slot_names)
        if sorted(meta["slots"]) != want:
            raise ValueError(f"cannot resume from {ckpt.path!r}: it holds optimizer slots "
                             f"{sorted(meta['slots'])}, but {type(model.optimizer).__name__} "
                             f"needs {want}; compile with the optimizer it was trained with")
        if meta.get("partitions") != self.settings.get("partitions"):
            log.warning("resuming from %s, written with %s partitions, on %s: the weights are "
                        "the same, later sums run in another order (float rounding)",
                        ckpt.path, meta.get("partitions"), self.settings.get("partitions"))
        changed = _changed_optimizer(meta.get("fit_optimizer", meta.get("optimizer")),
                                     self.settings.get("fit_optimizer", {}))
        if changed:
            text = (f"resume=True from {ckpt.path}: this fit changes the optimizer settings the "
                    f"checkpoint's fit started with: {', '.join(changed)}; the resumed steps "
                    "use the new ones (compile with the old ones to continue the same run)")
            warnings.warn(text, UserWarning, stacklevel=4)
        theta, slots = ckpt.load() if arrays is None else arrays
        model.slots = None
        model.init_slots()
        model.load_state(theta, {k: slots[k] for k in model.optimizer.slot_names}, ckpt.step)
        stats = meta.get("epoch_stats")
        return Resume(ckpt.step, int(meta["t0"]), int(meta["epoch"]),
                      decode_stats(stats) if stats else None, ckpt.path)


def _check_layout(model, meta: dict, path: str) -> None:
    want = model.layout.to_config()
    got = meta.get("layout")
    if got == want:
        return
    for (k1, s1), (k2, s2) in zip(got, want):
        if k1 != k2 or s1 != s2:
            raise ValueError(f"cannot resume from {path!r}: it holds parameter {k1!r} of shape "
                             f"{tuple(s1)} where this model has {k2!r} of shape {tuple(s2)}")
    raise ValueError(f"cannot resume from {path!r}: it holds {len(got)} parameter tensors, "
                     f"this model has {len(want)}")


def _clear(sdir: str) -> None:
    """Remove a step directory left by an earlier, unfinished save of the same step."""
    if os.path.isdir(sdir):
        shutil.rmtree(sdir, ignore_errors=True)


def check_directory(checkpoint_dir) -> str:
    """The absolute path of ``checkpoint_dir`` once it is a directory this process can write
    checkpoints into (created if missing, proved by writing and deleting a small file), so a
    bad path fails before any training instead of at the first save; else a ``ValueError``
    that names the path and why."""
    if not isinstance(checkpoint_dir, (str, os.PathLike)) or not os.fspath(checkpoint_dir):
        raise ValueError(f"checkpoint_dir must be a directory path, got {checkpoint_dir!r}")
    path = os.path.abspath(os.fspath(checkpoint_dir))
    fix = "pass a directory this process can create and write (an empty or new one)"
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"checkpoint_dir={os.fspath(checkpoint_dir)!r} is a file, not a "
                         f"directory ({path}); {fix}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        parent = os.path.dirname(path)
        while parent and not os.path.exists(parent) and parent != os.path.dirname(parent):
            parent = os.path.dirname(parent)
        why = (f"{parent} is a file, not a directory" if parent and os.path.exists(parent)
               and not os.path.isdir(parent) else f"it cannot be created: "
               f"{type(e).__name__}: {e.strerror or e}")
        raise ValueError(f"checkpoint_dir={os.fspath(checkpoint_dir)!r}: {why}; {fix}") from None
    probe = os.path.join(path, f".rddtensor-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(probe, "wb") as f:
            f.write(b"rddtensor")
    except OSError as e:
        raise ValueError(f"checkpoint_dir={os.fspath(checkpoint_dir)!r}: cannot write files "
                         f"there ({type(e).__name__}: {e.strerror or e}); {fix}") from None
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass
    return path


def _changed_optimizer(old: dict | None, new: dict) -> list:
    """``["lr 0.05 -> 0.01", ...]``: the optimizer settings of a checkpoint's fit (``old``, as
    saved: ``serialize_optimizer`` through JSON) that the resuming fit changes."""
    if not isinstance(old, dict):
        return []
    new = json.loads(json.dumps(new))  # compare like with like (tuples are lists in JSON)
    changes = []
    if old.get("class_name") != new.get("class_name"):
        changes.append(f"optimizer {old.get('class_name')} -> {new.get('class_name')}")
    a, b = old.get("config") or {}, new.get("config") or {}
    for k in [*a, *(k for k in b if k not in a)]:
        if a.get(k) != b.get(k):
            changes.append(f"{k} {a.get(k)!r} -> {b.get(k)!r}")
    return changes


def start(model, checkpoint_dir, checkpoint_every, resume: bool, *, settings: dict):
    """The checkpoint policy of a fit and, with ``resume``, the state it continues from.

    Call after the model is built and its optimizer slots exist. Returns
    ``(checkpointer or None, Resume or None)``; ``resume=True`` with no complete checkpoint in
    the directory starts from the model as it is (so a job can always pass ``resume=True``).
    """
    if not isinstance(resume, bool):
        raise ValueError(f"resume must be True or False, got {resume!r}")
    if checkpoint_dir is None:
        if resume:
            raise ValueError("resume=True needs checkpoint_dir=...: the directory to resume from")
        if checkpoint_every is not None:
            raise ValueError("checkpoint_every needs checkpoint_dir=...: where to write them")
        return None, None
    check_directory(checkpoint_dir)
    # the optimizer as this fit starts (a callback may change its learning rate later): a
    # resumed fit compares its own with it (``Checkpointer.restore``)
    settings = {**settings, "fit_optimizer": serialize_optimizer(model.optimizer)}
    ckpt = Checkpointer(checkpoint_dir, checkpoint_every, settings=settings)
    if not resume:
        found = ckpt.latest()
        if found is not None:
            raise ValueError(f"checkpoint_dir {ckpt.directory!r} already holds checkpoints "
                             f"(newest: step {found.step}); pass resume=True to continue from "
                             "it, or use an empty directory")
        return ckpt, None
    loaded = ckpt.newest_loadable()
    if loaded is None:
        log.info("resume=True: no complete checkpoint in %s, starting from step %d",
                 ckpt.directory, model.step)
        return ckpt, None
    found, theta, slots = loaded
    return ckpt, ckpt.restore(model, found, (theta, slots))

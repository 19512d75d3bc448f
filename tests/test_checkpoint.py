"""Checkpoints and resume (``rddtensor.training.checkpoint``, ``rddtensor.spark.checkpoint``).

The promise: interrupt a fit anywhere (an epoch boundary or mid-epoch, in process or on Spark),
resume from the newest complete checkpoint, and end with weights, optimizer slots, step and the
resumed epochs' history bit-identical to a fit that was never interrupted. A distributed crash is
simulated with the fault hook (``RDDTENSOR_FAIL_AT``: every attempt of one step fails, which
aborts the job on ``local[2]``). Plus: what a checkpoint directory holds, that incomplete or
damaged checkpoints are never loaded, and the errors for a resume that does not fit.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.training import checkpoint as C
from rddtensor.optim import SGD, Adam

_rng = np.random.default_rng(3)
X = _rng.normal(size=(30, 5)).astype(np.float32)
Y = (X[:, 0] - X[:, 2] > 0).astype(np.int64)
# 30 rows, batch 7: 5 steps per epoch (the last one 2 rows); 3 epochs = 15 steps
FIT = dict(batch_size=7, seed=3, verbose=0)


def model(dropout=0.3, opt=None):
    layers = [L.Dense(6, activation="relu", input_shape=(5,))]
    if dropout:
        layers.append(L.Dropout(dropout))  # resume must continue the dropout masks too
    m = L.Sequential(layers + [L.Dense(2)], seed=1)
    m.compile(optimizer=opt or Adam(0.05), loss="sparse_categorical_crossentropy",
              metrics=["accuracy"])
    return m


def assert_bit_identical(a, b):
    np.testing.assert_array_equal(a.theta, b.theta)
    assert a.step == b.step
    assert sorted(a.slots) == sorted(b.slots)
    for k in a.slots:
        np.testing.assert_array_equal(a.slots[k], b.slots[k], err_msg=f"slot {k}")


def assert_history_tail(h, ref):
    """The resumed fit's epochs have exactly the uninterrupted fit's logs for those epochs."""
    n = len(h.epoch)
    assert h.epoch == ref.epoch[-n:]
    for k, v in ref.history.items():
        assert h.history[k] == v[-n:], k


# --- in process ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ref():
    m = model()
    h = m.fit(X, Y, epochs=3, **FIT)
    return m, h


@pytest.mark.parametrize("every, first_epochs, resumed_at", [
    (None, 1, 5),   # epoch-end checkpoints: resume at the start of epoch 1
    (3, 2, 9),      # every 3 steps: the last one (step 9) is mid-epoch 1 (steps 6..10)
])
def test_local_resume_is_bit_identical(tmp_path, local_ref, every, first_epochs, resumed_at):
    ref, href = local_ref
    d = str(tmp_path / "ckpt")
    model().fit(X, Y, epochs=first_epochs, checkpoint_dir=d, checkpoint_every=every, **FIT)
    assert C.latest(d).step == resumed_at
    m = model()
    h = m.fit(X, Y, epochs=3, checkpoint_dir=d, checkpoint_every=every, resume=True, **FIT)
    assert h.params["resumed_from"] == C.step_dir(d, resumed_at)
    assert_bit_identical(m, ref)
    assert_history_tail(h, href)
    # a mid-epoch resume reports the whole epoch: its first batches' stats were saved
    assert h.epoch[0] == resumed_at // 5


def test_resume_with_no_checkpoint_starts_afresh(tmp_path, local_ref):
    ref, _ = local_ref
    m = model()
    h = m.fit(X, Y, epochs=3, checkpoint_dir=str(tmp_path / "new"), resume=True, **FIT)
    assert "resumed_from" not in h.params and h.epoch == [0, 1, 2]
    assert_bit_identical(m, ref)


def test_resume_after_the_last_epoch_trains_nothing(tmp_path, local_ref):
    ref, _ = local_ref
    d = str(tmp_path / "c")
    model().fit(X, Y, epochs=3, checkpoint_dir=d, **FIT)
    m = model()
    h = m.fit(X, Y, epochs=3, checkpoint_dir=d, resume=True, **FIT)
    assert h.epoch == []
    assert_bit_identical(m, ref)


def test_checkpoint_directory_layout(tmp_path):
    d = tmp_path / "c"
    m = model(opt=SGD(0.1, momentum=0.9))
    m.fit(X, Y, epochs=2, checkpoint_dir=str(d), checkpoint_every=2, **FIT)
    # steps 2, 4, 6, 8, 10 saved; the newest two kept
    assert sorted(os.listdir(d)) == ["step-000000008", "step-000000010"]
    sdir = d / "step-000000010"
    assert sorted(os.listdir(sdir)) == ["block-00000-of-00001.npz", "manifest.json"]
    meta = json.loads((sdir / "manifest.json").read_text())
    assert meta["format"] == "rddtensor.spark.checkpoint" and meta["format_version"] == 1
    assert (meta["step"], meta["t0"], meta["epoch"], meta["step_in_epoch"]) == (10, 0, 2, 0)
    assert meta["seed"] == 3 and meta["batch_size"] == 7 and meta["n_total"] == 30
    assert meta["slots"] == ["momentum"] and meta["size"] == m.layout.size
    assert meta["optimizer"]["class_name"] == "SGD"
    (block,) = meta["blocks"]
    assert (block["lo"], block["hi"]) == (0, m.layout.size) and len(block["sha256"]) == 64
    with np.load(sdir / block["file"], allow_pickle=False) as z:
        assert sorted(z.files) == ["hi", "lo", "slot.momentum", "step", "w"]
        np.testing.assert_array_equal(z["w"], m.theta)
        np.testing.assert_array_equal(z["slot.momentum"], m.slots["momentum"])


def _two_checkpoints(tmp_path):
    d = str(tmp_path / "c")
    model().fit(X, Y, epochs=2, checkpoint_dir=d, checkpoint_every=4, **FIT)  # steps 4 and 8
    assert [s for s, _ in C.list_checkpoints(d)] == [4, 8]
    return d


def test_half_written_checkpoint_is_never_loaded(tmp_path):
    d = _two_checkpoints(tmp_path)
    os.remove(os.path.join(C.step_dir(d, 8), "manifest.json"))  # the save of step 8 died
    assert C.latest(d).step == 4
    with pytest.raises(C.CheckpointError, match="manifest.json is missing"):
        C.read(C.step_dir(d, 8))


def test_damaged_block_is_detected_and_skipped(tmp_path, caplog):
    d = _two_checkpoints(tmp_path)
    path = os.path.join(C.step_dir(d, 8), C.block_name(0, 1))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(C.CheckpointError, match="damaged: its SHA-256 does not match"):
        C.read(C.step_dir(d, 8)).load()
    # resume passes over it, says so, and continues from the one before
    with caplog.at_level(logging.WARNING, logger="rddtensor"):
        h = model().fit(X, Y, epochs=2, checkpoint_dir=d, checkpoint_every=4, resume=True, **FIT)
    assert h.params["resumed_from"] == C.step_dir(d, 4)
    assert "skipping checkpoint" in caplog.text and "SHA-256 does not match" in caplog.text
    caplog.clear()
    # a truncated block has the wrong size: the newest usable checkpoint is the one before
    open(path, "wb").write(bytes(data[:100]))
    with caplog.at_level(logging.WARNING, logger="rddtensor"):
        assert C.latest(d).step == 4
    assert "wrong size" in caplog.text


def test_checkpoint_blocks_never_unpickle(tmp_path):
    import hashlib
    import io
    d = _two_checkpoints(tmp_path)
    sdir = C.step_dir(d, 8)
    buf = io.BytesIO()
    np.savez(buf, w=np.array([os.system], dtype=object), lo=0, hi=1, step=8)
    data = buf.getvalue()
    open(os.path.join(sdir, C.block_name(0, 1)), "wb").write(data)
    meta = json.load(open(os.path.join(sdir, "manifest.json")))
    meta["blocks"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    json.dump(meta, open(os.path.join(sdir, "manifest.json"), "w"))
    with pytest.raises(C.CheckpointError, match="non-numeric data.*refusing to load"):
        C.read(sdir).load()


def test_checkpoint_from_a_newer_format_is_refused(tmp_path):
    d = _two_checkpoints(tmp_path)
    path = os.path.join(C.step_dir(d, 8), "manifest.json")
    meta = json.load(open(path))
    meta["format_version"] = 7
    json.dump(meta, open(path, "w"))
    with pytest.raises(C.CheckpointError, match="format version 7; this rddtensor reads version 1"):
        C.read(C.step_dir(d, 8))


RESUME_ERRORS = {
    # what differs from the checkpointed fit: (model factory, fit kwargs, message)
    "batch_size": (model, {"batch_size": 6}, r"batch_size=7, this fit has batch_size=6"),
    "seed": (model, {"seed": 4}, r"seed=3, this fit has seed=4"),
    "rows": (model, {"rows": 29}, r"n_total=30, this fit has n_total=29"),
    "architecture": (lambda: L.Sequential([L.Dense(7, input_shape=(5,)), L.Dense(2)], seed=1),
                     {}, r"parameter '0\.W' of shape \(6, 5\) where this model has '0\.W' of "
                         r"shape \(7, 5\)"),
    "optimizer": (lambda: model(opt=SGD(0.1, momentum=0.5)), {},
                  r"slots \['m', 'v'\], but SGD needs \['momentum'\]"),
}


@pytest.mark.parametrize("case", list(RESUME_ERRORS))
def test_resume_that_does_not_match_the_checkpoint(tmp_path, case):
    d = _two_checkpoints(tmp_path)
    make, kw, msg = RESUME_ERRORS[case]
    m = make()
    if m.loss is None:
        m.compile(optimizer=Adam(0.05), loss="sparse_categorical_crossentropy")
    n = kw.pop("rows", len(X))
    with pytest.raises(ValueError, match=msg):
        m.fit(X[:n], Y[:n], epochs=3, checkpoint_dir=d, resume=True, **{**FIT, **kw})


@pytest.mark.parametrize("kwargs, msg", [
    ({"resume": True}, r"resume=True needs checkpoint_dir=\.\.\."),
    ({"checkpoint_every": 2}, r"checkpoint_every needs checkpoint_dir=\.\.\."),
    ({"checkpoint_dir": "D", "checkpoint_every": 0}, r"checkpoint_every must be a positive "
                                                     r"integer, got 0"),
    ({"checkpoint_dir": "D", "resume": "yes"}, r"resume must be True or False, got 'yes'"),
])
def test_checkpoint_argument_errors(tmp_path, kwargs, msg):
    if kwargs.get("checkpoint_dir") == "D":
        kwargs = {**kwargs, "checkpoint_dir": str(tmp_path / "d")}
    with pytest.raises(ValueError, match=msg):
        model().fit(X, Y, epochs=1, **FIT, **kwargs)


def test_fresh_fit_refuses_a_directory_with_checkpoints(tmp_path):
    d = _two_checkpoints(tmp_path)
    with pytest.raises(ValueError, match=r"already holds checkpoints \(newest: step 8\); pass "
                                         r"resume=True"):
        model().fit(X, Y, epochs=1, checkpoint_dir=d, **FIT)


# --- distributed --------------------------------------------------------------------------------
def chunked(sc, rows, sizes):
    b = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return sc.parallelize([rows[a:z] for a, z in zip(b[:-1], b[1:])], len(sizes)).flatMap(
        lambda c: c)


_DIST: dict = {}


def dist_ref(sc, allreduce):
    """An uninterrupted distributed fit (3 epochs, 3 uneven partitions), computed once."""
    if allreduce not in _DIST:
        m = model()
        h = m.fit(chunked(sc, list(zip(X, Y)), [9, 4, 17]), epochs=3, allreduce=allreduce,
                  iterations_per_job=4, **FIT)
        _DIST[allreduce] = (m, h)
    return _DIST[allreduce]


@pytest.mark.spark
@pytest.mark.parametrize("allreduce", ["sharded", "replicated"])
def test_distributed_crash_and_resume_is_bit_identical(sc, tmp_path, monkeypatch, allreduce):
    ref, href = dist_ref(sc, allreduce)
    rdd = chunked(sc, list(zip(X, Y)), [9, 4, 17])
    d = str(tmp_path / "ckpt")
    kw = dict(epochs=3, allreduce=allreduce, iterations_per_job=4, checkpoint_dir=d,
              checkpoint_every=3, **FIT)
    # every attempt of step 11 fails: on local[2] (one attempt per task) the job aborts there
    monkeypatch.setenv("RDDTENSOR_FAIL_AT", "11:*:*")
    crashed = model()
    with pytest.raises(RuntimeError, match=r"injected task failure at step 11, partition \d, "
                                           r"attempt 0"):
        crashed.fit(rdd, **kw)
    monkeypatch.delenv("RDDTENSOR_FAIL_AT")
    # the failed fit keeps its last completed step (the end of epoch 2, step 10: the job of
    # steps 11-12 failed); the newest checkpoint is step 9
    assert crashed.step == 10

    # the newest checkpoint is step 9, mid-epoch 1 (steps 6..10); each partition wrote its block
    ck = C.latest(d)
    assert ck.step == 9 and (ck.meta["epoch"], ck.meta["step_in_epoch"]) == (1, 4)
    assert [b["file"] for b in ck.meta["blocks"]] == [C.block_name(i, 3) for i in range(3)]
    assert ck.meta["partitions"] == 3

    m = model()
    h = m.fit(rdd, resume=True, **kw)
    assert h.params["resumed_from"] == ck.path
    assert_bit_identical(m, ref)
    assert_history_tail(h, href)


@pytest.mark.spark
def test_distributed_checkpoint_resumes_in_process(sc, tmp_path):
    """One format for both engines: a checkpoint of 3 blocks continues in process (no dropout:
    a partition's masks are its own, so only dropout-free runs match across engines)."""
    ref = model(dropout=None)
    ref.fit(X, Y, epochs=3, **FIT)
    d = str(tmp_path / "ckpt")
    model(dropout=None).fit(chunked(sc, list(zip(X, Y)), [9, 4, 17]), epochs=1,
                            allreduce="sharded", checkpoint_dir=d, checkpoint_every=3, **FIT)
    assert C.latest(d).step == 3 and len(C.latest(d).meta["blocks"]) == 3
    m = model(dropout=None)
    m.fit(X, Y, epochs=3, checkpoint_dir=d, resume=True, **FIT)
    assert m.step == ref.step
    np.testing.assert_allclose(m.theta, ref.theta, rtol=1e-5, atol=1e-6)


def _persisted(sc):
    return {int(k): v for k, v in dict(sc._jsc.getPersistentRDDs()).items()}


@pytest.mark.spark
@pytest.mark.parametrize("job", ["checkpoint", "validation"])
def test_state_lost_before_a_job_that_reads_it_is_recovered(sc, tmp_path, monkeypatch, job):
    """The state lost between the training job that made it and a job that reads it (the
    executor-loss scenario once caught a kill there, during a checkpoint write): the fit reloads
    its last checkpoint, replays, and runs that job again, bit-identically."""
    from rddtensor.spark import engine
    ref, href = dist_ref(sc, "sharded")
    before = set(_persisted(sc))
    name = "save_state" if job == "checkpoint" else "evaluate_state"
    real, calls = getattr(engine, name), []

    def losing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # a checkpoint to go back to exists by now
            newest = max(set(_persisted(sc)) - before)
            _persisted(sc)[newest].unpersist(True)
        return real(*args, **kw)

    monkeypatch.setattr(engine, name, losing)
    kw = dict(epochs=3, allreduce="sharded", iterations_per_job=4,
              checkpoint_dir=str(tmp_path / "c"), checkpoint_every=3, **FIT)
    if job == "validation":
        kw["validation_data"] = chunked(sc, list(zip(X, Y)), [15, 15])
    m = model()
    h = m.fit(chunked(sc, list(zip(X, Y)), [9, 4, 17]), **kw)
    assert len(calls) >= 4  # the lost read ran again after the recovery, then the fit went on
    assert_bit_identical(m, ref)
    assert h.history["loss"] == href.history["loss"]
    assert set(_persisted(sc)) - before == set()


@pytest.mark.spark
@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_lost_parameter_state_reloads_the_last_checkpoint(sc, tmp_path, with_checkpoint):
    """Every copy of the parameter state gone (as when all executors holding it die): the fit
    reloads its newest checkpoint and replays the steps since, bit-identically; without a
    checkpoint it stops with an error that says what to do."""
    ref, href = dist_ref(sc, "sharded")
    before = set(_persisted(sc))

    def lose_state(epoch, logs):
        if epoch == 0:  # the state of step 5; the newest checkpoint is step 3
            newest = max(set(_persisted(sc)) - before)
            _persisted(sc)[newest].unpersist(True)

    kw = dict(epochs=3, allreduce="sharded", iterations_per_job=4, callbacks=[lose_state], **FIT)
    if with_checkpoint:
        kw.update(checkpoint_dir=str(tmp_path / "c"), checkpoint_every=3)
    m = model()
    rdd = chunked(sc, list(zip(X, Y)), [9, 4, 17])
    if not with_checkpoint:
        with pytest.raises(RuntimeError, match=r"parameter state at step 5 was lost with the "
                                               r"executors holding it; no checkpoint to reload: "
                                               r"pass checkpoint_dir="):
            m.fit(rdd, **kw)
        return
    h = m.fit(rdd, **kw)
    assert_bit_identical(m, ref)
    assert h.history == href.history
    assert set(_persisted(sc)) - before == set()

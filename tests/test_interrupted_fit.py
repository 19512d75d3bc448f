"""An interrupted or failed distributed fit keeps its progress (issue 15, item 4).

Whatever ends a fit early — Ctrl-C, an error in a callback, a checkpoint that cannot be
written, a failed job — the model afterwards holds the weights, optimizer slots and step of the
last completed step (the last cut parameter state), exactly those of a fit that ran that far
and stopped, and a ``FitInterrupted`` warning says which step that is. The original exception
reaches the caller unchanged. Where the state cannot be read back (the SparkContext is gone),
the model keeps what it held and the warning says so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.training.callbacks import LambdaCallback
from rddtensor.optim import Adam
from rddtensor.spark.errors import FitInterrupted

pytestmark = pytest.mark.spark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_rng = np.random.default_rng(11)
X = _rng.normal(size=(24, 5)).astype(np.float32)
Y = (X[:, 0] - X[:, 3] > 0).astype(np.int64)
# 24 rows, batch 6: 4 steps per epoch; two partitions
FIT = dict(batch_size=6, seed=4, verbose=0, iterations_per_job=3)
SPE = 4


def model():
    m = L.Sequential([L.Dense(6, activation="relu", input_shape=(5,)), L.Dropout(0.2),
                      L.Dense(2)], seed=2)
    m.compile(optimizer=Adam(0.05), loss="sparse_categorical_crossentropy",
              metrics=["accuracy"])
    return m


@pytest.fixture(scope="module")
def data(sc):
    return sc.parallelize(list(zip(X, Y)), 2)


@pytest.fixture(scope="module")
def after(data):
    """Uninterrupted fits of 2 and 4 epochs: what an interrupted fit must hold, and where a
    continued one must end."""
    runs = {}
    for epochs in (2, 4):
        m = model()
        m.fit(data, epochs=epochs, **FIT)
        runs[epochs] = m
    return runs


def assert_same_state(m, ref):
    assert m.step == ref.step
    np.testing.assert_array_equal(m.theta, ref.theta)
    assert sorted(m.slots) == sorted(ref.slots) and m.slots
    for k in m.slots:
        np.testing.assert_array_equal(m.slots[k], ref.slots[k], err_msg=f"slot {k}")


def stop_after_epoch(n, exc=KeyboardInterrupt):
    def on_epoch_end(epoch, logs):
        if epoch == n - 1:
            raise exc
    return LambdaCallback(on_epoch_end=on_epoch_end)


def test_ctrl_c_after_epoch_2_keeps_the_weights_of_epoch_2(data, after):
    m = model()
    m.build()
    initial = m.theta.copy()
    with pytest.warns(FitInterrupted, match=r"fit interrupted by KeyboardInterrupt in epoch 2 of "
                                            r"10: the model holds the weights, optimizer slots "
                                            r"and step of step 8, the last completed step \(the "
                                            r"end of epoch 2\); fit\(\.\.\., initial_epoch=2\) "
                                            r"continues"):
        with pytest.raises(KeyboardInterrupt):
            m.fit(data, epochs=10, callbacks=[stop_after_epoch(2)], **FIT)
    assert m.step == 2 * SPE
    assert not np.array_equal(m.theta, initial)
    assert_same_state(m, after[2])  # bit for bit: the fit that stopped there by itself

    # what the warning says works: the continued fit ends where 4 uninterrupted epochs end
    m.fit(data, epochs=4, initial_epoch=2, **FIT)
    assert_same_state(m, after[4])


def test_an_error_in_a_callback_is_raised_unchanged_and_keeps_the_progress(data, after):
    class Full(Exception):
        pass

    m = model()
    boom = Full("the disk is full")
    with pytest.warns(FitInterrupted, match=r"fit interrupted by Full .*step of step 8"):
        with pytest.raises(Full) as e:
            m.fit(data, epochs=5, callbacks=[stop_after_epoch(2, boom)], **FIT)
    assert e.value is boom
    assert_same_state(m, after[2])


def test_a_checkpoint_that_cannot_be_written_keeps_the_completed_epoch(data, after, tmp_path):
    """The save at the end of epoch 2 fails (something that is not a directory is in the way
    of its step directory: a failure root cannot write past either); the model keeps epoch 2,
    and the checkpoint of epoch 1 is still there to resume from."""
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "step-000000008").write_text("not a directory")
    m = model()
    with pytest.warns(FitInterrupted, match=r"step of step 8, the last completed step \(the end "
                                            r"of epoch 2\); resume=True"):
        with pytest.raises(OSError, match=r"the checkpoint of step 8 could not be written to "
                                          r".*step-000000008.*File exists") as e:
            m.fit(data, epochs=4, checkpoint_dir=str(d), **FIT)
    assert "org.apache" not in str(e.value) and "Py4J" not in str(e.value)
    assert_same_state(m, after[2])
    assert (d / "step-000000004" / "manifest.json").exists()


# --- a real Ctrl-C in the middle of a Spark job, and a SparkContext that is gone: a process each
_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, threading, time, warnings
    import numpy as np
    from rddtensor import layers as L
    from rddtensor.training.callbacks import Callback, LambdaCallback, ModelCheckpoint
    from rddtensor.spark.errors import FitInterrupted
    from rddtensor.spark.session import get_spark

    sc = get_spark("local[2]").sparkContext
    rng = np.random.default_rng(0)
    out = {}

    def model(width):
        m = L.Sequential([L.Dense(width, activation="relu", input_shape=(5,)), L.Dense(2)],
                         seed=0)
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        return m

    def run(m, rdd, **kw):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t0 = time.time()
            try:
                m.fit(rdd, verbose=0, **kw)
                got = "no exception"
            except KeyboardInterrupt:
                got = "KeyboardInterrupt"
        return {"raised": got, "step": m.step, "ended": time.time(),
                "warnings": [str(x.message) for x in w if x.category is FitInterrupted]}

    # 1. SIGINT while epoch 2's one job runs: the fit ends soon (the job is cancelled), with
    #    the state of the end of epoch 1
    X = rng.normal(size=(480, 5)).astype(np.float32)
    rdd = sc.parallelize(list(zip(X, (X[:, 0] > 0).astype(np.int64))), 2)
    times = {}

    def arm(epoch, logs):
        times[epoch] = time.time()
        if epoch == 1:
            threading.Timer(float(os.environ["SIGINT_AFTER"]),
                            lambda: os.kill(os.getpid(), signal.SIGINT)).start()

    class Record(Callback):  # the weights at the end of epoch 1, as a callback sees them
        def on_epoch_end(self, epoch, logs=None):
            times["end", epoch] = time.time()
            if epoch == 0:
                self.sync_weights()
                times["theta"] = self.model.theta.copy()

    big = model(64)
    res = run(big, rdd, epochs=3, batch_size=8, iterations_per_job=60,
              callbacks=[LambdaCallback(on_epoch_begin=arm), Record()])
    res["epoch_seconds"] = times["end", 0] - times[0]
    res["interrupted_after"] = res["ended"] - times[1]
    res["equal_to_one_epoch"] = bool(np.array_equal(big.theta, times["theta"]))
    out["sigint"] = res

    # 2. the SparkContext is gone when the fit ends: the model keeps its last copy (epoch 1's,
    #    synced by ModelCheckpoint)
    small = model(4)
    rdd = sc.parallelize(list(zip(X[:24], (X[:24, 0] > 0).astype(np.int64))), 2)

    def stop_spark(epoch, logs):
        if epoch == 1:
            sc.stop()
            raise KeyboardInterrupt

    res = run(small, rdd, epochs=4, batch_size=6, callbacks=[
        LambdaCallback(on_epoch_end=stop_spark),
        ModelCheckpoint(os.path.join(os.environ["WORK"], "m{epoch}"), save_best_only=False,
                        monitor="loss")])
    out["gone"] = res
    print("RESULT " + json.dumps(out), flush=True)
""")


@pytest.fixture(scope="module")
def subprocess_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("interrupted")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "SIGINT_AFTER": "1.0", "WORK": str(work)}
    p = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                       env=env, timeout=300, cwd=str(work))
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, f"the script failed (exit {p.returncode}):\n{p.stderr[-5000:]}"
    return json.loads(line[-1][len("RESULT "):])


@pytest.mark.alone  # its subprocess times the interruption (conftest.py): nothing else runs
@pytest.mark.slow
def test_ctrl_c_during_a_spark_job_cancels_it_and_keeps_the_last_completed_step(
        subprocess_runs):
    r = subprocess_runs["sigint"]
    assert r["raised"] == "KeyboardInterrupt"
    assert r["step"] == 60 and r["equal_to_one_epoch"], r  # 480 rows / 8 = 60 steps an epoch
    (w,) = r["warnings"]
    assert "the model holds the weights, optimizer slots and step of step 60" in w, w
    assert "fit interrupted by KeyboardInterrupt in epoch 2 of 3" in w, w
    # the running job was cancelled, not waited for (an epoch is one job here)
    assert r["interrupted_after"] < 1.0 + 0.75 * r["epoch_seconds"], r


@pytest.mark.slow
def test_a_sparkcontext_gone_leaves_the_model_at_its_last_copy_and_says_so(subprocess_runs):
    r = subprocess_runs["gone"]
    assert r["raised"] == "KeyboardInterrupt"
    assert r["step"] == 4, r  # ModelCheckpoint's copy at the end of epoch 1
    (w,) = r["warnings"]
    assert "could not be read back from the executors" in w, w
    assert "the model holds the weights, optimizer slots and step of step 4 (its last copy " \
           "from the executors)" in w, w

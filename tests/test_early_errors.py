"""Mistakes a fit can see coming fail early and say what is wrong (issue 15, item 6).

- a ``checkpoint_dir`` that cannot hold checkpoints fails before any Spark job (not after the
  first epoch, as a raw ``NotADirectoryError`` from a task), naming the argument and the path;
- ``validation_data`` of another feature width is named as ``validation_data``, with the
  expected and the found shapes;
- a bad value found inside a Spark task reaches the console as the one clear Python error,
  without Spark's per-task JVM stack traces (``spark.rddtensor.quietTaskFailures=false`` brings
  them back; Spark's logging of the user's own jobs is left as it was);
- ``resume=True`` with changed optimizer settings warns, naming each old and new value.
"""
from __future__ import annotations

import os
import textwrap
import warnings

import numpy as np
import pytest
import scenarios

from rddtensor import layers as L
from rddtensor.training.callbacks import LearningRateScheduler
from rddtensor.optim import Adam

_rng = np.random.default_rng(8)
X = _rng.normal(size=(16, 5)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int64)
FIT = dict(batch_size=4, seed=1, verbose=0)


def model(lr=0.05):
    m = L.Sequential([L.Dense(4, activation="relu", input_shape=(5,)), L.Dense(2)], seed=0)
    m.compile(optimizer=Adam(lr), loss="sparse_categorical_crossentropy")
    return m


def training_data(engine, sc=None):
    """``fit``'s positional arguments for ``engine``: numpy arrays, or an RDD of pairs."""
    if engine == "numpy":
        return (X, Y)
    return (sc.parallelize(list(zip(X, Y)), 2),)


def jobs_so_far(sc) -> int:
    return len(sc.statusTracker().getJobIdsForGroup())


# --- checkpoint_dir -----------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["numpy", pytest.param("rdd", marks=pytest.mark.spark)])
def test_a_checkpoint_dir_that_is_a_file_fails_before_any_job(engine, tmp_path, request):
    sc = request.getfixturevalue("sc") if engine == "rdd" else None
    path = tmp_path / "ckpt"
    path.write_text("a file, not a directory")
    m = model()
    before = jobs_so_far(sc) if sc else None
    with pytest.raises(ValueError, match=r"checkpoint_dir='.*ckpt' is a file, not a directory "
                                         r"\(.*\); pass a directory") as e:
        m.fit(*training_data(engine, sc), epochs=2, checkpoint_dir=str(path), **FIT)
    assert e.value.__cause__ is None and "Py4J" not in str(e.value)
    assert m.step == 0
    if sc:
        assert jobs_so_far(sc) == before, "a Spark job ran before the bad path was noticed"


def test_a_checkpoint_dir_under_a_file_names_the_file(tmp_path):
    blocker = tmp_path / "data.csv"
    blocker.write_text("x")
    m = model()
    with pytest.raises(ValueError, match=r"checkpoint_dir='.*data\.csv/ckpt': .*data\.csv is a "
                                         r"file, not a directory; pass a directory"):
        m.fit(X, Y, epochs=1, checkpoint_dir=str(blocker / "ckpt"), **FIT)
    assert m.step == 0


# --- validation_data of another width -----------------------------------------------------------
@pytest.mark.spark
def test_validation_rdd_of_another_width_is_named(sc):
    val = sc.parallelize([(x[:4], y) for x, y in zip(X, Y)], 2)
    m = model()
    with pytest.raises(ValueError, match=r"^validation_data: row 0 of partition \d has features "
                                         r"of shape \(4,\), expected \(5,\) \(the model's input "
                                         r"shape") as e:
        m.fit(*training_data("rdd", sc), epochs=1, validation_data=val, **FIT)
    assert "Py4J" not in str(e.value) and "org.apache" not in str(e.value)
    assert m.step == 0


@pytest.mark.spark
def test_validation_dataframe_of_another_width_is_named(spark, sc):
    val = spark.createDataFrame([(x[:4].tolist(), float(y)) for x, y in zip(X, Y)],
                                "features array<double>, label double")
    with pytest.raises(ValueError, match=r"^validation_data: row 0 of partition \d has features "
                                         r"\(column 'features'\) of shape \(4,\), expected "
                                         r"\(5,\) \(the model's input shape") as e:
        model().fit(*training_data("rdd", sc), epochs=1, validation_data=val, **FIT)
    assert "Py4J" not in str(e.value) and "org.apache" not in str(e.value)


# --- a bad value inside a task: one clear error on the console ----------------------------------
# A session of its own, whose console (stderr) is the test's to read: a subprocess scenario
# (tests/scenarios.py), sharing one Python and JVM start-up with the other scenarios. Its
# console lines are split into sections at "=== name" lines; what the driver prints goes to
# ``printed`` (emitted as the result).
_NOISY_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from rddtensor import layers as L
    from rddtensor.spark.session import get_spark

    printed = []
    spark = get_spark("local[2]")
    sc = spark.sparkContext
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 5)).astype(np.float32)
    rows = [(x.tolist(), int(x[0] > 0)) for x in X]
    rows[7] = ([1.0, float("nan"), 0.0, 0.0, 0.0], 1)  # found by the task stacking partition 1

    def fit():
        m = L.Sequential([L.Dense(4, input_shape=(5,)), L.Dense(2)], seed=0)
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        try:
            m.fit(sc.parallelize(rows, 2), epochs=1, batch_size=4, verbose=0)
        except Exception as e:
            printed.append(f"{type(e).__name__}: {e}")

    def section(name):
        sys.stderr.flush()
        print("=== " + name, file=sys.stderr, flush=True)

    section("quiet fit")
    fit()
    section("a job of the user's own")
    try:
        sc.parallelize([0], 1).map(lambda x: 1 / x).collect()
    except Exception:
        printed.append("the user's job failed")
    section("fit with spark.rddtensor.quietTaskFailures=false")
    spark.conf.set("spark.rddtensor.quietTaskFailures", "false")
    fit()
    section("end")
    spark.conf.unset("spark.rddtensor.quietTaskFailures")
    spark.stop()
    emit(printed)
""")
scenarios.register("noisy_task_error", _NOISY_SCRIPT)


@pytest.fixture(scope="module")
def noisy_run(scenario_results):
    printed, log = scenario_results("noisy_task_error")
    sections, name = {}, None
    for line in log.splitlines():
        if line.startswith("=== "):
            name = line[4:]
            sections[name] = []
        elif name is not None:
            sections[name].append(line)
    return printed, sections


@pytest.mark.spark
@pytest.mark.scenario("noisy_task_error")
def test_a_bad_value_in_a_task_prints_one_clear_error(noisy_run):
    out, err = noisy_run
    assert out[0] == "ValueError: features contain NaN or inf (row 1 of partition 1)"
    lines = err["quiet fit"]
    assert not [x for x in lines if "org.apache.spark" in x or "Lost task" in x
                or "Exception in task" in x], "\n".join(lines)
    # (what may remain: PySpark's daemon reporting the killed sibling task's broken pipe)
    assert len(lines) < 10, "\n".join(lines)

    # Spark still logs the failures of the user's own jobs, and the engine's on request
    assert out[1:] == ["the user's job failed",
                       "ValueError: features contain NaN or inf (row 1 of partition 1)"]
    assert any("Exception in task" in x for x in err["a job of the user's own"])
    noisy = err["fit with spark.rddtensor.quietTaskFailures=false"]
    assert any("Lost task" in x for x in noisy) and any("at org.apache.spark" in x for x in noisy)


# --- resume with other optimizer settings -------------------------------------------------------
@pytest.mark.parametrize("engine", ["numpy", pytest.param("rdd", marks=pytest.mark.spark)])
def test_resume_with_a_changed_learning_rate_warns(engine, tmp_path, request):
    sc = request.getfixturevalue("sc") if engine == "rdd" else None
    data = training_data(engine, sc)
    d = tmp_path / "runs" / "ckpt"  # (created by the fit)
    # a learning-rate schedule changes the optimizer during a fit; a resumed fit that starts
    # with the settings the first one started with has nothing to warn about
    halve = LearningRateScheduler(lambda epoch, lr: lr / 2)
    model(0.05).fit(*data, epochs=1, checkpoint_dir=str(d), callbacks=[halve], **FIT)
    assert sorted(os.listdir(d)) == ["step-000000004"]  # (the write probe left nothing behind)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(0.05).fit(*data, epochs=2, checkpoint_dir=str(d), resume=True, callbacks=[halve],
                        **FIT)
    assert not [w for w in seen if "optimizer settings" in str(w.message)]

    m = model(0.01)
    with pytest.warns(UserWarning, match=r"resume=True from .*step-000000008: this fit changes "
                                         r"the optimizer settings the checkpoint's fit started "
                                         r"with: lr 0\.05 -> 0\.01"):
        m.fit(*data, epochs=3, checkpoint_dir=str(d), resume=True, **FIT)
    assert m.step == 12 and m.optimizer.lr == 0.01

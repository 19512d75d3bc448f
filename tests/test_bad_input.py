"""Bad input gets a clear Python error that names the column, row, layer or argument and says
what to do — never a JVM stack trace as the first thing a user reads.

One test per kind of bad input, for numpy (in-process ``fit``), RDD and DataFrame input where
the input kind matters. Model files (missing, corrupt, incompatible, tampered) are in
``test_model_files.py``; resume mismatches in ``test_checkpoint.py``.
"""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from rddtensor import layers as L

_rng = np.random.default_rng(5)
X = _rng.normal(size=(12, 5)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int64)


def model():
    m = L.Sequential([L.Dense(4, activation="relu", input_shape=(5,)), L.Dense(2)], seed=0)
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return m


def assert_clean(excinfo, kind=ValueError):
    """The error is the Python type a user can catch, with no JVM text and no chained cause."""
    e = excinfo.value
    assert type(e) is kind, type(e)
    text = str(e)
    assert "Py4J" not in text and "org.apache" not in text and "Traceback" not in text, text
    assert e.__cause__ is None


def fit_numpy(x, y, **kw):
    return model().fit(x, y, **{"batch_size": 4, "verbose": 0, **kw})


def fit_spark(data, **kw):
    return model().fit(data, **{"batch_size": 4, "verbose": 0, **kw})


def df_of(spark, rows, schema="features array<double>, label double"):
    return spark.createDataFrame(rows, schema)


def rows(x=X, y=Y):
    return [(a.tolist(), float(b)) for a, b in zip(x, y)]


# --- NaN / inf ----------------------------------------------------------------------------------
def test_nan_features_numpy():
    x = X.copy()
    x[7, 2] = np.inf
    with pytest.raises(ValueError, match=r"x contains NaN or inf \(first at row 7\)") as e:
        fit_numpy(x, Y)
    assert_clean(e)


def test_nan_labels_numpy():
    m = L.Sequential([L.Dense(1, input_shape=(5,))], seed=0)
    m.compile(optimizer="sgd", loss="mse")
    y = Y.astype(np.float32)
    y[3] = np.nan
    with pytest.raises(ValueError, match=r"y contains NaN or inf \(first at row 3\)") as e:
        m.fit(X, y, batch_size=4, verbose=0)
    assert_clean(e)


@pytest.mark.spark
def test_nan_features_dataframe_names_the_column(spark):
    r = rows()
    r[8] = (r[8][0][:2] + [float("nan")] + r[8][0][3:], r[8][1])
    df = spark.createDataFrame(r, "x array<double>, label double").coalesce(1)
    with pytest.raises(ValueError, match=r"features \(column 'x'\) contain NaN or inf "
                                         r"\(row 8 of partition 0\)") as e:
        fit_spark(df, features_col="x")
    assert_clean(e)


@pytest.mark.spark
def test_nan_labels_dataframe_names_the_column(spark):
    r = rows()
    r[5] = (r[5][0], float("inf"))
    m = L.Sequential([L.Dense(1, input_shape=(5,))], seed=0)
    m.compile(optimizer="sgd", loss="mse")
    df = spark.createDataFrame(r, "features array<double>, y double").coalesce(1)
    with pytest.raises(ValueError, match=r"labels \(column 'y'\) contain NaN or inf "
                                         r"\(row 5 of partition 0\)") as e:
        m.fit(df, label_col="y", batch_size=4, verbose=0)
    assert_clean(e)


# --- rows of different feature length -----------------------------------------------------------
def test_ragged_rows_numpy():
    x = [list(r) for r in X]
    x[4] = x[4][:3]
    with pytest.raises(ValueError, match=r"x must be a numeric array of shape \(rows, "
                                         r"features\.\.\.\), every row the same length") as e:
        fit_numpy(x, Y)
    assert_clean(e)


@pytest.mark.spark
def test_ragged_rows_dataframe_name_row_partition_and_column(spark):
    r = rows()
    r[9] = (r[9][0][:4], r[9][1])
    df = df_of(spark, r).coalesce(1)
    with pytest.raises(ValueError, match=r"row 9 of partition 0 has features \(column "
                                         r"'features'\) of shape \(4,\), expected \(5,\)") as e:
        fit_spark(df)
    assert_clean(e)


# --- wrong column / value types -----------------------------------------------------------------
@pytest.mark.spark
def test_string_features_column(spark):
    df = spark.createDataFrame([("1,2,3,4,5", 0.0)] * 4, "features string, label double")
    with pytest.raises(ValueError, match=r"features_col='features': column 'features' has type "
                                         r"string; features must be a vector") as e:
        fit_spark(df)
    assert_clean(e)


@pytest.mark.spark
def test_string_label_column_suggests_string_indexer(spark):
    df = spark.createDataFrame([(x.tolist(), "cat") for x in X], "features array<double>, "
                                                                 "label string")
    with pytest.raises(ValueError, match=r"label_col='label': column 'label' has type string; "
                                         r"labels must be numeric .*StringIndexer") as e:
        fit_spark(df)
    assert_clean(e)


@pytest.mark.spark
def test_non_numeric_feature_values_in_an_rdd(sc):
    r = [(x, y) for x, y in zip(X, Y)]
    r[2] = (["a", "b", "c", "d", "e"], 1)
    with pytest.raises(ValueError, match=r"row 2 of partition 0: features must be numbers .*"
                                         r"got list \['a', 'b'") as e:
        fit_spark(sc.parallelize(r, 1))
    assert_clean(e)


def test_non_numeric_features_numpy():
    with pytest.raises(ValueError, match=r"x must be a numeric array .*could not convert "
                                         r"string to float: 'a'") as e:
        fit_numpy([["a"] * 5] * 12, Y)
    assert_clean(e)


# --- labels outside the model's classes ---------------------------------------------------------
def test_labels_outside_the_classes_numpy():
    y = Y.copy()
    y[6] = 3
    with pytest.raises(ValueError, match=r"labels in y must be integers in \[0, 2\): class ids "
                                         r"for the 2 outputs of the last layer \(Dense layer\); "
                                         r"got values from 0 to 3 \(first bad one at row 6\)\. "
                                         r"Re-index the labels, or give the last layer 4 "
                                         r"outputs") as e:
        fit_numpy(X, y)
    assert_clean(e)


def test_fractional_labels_numpy():
    with pytest.raises(ValueError, match=r"got values from 0 to 0\.5, not all integers \(first "
                                         r"bad one at row \d+\)\. Re-index the labels to 0, 1") as e:
        fit_numpy(X, np.where(Y == 1, 0.5, 0.0))
    assert_clean(e)


@pytest.mark.spark
def test_labels_outside_the_classes_dataframe(spark):
    df = df_of(spark, rows(y=Y * 5))
    with pytest.raises(ValueError, match=r"labels \(column 'label'\) must be integers in "
                                         r"\[0, 2\).*got values from 0 to 5") as e:
        fit_spark(df)
    assert_clean(e)


@pytest.mark.spark
def test_labels_outside_the_classes_in_validation_data(sc):
    train = sc.parallelize(list(zip(X, Y)), 2)
    val = sc.parallelize(list(zip(X, Y - 1)), 2)
    with pytest.raises(ValueError, match=r"labels of validation_data must be integers in "
                                         r"\[0, 2\).*from -1 to 0") as e:
        fit_spark(train, validation_data=val)
    assert_clean(e)


# --- empty data ---------------------------------------------------------------------------------
def test_empty_numpy():
    with pytest.raises(ValueError, match=r"x is empty: no rows to train or evaluate on") as e:
        fit_numpy(np.zeros((0, 5), np.float32), np.zeros(0))
    assert_clean(e)


@pytest.mark.spark
def test_empty_rdd_and_dataframe(sc, spark):
    with pytest.raises(ValueError, match=r"the training data RDD is empty: no rows") as e:
        fit_spark(sc.parallelize([], 2))
    assert_clean(e)
    with pytest.raises(ValueError, match=r"the training data is empty: no rows") as e:
        fit_spark(df_of(spark, []))
    assert_clean(e)


# --- batch size ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [0, -3, 2.5, True])
def test_batch_size_not_a_positive_integer(bs):
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, got "
                                         rf"{bs!r}") as e:
        fit_numpy(X, Y, batch_size=bs)
    assert_clean(e)


def test_batch_size_larger_than_the_data_numpy():
    with pytest.raises(ValueError, match=r"batch_size=13 is larger than the 12 training rows; "
                                         r"use batch_size <= 12 \(full batch\)") as e:
        fit_numpy(X, Y, batch_size=13)
    assert_clean(e)


@pytest.mark.spark
def test_batch_size_larger_than_the_data_distributed(spark):
    with pytest.raises(ValueError, match=r"batch_size=100 is larger than the 12 training rows") \
            as e:
        fit_spark(df_of(spark, rows()), batch_size=100)
    assert_clean(e)


# --- input width --------------------------------------------------------------------------------
def test_input_width_not_matching_the_first_layer_numpy():
    with pytest.raises(ValueError, match=r"x has per-row shape \(4,\) but the first layer "
                                         r"\(Dense layer\) expects \(5,\)") as e:
        fit_numpy(X[:, :4], Y)
    assert_clean(e)


@pytest.mark.spark
def test_input_width_not_matching_the_first_layer_dataframe(spark):
    with pytest.raises(ValueError, match=r"the features \(column 'features'\) has per-row shape "
                                         r"\(4,\) but the first layer \(Dense layer\) expects "
                                         r"\(5,\)") as e:
        fit_spark(df_of(spark, rows(x=X[:, :4])))
    assert_clean(e)


# --- Java ---------------------------------------------------------------------------------------
def _fake_java(tmp_path, version_line):
    home = tmp_path / "jdk"
    (home / "bin").mkdir(parents=True)
    exe = home / "bin" / "java"
    exe.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(home)


@pytest.mark.parametrize("line, version", [('openjdk version "11.0.22" 2024-01-16', 11),
                                           ('java version "1.8.0_402"', 8)])
def test_java_too_old(tmp_path, monkeypatch, line, version):
    from rddtensor.spark.session import check_java, get_spark
    monkeypatch.setenv("JAVA_HOME", _fake_java(tmp_path, line))
    with pytest.raises(RuntimeError, match=rf"Java {version} is too old: Spark needs Java 17 or "
                                           r"newer .*JAVA_HOME") as e:
        check_java()
    assert_clean(e, RuntimeError)
    # a new session checks before it starts a JVM
    with pytest.raises(RuntimeError, match=rf"Java {version} is too old"):
        get_spark("local[1]")


def test_java_missing(tmp_path, monkeypatch):
    from rddtensor.spark.session import check_java
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    with pytest.raises(RuntimeError, match=r"Java was not found: Spark needs Java 17 or newer\. "
                                           r"Install it .*or set JAVA_HOME") as e:
        check_java()
    assert_clean(e, RuntimeError)
    monkeypatch.delenv("JAVA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH either
    with pytest.raises(RuntimeError, match=r"Java was not found"):
        check_java()


def test_java_17_passes(tmp_path, monkeypatch):
    from rddtensor.spark.session import check_java
    monkeypatch.setenv("JAVA_HOME", _fake_java(tmp_path, 'openjdk version "17.0.15" 2025-04-15'))
    assert check_java() == 17
    assert os.environ["JAVA_HOME"].endswith("jdk")

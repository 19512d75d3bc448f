"""What a Keras user types in the first hour works as in Keras, in both engines:
``validation_split``, ``verbose=2`` (one line per epoch on stderr) and the progress bar's ETA,
``epochs=0``, ``initial_epoch``, ``set_weights(state_dict)``, ``summary()``, and one wording for
a wrong ``fit`` argument."""
from __future__ import annotations

import re

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.optim import SGD, Adam


def _data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    return X, (X[:, 0] - X[:, 1] > 0).astype(np.int64)


def _model():
    m = L.Sequential([L.Dense(8, activation="relu", input_shape=(4,)), L.Dropout(0.1),
                      L.Dense(2)], seed=0)
    m.compile(optimizer=Adam(0.01), loss="sparse_categorical_crossentropy",
              metrics=["accuracy"])
    return m


def _same_weights(a, b):
    for u, v in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(u, v)


# --- validation_split -----------------------------------------------------------------------------
def test_validation_split_holds_out_the_last_rows():
    X, y = _data()
    split = _model()
    h = split.fit(X, y, epochs=2, batch_size=32, validation_split=0.25, verbose=0)
    assert set(h.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert h.params["samples"] == 150
    explicit = _model()
    h2 = explicit.fit(X[:150], y[:150], epochs=2, batch_size=32,
                      validation_data=(X[150:], y[150:]), verbose=0)
    assert h.history == h2.history
    _same_weights(split, explicit)


def test_validation_split_and_validation_data_together_are_refused():
    X, y = _data()
    with pytest.raises(ValueError, match="validation_data or validation_split, not both"):
        _model().fit(X, y, validation_split=0.2, validation_data=(X, y), verbose=0)


@pytest.mark.spark
def test_validation_split_on_an_rdd_is_a_seeded_random_split(sc):
    X, y = _data()
    rdd = sc.parallelize(list(zip(X, y)), 2)
    runs = [_model().fit(rdd, epochs=2, batch_size=32, validation_split=0.25, seed=5,
                         verbose=0) for _ in range(2)]
    assert "val_loss" in runs[0].history and "val_accuracy" in runs[0].history
    assert runs[0].history == runs[1].history  # deterministic for the same data and seed
    train, val = rdd.randomSplit([0.75, 0.25], seed=5)
    assert runs[0].params["samples"] == train.count()
    explicit = _model().fit(train, epochs=2, batch_size=32, validation_data=val, seed=5,
                            verbose=0)
    assert explicit.history == runs[0].history


# --- verbose --------------------------------------------------------------------------------------
def _epoch_lines(text):
    return [ln for ln in text.splitlines() if re.match(r"epoch \d+/\d+ - ", ln)]


def test_verbose_2_prints_one_line_per_epoch_on_stderr(capsys):
    X, y = _data()
    _model().fit(X, y, epochs=3, batch_size=32, validation_split=0.2, verbose=2)
    out, err = capsys.readouterr()
    lines = _epoch_lines(err)
    assert len(lines) == 3 and not _epoch_lines(out)
    assert lines[0].startswith("epoch 1/3 - loss: ") and lines[2].startswith("epoch 3/3 - ")
    for part in ("accuracy: ", "val_loss: ", "val_accuracy: ", "samples/s"):
        assert part in lines[1]
    assert re.search(r" - \d+\.\d\ds - ", lines[1])  # the epoch's time


@pytest.mark.spark
def test_verbose_2_distributed(sc, capsys):
    X, y = _data()
    _model().fit(sc.parallelize(list(zip(X, y)), 2), epochs=2, batch_size=32, verbose=2)
    lines = _epoch_lines(capsys.readouterr().err)
    assert [ln[:12] for ln in lines] == ["epoch 1/2 - ", "epoch 2/2 - "]
    assert "accuracy: " in lines[1] and "samples/s" in lines[1]


def test_verbose_1_bar_shows_elapsed_and_eta(capsys):
    X, y = _data()
    _model().fit(X, y, epochs=1, batch_size=32, verbose=1)
    err = capsys.readouterr().err
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d\]", err), err  # [elapsed<remaining]


def test_verbose_is_checked():
    X, y = _data()
    with pytest.raises(ValueError, match="verbose must be 0"):
        _model().fit(X, y, verbose=True)


# --- epochs=0, initial_epoch ----------------------------------------------------------------------
def test_epochs_0_trains_nothing():
    X, y = _data()
    m = _model().build()
    before = m.get_weights()
    h = m.fit(X, y, epochs=0, verbose=0)
    assert h.history == {} and h.epoch == [] and m.step == 0
    for a, b in zip(m.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_initial_epoch_continues_a_fit_bit_for_bit():
    X, y = _data()
    whole = _model()
    h_whole = whole.fit(X, y, epochs=5, batch_size=32, verbose=0)
    parts = _model()
    parts.fit(X, y, epochs=3, batch_size=32, verbose=0)
    h = parts.fit(X, y, epochs=5, batch_size=32, initial_epoch=3, verbose=0)
    assert h.epoch == [3, 4]
    assert h.history["loss"] == h_whole.history["loss"][3:]
    _same_weights(parts, whole)
    assert parts.fit(X, y, epochs=5, initial_epoch=5, verbose=0).epoch == []


@pytest.mark.spark
def test_initial_epoch_distributed(sc):
    X, y = _data()
    rdd = sc.parallelize(list(zip(X, y)), 2)
    whole = _model()
    whole.fit(rdd, epochs=3, batch_size=32, verbose=0)
    parts = _model()
    parts.fit(rdd, epochs=2, batch_size=32, verbose=0)
    h = parts.fit(rdd, epochs=3, batch_size=32, initial_epoch=2, verbose=0)
    assert h.epoch == [2]
    _same_weights(parts, whole)


# --- one refusal for both engines -----------------------------------------------------------------
@pytest.mark.spark
def test_unknown_fit_argument_is_refused_the_same_way_by_both_engines(sc):
    X, y = _data()
    with pytest.raises(TypeError) as local:
        _model().fit(X, y, epoch=2)
    with pytest.raises(TypeError) as distributed:
        _model().fit(sc.parallelize(list(zip(X, y)), 2), epoch=2)
    assert str(local.value) == str(distributed.value)
    assert "unexpected keyword argument(s) ['epoch']" in str(local.value)
    with pytest.raises(TypeError, match="apply to the distributed engine only"):
        _model().fit(X, y, num_partitions=2)


# --- set_weights from a PyTorch state_dict, summary -----------------------------------------------
def test_set_weights_takes_a_pytorch_state_dict():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 2))
    with torch.no_grad():  # non-trivial running statistics
        net.train()(torch.randn(64, 4) * 3 + 1)
    m = L.Sequential([L.Dense(8, input_shape=(4,)), L.BatchNorm(), L.ReLU(), L.Dense(2)])
    m.set_weights(net.state_dict())  # num_batches_tracked is skipped
    X = np.random.default_rng(1).normal(size=(16, 4)).astype(np.float32)
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(m.predict(X), ref, rtol=1e-5, atol=1e-6)

    wrong = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 3))
    before = m.get_weights()
    with pytest.raises(ValueError, match=r"weight '3\.W' must have shape \(2, 8\), got \(3, 8\) "
                                         r"from state_dict entry '3\.weight'"):
        m.set_weights(wrong.state_dict())
    for a, b in zip(m.get_weights(), before):  # nothing changed
        np.testing.assert_array_equal(a, b)


def test_summary_prints_once_and_returns_none(capsys):
    m = _model()
    assert m.summary() is None
    out = capsys.readouterr().out
    assert out.count("total parameters: 58") == 1

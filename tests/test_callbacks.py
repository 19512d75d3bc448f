"""Training feedback: callbacks (in-process and distributed), the progress bar, History.plot."""
import csv
import os

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.training.callbacks import (Callback, CSVLogger, EarlyStopping, LambdaCallback,
                              LearningRateScheduler, ModelCheckpoint)
from rddtensor.optim import SGD, Adam


def _data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)).astype("float32")
    y = (X[:, 0] - X[:, 1] > 0).astype("int64")
    return X, y


def _model(opt=None):
    m = L.Sequential([L.Dense(8, activation="relu", input_shape=(4,)), L.Dense(2)], seed=0)
    m.compile(optimizer=opt or SGD(0.1), loss="sparse_categorical_crossentropy",
              metrics=["accuracy"])
    return m


class Thetas(Callback):
    """Records a copy of the (synced) weights after every epoch."""

    def on_train_begin(self, logs=None):
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.sync_weights()
        self.seen.append(self.model.theta.copy())


# --- hooks and stop_training ------------------------------------------------------------------
def test_hooks_run_in_keras_order_and_plain_functions_still_work():
    X, y = _data()
    calls = []
    cb = LambdaCallback(on_train_begin=lambda logs: calls.append("train_begin"),
                        on_epoch_begin=lambda e, logs: calls.append(f"begin{e}"),
                        on_epoch_end=lambda e, logs: calls.append(f"end{e}"),
                        on_train_end=lambda logs: calls.append("train_end"))
    plain = []
    _model().fit(X, y, epochs=2, batch_size=32, verbose=0,
                 callbacks=[cb, lambda e, logs: plain.append((e, sorted(logs)))])
    assert calls == ["train_begin", "begin0", "end0", "begin1", "end1", "train_end"]
    assert plain == [(0, ["accuracy", "loss"]), (1, ["accuracy", "loss"])]


def test_stop_training_ends_after_the_epoch():
    class StopAt(Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True
    X, y = _data()
    h = _model().fit(X, y, epochs=10, batch_size=32, verbose=0, callbacks=[StopAt()])
    assert h.epoch == [0, 1]


def test_a_callback_that_is_not_callable_is_named():
    X, y = _data()
    with pytest.raises(TypeError, match=r"callbacks\[0\] must be"):
        _model().fit(X, y, epochs=1, verbose=0, callbacks=[42])


# --- EarlyStopping ----------------------------------------------------------------------------
def test_early_stopping_stops_after_patience_and_restores_best_weights():
    X, y = _data()
    m = _model()
    thetas = Thetas()
    # mode="max" on a falling loss: epoch 0 stays the best, so training stops after `patience`
    es = EarlyStopping(monitor="loss", mode="max", patience=2, restore_best_weights=True)
    h = m.fit(X, y, epochs=20, batch_size=32, verbose=0, callbacks=[thetas, es])
    assert h.epoch == [0, 1, 2] and es.stopped_epoch == 2 and es.best_epoch == 0
    np.testing.assert_array_equal(m.theta, thetas.seen[0])
    assert not np.array_equal(thetas.seen[2], thetas.seen[0])


def test_early_stopping_min_delta_and_patience_zero():
    X, y = _data()
    h = _model().fit(X, y, epochs=20, batch_size=32, verbose=0,
                     callbacks=[EarlyStopping(monitor="loss", min_delta=10.0)])
    assert h.epoch == [0, 1]


def test_early_stopping_on_a_value_that_is_not_logged_says_what_to_do():
    X, y = _data()
    with pytest.raises(ValueError, match=r"'val_loss'.*validation_data"):
        _model().fit(X, y, epochs=2, verbose=0, callbacks=[EarlyStopping()])
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="up")


# --- ModelCheckpoint --------------------------------------------------------------------------
def test_model_checkpoint_saves_every_epoch_with_formatted_names(tmp_path):
    X, y = _data()
    m, thetas = _model(), Thetas()
    ck = ModelCheckpoint(str(tmp_path / "ck-{epoch:02d}-{loss:.3f}"), monitor="loss")
    m.fit(X, y, epochs=3, batch_size=32, verbose=0, callbacks=[thetas, ck])
    assert [os.path.basename(p)[:5] for p in ck.saved] == ["ck-01", "ck-02", "ck-03"]
    for path, theta in zip(ck.saved, thetas.seen):
        np.testing.assert_array_equal(L.load_model(path).theta, theta)


def test_model_checkpoint_best_only_keeps_the_best(tmp_path):
    X, y = _data()
    m, thetas = _model(), Thetas()
    losses = []
    ck = ModelCheckpoint(str(tmp_path / "best"), monitor="val_loss", save_best_only=True)
    h = m.fit(X, y, epochs=4, batch_size=32, verbose=0, validation_data=(X[:40], y[:40]),
              callbacks=[thetas, ck, lambda e, logs: losses.append(logs["val_loss"])])
    best = int(np.argmin(losses))
    improvements = sum(l < min(losses[:i], default=np.inf) for i, l in enumerate(losses))
    assert len(ck.saved) == improvements and h.epoch == [0, 1, 2, 3]
    np.testing.assert_array_equal(L.load_model(str(tmp_path / "best")).theta, thetas.seen[best])


def test_model_checkpoint_bad_format_field_is_named(tmp_path):
    X, y = _data()
    with pytest.raises(ValueError, match="cannot be filled"):
        _model().fit(X, y, epochs=1, verbose=0,
                     callbacks=[ModelCheckpoint(str(tmp_path / "{val_acc}"))])


# --- LearningRateScheduler and CSVLogger ------------------------------------------------------
def test_learning_rate_scheduler_sets_lr_per_epoch_and_logs_it():
    X, y = _data()
    m, thetas = _model(SGD(0.1)), Thetas()
    sched = LearningRateScheduler(lambda epoch: 0.1 if epoch == 0 else 0.0)
    h = m.fit(X, y, epochs=3, batch_size=32, verbose=0, callbacks=[sched, thetas])
    assert h.history["lr"] == [0.1, 0.0, 0.0] and m.optimizer.lr == 0.0
    np.testing.assert_array_equal(thetas.seen[0], thetas.seen[2])  # lr 0: nothing moves


def test_learning_rate_scheduler_two_argument_form_and_bad_values():
    X, y = _data()
    m = _model(Adam(0.01))
    h = m.fit(X, y, epochs=3, batch_size=32, verbose=0,
              callbacks=[LearningRateScheduler(lambda epoch, lr: lr * 0.5)])
    np.testing.assert_allclose(h.history["lr"], [0.005, 0.0025, 0.00125])
    with pytest.raises(ValueError, match="finite number"):
        _model().fit(X, y, epochs=1, verbose=0,
                     callbacks=[LearningRateScheduler(lambda epoch: float("nan"))])


def test_csv_logger_writes_one_row_per_epoch(tmp_path):
    X, y = _data()
    path = str(tmp_path / "log.csv")
    _model().fit(X, y, epochs=3, batch_size=32, verbose=0, validation_data=(X, y),
                 callbacks=[CSVLogger(path)])
    _model().fit(X, y, epochs=1, batch_size=32, verbose=0, validation_data=(X, y),
                 callbacks=[CSVLogger(path, append=True)])
    rows = list(csv.DictReader(open(path)))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "0"]
    assert set(rows[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}
    assert float(rows[2]["loss"]) < float(rows[0]["loss"])


# --- distributed fits -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rdds(sc):
    X, y = _data(120)
    return X, y, sc.parallelize(list(zip(X, y)), 2)


def _fit_both(X, y, rdd, callbacks, allreduce, epochs=4):
    """The same fit in-process and distributed; returns both callback lists and models."""
    local_cbs, dist_cbs = callbacks("local"), callbacks("dist")
    m_local, m_dist = _model(), _model()
    m_local.fit(X, y, epochs=epochs, batch_size=40, verbose=0, shuffle=False, callbacks=local_cbs)
    h = m_dist.fit(rdd, epochs=epochs, batch_size=40, verbose=0, shuffle=False,
                   callbacks=dist_cbs, allreduce=allreduce, iterations_per_job=2)
    # weights at every epoch end (synced from the executors) equal the in-process ones
    thetas = [c for c in dist_cbs if isinstance(c, Thetas)][0].seen
    local_thetas = [c for c in local_cbs if isinstance(c, Thetas)][0].seen
    assert len(thetas) == len(local_thetas) == epochs
    for e, (a, b) in enumerate(zip(local_thetas, thetas)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=f"epoch {e}")
    return h, m_dist, thetas


@pytest.mark.spark
@pytest.mark.parametrize("allreduce", ["sharded", "replicated"])
def test_distributed_checkpoints_and_early_stopping_see_current_weights(rdds, tmp_path,
                                                                       allreduce):
    X, y, rdd = rdds

    def callbacks(tag):
        return [Thetas(), ModelCheckpoint(str(tmp_path / tag / "e{epoch}")),
                EarlyStopping(monitor="loss", mode="max", patience=3, restore_best_weights=True)]
    h, m, thetas = _fit_both(X, y, rdd, callbacks, allreduce)
    assert h.epoch == [0, 1, 2, 3]
    # checkpoints hold the weights of their epoch, with the step counter (3 steps per epoch)
    for e, theta in enumerate(thetas):
        saved = L.load_model(str(tmp_path / "dist" / f"e{e + 1}"))
        np.testing.assert_array_equal(saved.theta, theta)
        assert saved.step == 3 * (e + 1)
    # EarlyStopping's best is epoch 0 (mode max on a falling loss): restored after the fit
    np.testing.assert_array_equal(m.theta, thetas[0])


@pytest.mark.spark
@pytest.mark.parametrize("allreduce", ["sharded", "replicated"])
def test_distributed_learning_rate_scheduler_reaches_the_executors(rdds, allreduce):
    X, y, rdd = rdds

    def callbacks(tag):
        return [LearningRateScheduler(lambda epoch: [0.2, 0.05, 0.0][epoch]), Thetas()]
    h, m, thetas = _fit_both(X, y, rdd, callbacks, allreduce, epochs=3)
    assert h.history["lr"] == [0.2, 0.05, 0.0]
    np.testing.assert_array_equal(thetas[1], thetas[2])  # lr 0 in epoch 2: nothing moved


# --- progress bar and PNG ---------------------------------------------------------------------
def _final_bar_line(err: str) -> str:
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip()]
    return lines[-1]


def test_progress_bar_final_line_has_loss_metrics_and_samples_per_second(capsys):
    X, y = _data()
    _model().fit(X, y, epochs=2, batch_size=32, verbose=1, validation_data=(X, y))
    last = _final_bar_line(capsys.readouterr().err)
    assert "epoch 2/2" in last and "96/96" in last
    assert "loss=" in last and "val_loss=" in last and "accuracy=" in last
    assert "samples/s" in last


@pytest.mark.spark
def test_distributed_progress_bar_final_line(rdds, capsys):
    X, y, rdd = rdds
    _model().fit(rdd, epochs=2, batch_size=40, verbose=1)
    last = _final_bar_line(capsys.readouterr().err)
    assert "epoch 2/2" in last and "120/120" in last
    assert "loss=" in last and "samples/s" in last


def test_history_plot_writes_a_png_with_the_expected_curves(tmp_path):
    pytest.importorskip("matplotlib")
    Image = pytest.importorskip("PIL.Image")
    X, y = _data()
    h = _model().fit(X, y, epochs=3, batch_size=32, verbose=0, validation_data=(X, y))
    fig = h.figure()
    panels = {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in fig.axes}
    assert panels == {"loss": ["loss", "val_loss"], "accuracy": ["accuracy", "val_accuracy"]}
    np.testing.assert_allclose(fig.axes[0].get_lines()[1].get_ydata(), h.history["val_loss"])
    path = h.plot(str(tmp_path / "curves.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (900, 350)
        # not a blank canvas: the curves put many distinct colours on it
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20
    with pytest.raises(ValueError, match="nothing to plot"):
        h.figure(["val_auc"])

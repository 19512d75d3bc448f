"""Ctrl-C during an in-process fit: the model holds the weights, optimizer slots and step of the
last completed step (never a half-applied update), so training can go on from there."""
from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.training.loop import FitInterrupted
from rddtensor.optim import Adam


def _model():
    m = L.Sequential([L.Dense(64, activation="relu", input_shape=(16,)), L.Dense(64,
                      activation="relu"), L.Dense(3)], seed=0)
    m.compile(optimizer=Adam(1e-3), loss="sparse_categorical_crossentropy")
    return m


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signals reach the main thread only")
@pytest.mark.parametrize("delay", [0.2, 0.35, 0.5])
def test_ctrl_c_leaves_the_last_completed_step(delay):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(512, 16)).astype(np.float32)
    y = rng.integers(0, 3, 512)
    model = _model()
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.warns(FitInterrupted, match="the model holds the weights, optimizer slots and "
                                            "step of"), pytest.raises(KeyboardInterrupt):
        model.fit(X, y, epochs=100_000, batch_size=512, verbose=0)  # one step per epoch
    timer.join()
    t = model.step  # (0 if the interrupt came before the first step)
    reference = _model()
    reference.fit(X, y, epochs=t, batch_size=512, verbose=0)
    assert reference.step == t
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)
    for k in reference.slots:
        np.testing.assert_array_equal(model.slots[k], reference.slots[k])


def test_an_error_in_a_callback_keeps_the_progress_and_says_so():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(96, 16)).astype(np.float32)
    y = rng.integers(0, 3, 96)

    def stop_after_second_epoch(epoch, logs):
        if epoch == 1:
            raise KeyboardInterrupt

    model = _model()
    with pytest.warns(FitInterrupted, match=r"fit interrupted by KeyboardInterrupt in epoch 2 "
                                            r"of 5: .*step of step 6, the last completed step "
                                            r"\(the end of epoch 2\); fit\(\.\.\., "
                                            r"initial_epoch=2\) continues from there"):
        with pytest.raises(KeyboardInterrupt):
            model.fit(X, y, epochs=5, batch_size=32, verbose=0,
                      callbacks=[stop_after_second_epoch])
    assert model.step == 6
    reference = _model()
    reference.fit(X, y, epochs=2, batch_size=32, verbose=0)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)
    # and fit(initial_epoch=2) goes on to the weights of an uninterrupted fit
    model.fit(X, y, epochs=5, batch_size=32, initial_epoch=2, verbose=0)
    reference.fit(X, y, epochs=5, batch_size=32, initial_epoch=2, verbose=0)
    whole = _model()
    whole.fit(X, y, epochs=5, batch_size=32, verbose=0)
    for a, b, c in zip(model.get_weights(), reference.get_weights(), whole.get_weights()):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)

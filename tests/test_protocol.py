"""The model protocol (``rddtensor.training.protocol``): what engines, checkpoints and Spark ML use."""
from __future__ import annotations

import ast
import os
import pickle

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.training.protocol import Model, TensorSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mlp():
    m = L.Sequential([L.Dense(8, activation="relu", input_shape=(4,)), L.Dense(3)], seed=0)
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return m


def test_sequential_implements_the_protocol_with_named_specs():
    m = _mlp()
    assert isinstance(m, Model)
    assert m.input_specs == (TensorSpec("X", (4,)),)
    assert m.output_specs == (TensorSpec("y", None),)  # not built yet
    m.build()
    assert m.output_specs == (TensorSpec("y", (3,)),)
    assert m.count_params() == m.layout.size == 4 * 8 + 8 + 8 * 3 + 3


def test_an_incomplete_model_cannot_be_made():
    class Half(Model):
        def build(self, input_shape=None, seed=None):
            return self

    with pytest.raises(TypeError, match="abstract"):
        Half()


def test_task_copy_ships_no_weights_and_load_state_sets_everything():
    m = _mlp()
    X = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    m.fit(X, (X[:, 0] > 0).astype(int), epochs=1, batch_size=8, verbose=0)
    copy = m.task_copy(freeze_optimizer=True)
    assert copy.theta is None and copy.slots == {} and copy.optimizer is not m.optimizer
    assert len(pickle.dumps(copy)) < 20_000 and m.theta is not None  # the original keeps its state
    theta = np.arange(m.layout.size, dtype=np.float32)
    slots = {k: v + 1 for k, v in m.slots.items()}
    m.load_state(theta, slots, 7)
    assert m.step == 7 and np.array_equal(m.theta, theta)
    assert all(np.array_equal(m.slots[k], slots[k]) for k in slots)
    assert np.array_equal(np.concatenate([w.ravel() for w in m.get_weights()]), theta)


def test_nothing_outside_the_training_floor_touches_a_model_private_member():
    """Engines, Spark ML, the CLI and benchmarks use the protocol's public members only."""
    names = {"model", "m", "network", "net", "skeleton", "task_model", "_network"}
    offenders = []
    for tree in ("rddtensor", "benchmarks"):
        for folder, _, files in os.walk(os.path.join(ROOT, tree)):
            if os.path.join("rddtensor", "training") in folder:
                continue
            for f in (f for f in files if f.endswith(".py")):
                path = os.path.join(folder, f)
                for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                    if isinstance(node, ast.Attribute) and node.attr.startswith("_") and \
                            not node.attr.startswith("__"):
                        base = node.value
                        owner = base.id if isinstance(base, ast.Name) else \
                            base.attr if isinstance(base, ast.Attribute) else None
                        if owner in names:
                            offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} "
                                             f"{owner}.{node.attr}")
    assert offenders == []

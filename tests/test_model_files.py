"""Model files are data only: loading a missing, corrupt, incompatible or tampered model
directory is refused with an error that names the file (and the layer), and nothing in it can
execute code (``.npz`` read with ``allow_pickle=False``; the config names registered types only).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.optim import Adam

MARKER_NAME = "pwned"


class _Payload:
    """Unpickling this would create a marker file; the test checks it never appears."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def saved(tmp_path):
    m = L.Sequential([L.Dense(4, activation="relu", input_shape=(3,)), L.Dropout(0.1),
                      L.Dense(2)], seed=0)
    m.compile(optimizer=Adam(1e-2), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    X = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    m.fit(X, (X[:, 0] > 0).astype(int), epochs=1, batch_size=8, verbose=0)
    path = str(tmp_path / "model")
    m.save(path)
    assert sorted(os.listdir(path)) == ["model.json", "optimizer.npz", "weights.npz"]
    return path


def _edit_json(path, change):
    p = os.path.join(path, "model.json")
    meta = json.load(open(p))
    change(meta)
    json.dump(meta, open(p, "w"))
    return p


def test_round_trip_is_data_only(saved):
    m = L.load_model(saved)
    assert m.step == 2 and sorted(m.slots) == ["m", "v"]
    for f in ("weights.npz", "optimizer.npz"):
        with np.load(os.path.join(saved, f), allow_pickle=False) as z:
            assert all(z[k].dtype == np.float32 for k in z.files)


@pytest.mark.parametrize("npz", ["weights.npz", "optimizer.npz"])
def test_pickled_arrays_are_refused_and_never_run(saved, tmp_path, npz):
    marker = str(tmp_path / MARKER_NAME)
    path = os.path.join(saved, npz)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    first = sorted(arrays)[0]
    arrays[first] = np.array([_Payload(marker)], dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=rf"{npz}' holds non-numeric data.*refusing to load it"):
        L.load_model(saved)
    assert not os.path.exists(marker)


def test_string_arrays_are_refused(saved):
    path = os.path.join(saved, "weights.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["0.b"] = np.array(["__import__('os')"] * 4)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"weights\.npz': array '0\.b' has dtype <U\d+, "
                                         r"expected numbers"):
        L.load_model(saved)


def test_weights_of_the_wrong_shape_name_the_file_and_key(saved):
    path = os.path.join(saved, "weights.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["2.W"] = np.zeros((3, 4), np.float32)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"weights\.npz': weight '2\.W' must have shape "
                                         r"\(2, 4\), got \(3, 4\)"):
        L.load_model(saved)


TAMPERED = {
    # change to model.json -> message
    "unknown layer type": (lambda m: m["config"]["layers"][0].update(class_name="os.system"),
                           r"unknown layer type 'os\.system'; known types: \["),
    "unexpected layer setting": (
        lambda m: m["config"]["layers"][0]["config"].update(__class__="x"),
        r"model\.json': layer 0 \(Dense\) has an invalid config: .*__class__"),
    "bad layer setting": (lambda m: m["config"]["layers"][2]["config"].update(units="2; rm -rf"),
                          r"model\.json': layer 2 \(Dense\) has an invalid config: units must "
                          r"be a positive integer, got '2; rm -rf'"),
    "unknown activation": (
        lambda m: m["config"]["layers"][0]["config"].update(activation="__import__('os')"),
        r"layer 0 \(Dense\) has an invalid config: .*__import__"),
    "layer not a dict": (lambda m: m["config"]["layers"].__setitem__(1, ["Dropout"]),
                         r"layer 1 must be \{'class_name': str, 'config': dict\}"),
    "input shape": (lambda m: m.update(input_shape=["3"]),
                    r"input_shape must be a list of positive integers, got \['3'\]"),
    "layers that do not fit": (lambda m: m.update(input_shape=[7]),
                               r"the layers do not fit together: input_shape \(7,\) does not "
                               r"match the first layer's input_shape \(3,\)"),
    "unknown optimizer": (lambda m: m["compile"]["optimizer"].update(class_name="eval"),
                          r"invalid compile settings: unknown optimizer 'eval'"),
    "bad optimizer setting": (lambda m: m["compile"]["optimizer"]["config"].update(lr=-1),
                              r"invalid compile settings: invalid learning rate: -1"),
    "unknown loss": (lambda m: m["compile"]["loss"].update(name="exec"),
                     r"invalid compile settings: unknown loss 'exec'"),
    "unknown metric": (lambda m: m["compile"].update(metrics=["subprocess.call"]),
                       r"invalid compile settings: unknown metric"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_config_is_refused(saved, case):
    change, msg = TAMPERED[case]
    _edit_json(saved, change)
    with pytest.raises(ValueError, match=msg):
        L.load_model(saved)


def test_missing_directory_and_missing_files(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model directory at '.*nope'"):
        L.load_model(str(tmp_path / "nope"))
    os.remove(os.path.join(saved, "weights.npz"))
    with pytest.raises(FileNotFoundError, match=r"model directory '.*' has no weights\.npz"):
        L.load_model(saved)
    os.remove(os.path.join(saved, "model.json"))
    with pytest.raises(FileNotFoundError, match=r"model\.json is missing \(the save did not "
                                                r"finish, or this is not a model directory\)"):
        L.load_model(saved)


def test_corrupt_files(saved):
    w = os.path.join(saved, "weights.npz")
    data = open(w, "rb").read()
    open(w, "wb").write(data[: len(data) // 2])  # a truncated copy
    with pytest.raises(ValueError, match=r"corrupt weights file '.*weights\.npz'"):
        L.load_model(saved)
    open(os.path.join(saved, "model.json"), "w").write('{"format": "rddtensor.model", "conf')
    with pytest.raises(ValueError, match=r"corrupt model file '.*model\.json'"):
        L.load_model(saved)


def test_model_file_from_an_incompatible_version(saved):
    def newer(m):
        m.update(format_version=2, rddtensor_version="9.0.0")
    _edit_json(saved, newer)
    with pytest.raises(ValueError, match=r"model format version 2; this rddtensor \(0\.1\.0\) "
                                         r"reads version 1: re-save the model with rddtensor "
                                         r"9\.0\.0 or upgrade rddtensor"):
        L.load_model(saved)

"""Sequential: structure, the flat weight vector, summary, config, save/load and argument errors.

Training behaviour (fit / evaluate / predict results) is in test_training.py.
"""
import json
import os

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.optim import SGD, Adam, get_loss


def small_mlp(seed=0, dropout=False):
    layers = [L.Dense(8, activation="relu", input_shape=(4,))]
    if dropout:
        layers.append(L.Dropout(0.25))
    layers.append(L.Dense(3))
    return L.Sequential(layers, seed=seed)


def toy_data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1).astype(np.int64)
    return X, y


# --- structure ----------------------------------------------------------------------------------

def test_build_shapes_and_keys():
    m = small_mlp(dropout=True)
    assert not m.built
    m.build()
    assert m.built
    assert m.input_shape == (4,)
    assert m.output_shape == (3,)
    assert m.layout.keys == ["0.W", "0.b", "2.W", "2.b"]  # keys are positional; Dropout has none
    assert [w.shape for w in m.get_weights()] == [(8, 4), (8,), (3, 8), (3,)]  # PyTorch layouts


def test_count_params():
    assert small_mlp().count_params() == 8 * 4 + 8 + 3 * 8 + 3
    m = L.Sequential([L.Dense(8, activation="relu", input_shape=(4,)), L.Dense(2)])
    assert m.count_params() == 58
    m = L.Sequential([L.Dense(5, use_bias=False, input_shape=(7,))])
    assert m.count_params() == 35


def test_build_infers_input_shape_from_data():
    m = L.Sequential([L.Dense(3), L.Dense(1)], seed=0)
    assert m.predict(np.zeros((2, 6), np.float32)).shape == (2, 1)
    assert m.input_shape == (6,)
    assert m.count_params() == 6 * 3 + 3 + 3 + 1


def test_unbuildable_model_errors():
    with pytest.raises(ValueError, match="input_shape"):
        L.Sequential([L.Dense(3)]).build()
    with pytest.raises(ValueError, match="no layers"):
        L.Sequential([]).build()
    with pytest.raises(TypeError, match="expects a Layer"):
        L.Sequential([L.Dense(3), "relu"])
    m = small_mlp().build()
    with pytest.raises(ValueError, match="built"):
        m.add(L.Dense(2))


def test_same_seed_same_initial_weights():
    a, b, c = small_mlp(seed=1).build(), small_mlp(seed=1).build(), small_mlp(seed=2).build()
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a.theta, c.theta)


# --- the flat vector ----------------------------------------------------------------------------

def test_params_are_views_into_theta():
    m = small_mlp().build()
    assert m.theta.dtype == np.float32 and m.theta.shape == (m.count_params(),)
    for k, p in m.params.items():
        assert np.shares_memory(p, m.theta), k
    m.params["1.b"][...] = 42.0
    a, b = m.layout.offsets["1.b"]
    np.testing.assert_array_equal(m.theta[a:b], 42.0)
    m.theta[m.layout.offsets["0.W"][0]] = -7.0
    assert m.params["0.W"][0, 0] == -7.0
    # and the flat vector is laid out in layer order at fixed offsets
    flat = np.concatenate([w.ravel() for w in m.get_weights()])
    np.testing.assert_array_equal(flat, m.theta)


def test_params_stay_views_after_fit_and_set_weights():
    m = small_mlp()
    m.compile(optimizer=SGD(0.1), loss="sparse_categorical_crossentropy")
    X, y = toy_data()
    m.fit(X, y, epochs=1, batch_size=16, verbose=0)
    m.set_weights([np.ones_like(w) for w in m.get_weights()])
    for p in m.params.values():
        assert np.shares_memory(p, m.theta)
    np.testing.assert_array_equal(m.theta, 1.0)


# --- get_weights / set_weights ------------------------------------------------------------------

def test_get_set_weights_round_trip():
    a, b = small_mlp(seed=0).build(), small_mlp(seed=5).build()
    X, _ = toy_data()
    ws = a.get_weights()
    b.set_weights(ws)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    # get_weights returns copies: editing them does not touch the model
    ws[0][...] = 0
    assert not np.array_equal(a.params["0.W"], 0)
    # float64 input is accepted and stored as float32
    b.set_weights([w.astype(np.float64) * 2 for w in a.get_weights()])
    assert b.theta.dtype == np.float32
    np.testing.assert_array_equal(b.params["0.W"], a.params["0.W"] * 2)


def test_set_weights_wrong_count():
    m = small_mlp().build()
    with pytest.raises(ValueError, match=r"expects 4 arrays.*got 3"):
        m.set_weights(m.get_weights()[:3])


def test_set_weights_wrong_shape_names_key():
    m = small_mlp().build()
    ws = m.get_weights()
    ws[2] = ws[2].T
    with pytest.raises(ValueError, match=r"'1\.W'.*\(3, 8\).*\(8, 3\)"):
        m.set_weights(ws)


def test_failed_set_weights_leaves_model_unchanged():
    m = small_mlp().build()
    before = m.theta.copy()
    ws = [w + 1 for w in m.get_weights()]
    ws[2] = ws[2].T  # bad shape in the third array
    with pytest.raises(ValueError):
        m.set_weights(ws)
    np.testing.assert_array_equal(m.theta, before)


# --- summary / config ---------------------------------------------------------------------------

def test_summary_lists_layers_and_total():
    m = L.Sequential([L.Dense(64, activation="relu", input_shape=(64,)), L.Dropout(0.1),
                      L.Dense(10)])
    lines = []
    assert m.summary(print_fn=lines.append) is None    # Keras: prints, returns None
    [text] = lines
    assert "Dense" in text and "Dropout" in text
    assert "(None, 64)" in text and "(None, 10)" in text
    assert "4,160" in text and "650" in text           # per-layer counts
    assert "total parameters: 4,810" in text
    rows = [ln for ln in text.splitlines() if ln[:1].isdigit()]
    assert len(rows) == 3


def test_summary_prints(capsys):
    small_mlp().summary()
    assert "total parameters: 67" in capsys.readouterr().out


def test_config_round_trip():
    m = small_mlp(dropout=True).build()
    cfg = m.get_config()
    cfg = json.loads(json.dumps(cfg))  # plain JSON data
    assert [c["class_name"] for c in cfg["layers"]] == ["Dense", "Dropout", "Dense"]
    m2 = L.Sequential.from_config(cfg)
    m2.build()
    assert m2.layout.keys == m.layout.keys
    assert m2.layout.shapes == m.layout.shapes
    m2.set_weights(m.get_weights())
    X, _ = toy_data()
    np.testing.assert_array_equal(m2.predict(X), m.predict(X))
    assert m2.layers[1].rate == 0.25 and m2.layers[0].activation.activation == "relu"


def test_from_config_unknown_layer():
    with pytest.raises(ValueError, match="unknown layer type 'Bogus'"):
        L.Sequential.from_config({"layers": [{"class_name": "Bogus", "config": {}}]})


# --- save / load --------------------------------------------------------------------------------

def trained(seed=0, optimizer=None, dropout=True):
    m = small_mlp(seed=seed, dropout=dropout)
    m.compile(optimizer=optimizer or Adam(1e-2), loss="sparse_categorical_crossentropy",
              metrics=["accuracy"])
    X, y = toy_data()
    m.fit(X, y, epochs=2, batch_size=16, verbose=0)
    return m


def test_save_writes_data_files_only(tmp_path):
    m = small_mlp().build()
    m.save(str(tmp_path / "m"))
    files = sorted(os.listdir(tmp_path / "m"))
    assert files == ["model.json", "weights.npz"]
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["format"] == "rddtensor.model" and meta["format_version"] == 1
    with np.load(tmp_path / "m" / "weights.npz", allow_pickle=False) as z:
        assert sorted(z.files) == sorted(m.layout.keys)


def test_save_load_uncompiled_round_trip(tmp_path):
    m = small_mlp(dropout=True).build()
    path = str(tmp_path / "m")
    m.save(path)
    m2 = L.load_model(path)
    X, _ = toy_data()
    np.testing.assert_array_equal(m2.predict(X), m.predict(X))
    assert m2.loss is None
    assert m2.layout.keys == m.layout.keys


def test_save_load_compiled_round_trip(tmp_path):
    m = trained(optimizer=SGD(0.05, momentum=0.9, nesterov=True))
    path = str(tmp_path / "m")
    m.save(path)
    m2 = L.load_model(path)
    X, _ = toy_data(seed=1)
    np.testing.assert_array_equal(m2.predict(X), m.predict(X))
    assert type(m2.optimizer) is SGD
    assert m2.optimizer.get_config() == m.optimizer.get_config()
    assert m2.loss.name == "sparse_categorical_crossentropy"
    assert [mt.name for mt in m2.metrics] == ["accuracy"]
    assert m2.step == m.step
    assert set(m2.slots) == {"momentum"}
    np.testing.assert_array_equal(m2.slots["momentum"], m.slots["momentum"])


def test_resume_after_load_is_bit_identical(tmp_path):
    X, y = toy_data()
    a = trained(optimizer=Adam(1e-2))
    path = str(tmp_path / "m")
    a.save(path)
    b = L.load_model(path)
    assert b.step == a.step
    a.fit(X, y, epochs=2, batch_size=16, verbose=0, seed=3)
    b.fit(X, y, epochs=2, batch_size=16, verbose=0, seed=3)
    np.testing.assert_array_equal(a.theta, b.theta)


def test_save_load_restores_loss_settings(tmp_path):
    m = L.Sequential([L.Dense(1, input_shape=(4,))], seed=0)
    m.compile(optimizer="sgd", loss=get_loss("huber", delta=2.5), metrics=["mae"])
    m.save(str(tmp_path / "m"))
    m2 = L.load_model(str(tmp_path / "m"))
    assert m2.loss.get_config() == {"name": "huber", "delta": 2.5}


def test_resave_without_optimizer_drops_old_optimizer_state(tmp_path):
    m = trained()
    path = str(tmp_path / "m")
    m.save(path)
    assert os.path.exists(os.path.join(path, "optimizer.npz"))
    m.save(path, include_optimizer=False)
    assert not os.path.exists(os.path.join(path, "optimizer.npz"))


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory"):
        L.load_model(str(tmp_path / "nope"))


def test_load_without_model_json(tmp_path):
    path = str(tmp_path / "m")
    small_mlp().save(path)
    os.remove(os.path.join(path, "model.json"))
    with pytest.raises(FileNotFoundError, match="model.json is missing"):
        L.load_model(path)


def test_load_corrupt_model_json(tmp_path):
    path = str(tmp_path / "m")
    small_mlp().save(path)
    with open(os.path.join(path, "model.json"), "w") as f:
        f.write('{"format": "rddtensor.model", "config": ')  # truncated write
    with pytest.raises(ValueError, match="corrupt model file"):
        L.load_model(path)


def test_load_foreign_json(tmp_path):
    path = str(tmp_path / "m")
    small_mlp().save(path)
    with open(os.path.join(path, "model.json"), "w") as f:
        json.dump({"hello": "world"}, f)
    with pytest.raises(ValueError, match="not an rddtensor model file"):
        L.load_model(path)


def test_load_wrong_format_version(tmp_path):
    path = str(tmp_path / "m")
    small_mlp().save(path)
    meta_path = os.path.join(path, "model.json")
    meta = json.load(open(meta_path))
    meta["format_version"] = 99
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match=r"format version 99.*reads version 1"):
        L.load_model(path)


def test_load_unknown_layer_class(tmp_path):
    path = str(tmp_path / "m")
    small_mlp().save(path)
    meta_path = os.path.join(path, "model.json")
    meta = json.load(open(meta_path))
    meta["config"]["layers"][1]["class_name"] = "EvilLayer"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match="unknown layer type 'EvilLayer'"):
        L.load_model(path)


class _Boom:
    def __reduce__(self):  # would run on unpickling; must never be reached
        return (os.system, ("echo pwned > /dev/null",))


def test_load_refuses_pickled_weights(tmp_path):
    path = str(tmp_path / "m")
    m = small_mlp().build()
    m.save(path)
    ws = {k: v for k, v in m.params.items()}
    ws["0.W"] = np.array([_Boom()], dtype=object)
    np.savez(os.path.join(path, "weights.npz"), **ws)
    with pytest.raises(ValueError, match="non-numeric data.*refusing to load"):
        L.load_model(path)


def test_load_weights_missing_key(tmp_path):
    path = str(tmp_path / "m")
    m = small_mlp().build()
    m.save(path)
    ws = {k: v for k, v in m.params.items() if k != "1.b"}
    np.savez(os.path.join(path, "weights.npz"), **ws)
    with pytest.raises(ValueError, match=r"lacks weights \['1\.b'\]"):
        L.load_model(path)


# --- bad arguments: each error names what was wrong ---------------------------------------------

def test_dense_units_zero():
    with pytest.raises(ValueError, match="units must be a positive integer, got 0"):
        L.Dense(units=0)


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'relux'"):
        L.Dense(3, activation="relux")


def test_negative_learning_rate():
    with pytest.raises(ValueError, match="invalid learning rate: -0.1"):
        Adam(-0.1)
    with pytest.raises(ValueError, match="invalid learning rate: -1"):
        SGD(lr=-1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(loss="msee"), "unknown loss 'msee'"),
    (dict(optimizer="adamx"), "unknown optimizer 'adamx'"),
    (dict(metrics=["acuracy"]), "unknown metric 'acuracy'"),
])
def test_compile_unknown_names(kwargs, message):
    m = small_mlp()
    with pytest.raises(ValueError, match=message):
        m.compile(**{"loss": "mse", **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    (dict(epochs=-1), "epochs must be an integer >= 0, got -1"),
    (dict(initial_epoch=-2), "initial_epoch must be an integer >= 0, got -2"),
    (dict(validation_split=1.0), r"validation_split must be a number in \[0, 1\)"),
    (dict(validation_split=0.99), "leaves no training rows"),
    (dict(verbose=3), "verbose must be 0"),
    (dict(initial_epoch=1, resume=True), "initial_epoch=1 and resume=True"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(batch_size=-4), "batch_size must be a positive integer, got -4"),
    (dict(batch_size=49), "batch_size=49 is larger than the 48 training rows"),
    (dict(epochs=1.5), "epochs must be an integer >= 0, got 1.5"),
])
def test_fit_bad_arguments(kwargs, message):
    m = small_mlp()
    m.compile(loss="sparse_categorical_crossentropy")
    X, y = toy_data()
    with pytest.raises(ValueError, match=message):
        m.fit(X, y, **{"verbose": 0, "batch_size": 16, **kwargs})


def test_fit_before_compile():
    X, y = toy_data()
    with pytest.raises(RuntimeError, match=r"compile.*before fit"):
        small_mlp().fit(X, y, verbose=0)
    with pytest.raises(RuntimeError, match=r"compile.*before evaluate"):
        small_mlp().evaluate(X, y)


def test_input_width_mismatch_names_layer_and_widths():
    m = L.Sequential([L.Dense(16, activation="relu", input_shape=(64,)), L.Dense(10)], seed=0)
    m.compile(loss="sparse_categorical_crossentropy")
    m.build()
    X = np.zeros((8, 32), np.float32)
    y = np.zeros(8, np.int64)
    for call in (lambda: m.fit(X, y, verbose=0, batch_size=4), lambda: m.predict(X),
                 lambda: m.evaluate(X, y)):
        with pytest.raises(ValueError, match=r"\(32,\).*Dense layer.*\(64,\)"):
            call()


def test_input_width_mismatch_before_build_names_layer():
    m = L.Sequential([L.Dense(16, activation="relu", input_shape=(64,)), L.Dense(10)], seed=0)
    m.compile(loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"x .*\(32,\).*Dense layer.*\(64,\)"):
        m.fit(np.zeros((8, 32), np.float32), np.zeros(8, np.int64), verbose=0, batch_size=4)


def test_y_length_mismatch():
    m = small_mlp()
    m.compile(loss="sparse_categorical_crossentropy")
    X, y = toy_data()
    with pytest.raises(ValueError, match="x has 48 rows but y has 47"):
        m.fit(X, y[:-1], verbose=0, batch_size=16)
    with pytest.raises(ValueError, match="validation_data has 48 rows but y has 40"):
        m.fit(X, y, verbose=0, batch_size=16, validation_data=(X, y[:40]))


def test_nan_in_x_names_row():
    m = small_mlp()
    m.compile(loss="sparse_categorical_crossentropy")
    X, y = toy_data()
    X[5, 2] = np.nan
    with pytest.raises(ValueError, match=r"x contains NaN or inf \(first at row 5\)"):
        m.fit(X, y, verbose=0, batch_size=16)
    X[5, 2] = 0.0
    X[7, 0] = np.inf
    with pytest.raises(ValueError, match="row 7"):
        m.predict(X)


def test_nan_in_y():
    m = L.Sequential([L.Dense(1, input_shape=(4,))], seed=0)
    m.compile(loss="mse")
    X, _ = toy_data()
    y = np.zeros(len(X), np.float32)
    y[3] = np.nan
    with pytest.raises(ValueError, match=r"y contains NaN or inf \(first at row 3\)"):
        m.fit(X, y, verbose=0, batch_size=16)


def test_missing_y_and_missing_batch_axis():
    m = small_mlp()
    m.compile(loss="sparse_categorical_crossentropy")
    X, _ = toy_data()
    with pytest.raises(ValueError, match="y is required"):
        m.fit(X, verbose=0)
    with pytest.raises(ValueError, match="batch axis"):
        m.predict(np.zeros(4, np.float32))


def test_unexpected_fit_argument():
    m = small_mlp()
    m.compile(loss="sparse_categorical_crossentropy")
    X, y = toy_data()
    with pytest.raises(TypeError, match="num_partitions"):
        m.fit(X, y, verbose=0, num_partitions=2)

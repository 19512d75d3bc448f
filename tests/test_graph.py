"""Graph models (``L.Input``, layers called on symbolic tensors, ``L.Model(inputs, outputs)``),
as a user writes them.

PyTorch is the oracle: a residual block, a shared layer, a two-input model and cross-attention,
each written the same way as a ``torch.nn.Module`` (submodules declared in the order the graph
first calls them), weights copied by position from ``get_weights()``, then the forward and
three SGD / Adam steps compared. A graph equal to a ``Sequential`` trains to bit-identical
weights; inputs as lists and dicts; save / load; summary; and the errors of bad graphs.
"""
from __future__ import annotations

import doctest
import json
import re

import numpy as np
import pytest
import torch
from gradcheck import check_grad
from torch import nn

from rddtensor import layers as L
from rddtensor.layers import base, merge
from rddtensor.optim import SGD, Adam
from rddtensor.training import graph, models

torch.set_num_threads(1)


def _copy_into(module: nn.Module, weights) -> None:
    """Our ``get_weights()`` into ``module`` by position (its ``state_dict`` order, BatchNorm's
    step counters left out)."""
    keys = [k for k in module.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(keys) == len(weights), (keys, [w.shape for w in weights])
    module.load_state_dict({k: torch.tensor(w) for k, w in zip(keys, weights)}, strict=False)


def _torch_weights(module: nn.Module):
    return [v.detach().numpy() for k, v in module.state_dict().items()
            if not k.endswith("num_batches_tracked")]


def _torch_fit(module, optimizer, inputs, y, loss_fn, batch_size):
    """One epoch in stored order: the steps ``fit(shuffle=False)`` takes."""
    module.train()
    for a in range(0, len(y), batch_size):
        optimizer.zero_grad()
        out = module(*(torch.tensor(X[a:a + batch_size]) for X in inputs))
        loss_fn(out, torch.tensor(y[a:a + batch_size])).backward()
        optimizer.step()


def _assert_close(ours, theirs, rtol=1e-4, atol=2e-5):
    assert len(ours) == len(theirs)
    for i, (u, v) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(u, v, rtol=rtol, atol=atol, err_msg=f"weight {i}")


# --- equal to PyTorch -----------------------------------------------------------------------------
class TorchResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.shortcut = nn.Conv2d(2, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        y = torch.relu(h + self.shortcut(x))
        return self.head(y.mean(dim=(2, 3)))


def _residual_model(seed=0):
    x = L.Input((2, 6, 6), name="image")
    h = L.Conv2D(4, 3, padding="same")(x)
    h = L.ReLU()(L.BatchNorm()(h))
    h = L.BatchNorm()(L.Conv2D(4, 3, padding="same")(h))
    shortcut = L.Conv2D(4, 1)(x)                    # projection shortcut
    y = L.ReLU()(L.Add()([h, shortcut]))
    out = L.Dense(3)(L.GlobalAveragePooling2D()(y))
    return L.Model(x, out, name="resblock", seed=seed)


def _images(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 2, 6, 6)).astype(np.float32), rng.integers(0, 3, n)


def test_residual_block_equals_pytorch():
    X, y = _images()
    model = _residual_model()
    model.compile(optimizer=SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy")
    net = TorchResidual()
    _copy_into(net, model.get_weights())
    net.eval()
    np.testing.assert_allclose(model.predict(X), net(torch.tensor(X)).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    model.fit(X, y, epochs=1, batch_size=8, shuffle=False, verbose=0)  # 3 steps
    _torch_fit(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), [X], y,
               nn.functional.cross_entropy, 8)
    _assert_close(model.get_weights(), _torch_weights(net))  # running statistics included
    net.eval()
    np.testing.assert_allclose(model.predict(X), net(torch.tensor(X)).detach().numpy(),
                               rtol=1e-4, atol=1e-4)


class TorchShared(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 3)
        self.head = nn.Linear(6, 2)

    def forward(self, a, b):
        return self.head(torch.cat([torch.tanh(self.shared(a)), torch.tanh(self.shared(b))], 1))


def test_shared_layer_is_one_weight_set_whose_gradients_add_up():
    a, b = L.Input((4,), name="left"), L.Input((4,), name="right")
    shared = L.Dense(3, activation="tanh", name="shared")
    out = L.Dense(2)(L.Concatenate()([shared(a), shared(b)]))
    model = L.Model([a, b], out, seed=1)
    model.compile(optimizer=Adam(0.05), loss="mse")
    assert [w.shape for w in model.get_weights()] == [(3, 4), (3,), (2, 6), (2,)]
    rng = np.random.default_rng(1)
    A, B = (rng.standard_normal((18, 4)).astype(np.float32) for _ in range(2))
    y = rng.standard_normal((18, 2)).astype(np.float32)
    net = TorchShared()
    _copy_into(net, model.get_weights())
    np.testing.assert_allclose(model.predict({"left": A, "right": B}),
                               net(torch.tensor(A), torch.tensor(B)).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    model.fit([A, B], y, epochs=1, batch_size=6, shuffle=False, verbose=0)
    _torch_fit(net, torch.optim.Adam(net.parameters(), lr=0.05), [A, B], y,
               nn.functional.mse_loss, 6)
    _assert_close(model.get_weights(), _torch_weights(net))


class TorchTwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(5, 4)
        self.deep = nn.Linear(3, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, a, b):
        return self.head(torch.cat([torch.relu(self.wide(a)), torch.relu(self.deep(b))], 1))


def _two_input_model(seed=0):
    a, b = L.Input((5,), name="a"), L.Input((3,), name="b")
    h = L.Concatenate()([L.Dense(4, activation="relu")(a), L.Dense(4, activation="relu")(b)])
    model = L.Model([a, b], L.Dense(3)(h), seed=seed)
    model.compile(optimizer=SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def _two_inputs(n=24, seed=2):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, 5)).astype(np.float32)
    B = rng.standard_normal((n, 3)).astype(np.float32)
    return A, B, (A[:, 0] + B[:, 0] > 0).astype(np.int64) + (A[:, 1] > 1)


def test_two_input_model_equals_pytorch():
    A, B, y = _two_inputs()
    model = _two_input_model()
    net = TorchTwoInputs()
    _copy_into(net, model.get_weights())
    np.testing.assert_allclose(model.predict([A, B]),
                               net(torch.tensor(A), torch.tensor(B)).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    model.fit({"b": B, "a": A}, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    _torch_fit(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), [A, B], y,
               nn.functional.cross_entropy, 8)
    _assert_close(model.get_weights(), _torch_weights(net))


class TorchCross(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, q, memory):
        return self.head(self.attn(q, memory, memory, need_weights=False)[0].mean(dim=1))


def test_cross_attention_in_a_graph_equals_pytorch():
    q, memory = L.Input((3, 8), name="q"), L.Input((5, 8), name="memory")
    attended = L.MultiHeadAttention(8, 2)([q, memory])
    model = L.Model([q, memory], L.Dense(2)(L.GlobalAveragePooling1D()(attended)), seed=0)
    # SGD: the key bias's gradient is zero up to rounding (softmax ignores a per-query shift),
    # and Adam would turn that rounding into full-size steps
    model.compile(optimizer=SGD(0.1), loss="mse")
    rng = np.random.default_rng(3)
    Q, M = rng.standard_normal((12, 3, 8)).astype(np.float32), \
        rng.standard_normal((12, 5, 8)).astype(np.float32)
    y = rng.standard_normal((12, 2)).astype(np.float32)
    net = TorchCross()
    _copy_into(net, model.get_weights())
    model.fit([Q, M], y, epochs=1, batch_size=4, shuffle=False, verbose=0)
    _torch_fit(net, torch.optim.SGD(net.parameters(), lr=0.1), [Q, M], y,
               nn.functional.mse_loss, 4)
    _assert_close(model.get_weights(), _torch_weights(net))


def test_graph_backprop_is_the_gradient_of_the_whole_graph():
    """float64 gradient check of a graph with a shared layer, a residual sum, a product and a
    concatenation: inputs and every parameter (a shared layer's gradients add up)."""
    a, b = L.Input((3,), name="a"), L.Input((3,), name="b")
    shared = L.Dense(3, activation="tanh")
    ha, hb = shared(a), shared(b)
    h = L.Add()([ha, L.Dense(3)(ha)])
    out = L.Dense(2)(L.Concatenate()([h, L.Multiply()([hb, b])]))
    model = L.Model([a, b], out, seed=0)
    model.build()
    rng = np.random.default_rng(5)
    params = {k: rng.standard_normal(s) for k, s in model.layout.shapes.items()}
    A, B = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    Y, backprop = model.forward(params, [A, B])
    R = rng.standard_normal(Y.shape)
    (dA, dB), grads = backprop(R)

    def f(arrays):
        p = {k: arrays["p." + k] for k in params}
        return float(np.sum(model.forward(p, [arrays["A"], arrays["B"]])[0] * R))

    check_grad(f, {"A": A, "B": B, **{"p." + k: v for k, v in params.items()}},
               {"A": dA, "B": dB, **{"p." + k: g for k, g in grads.items()}})


class TorchTwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.cls = nn.Linear(8, 3)
        self.reg = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return self.cls(h), self.reg(h)


def _two_heads(seed=0):
    x = L.Input((6,), name="x")
    h = L.Dense(8, activation="relu")(x)
    model = L.Model(x, [L.Dense(3, activation="softmax", name="cls")(h),
                        L.Dense(1, name="reg")(h)], seed=seed)
    model.compile(optimizer=Adam(0.02), loss=["sparse_categorical_crossentropy", "mse"],
                  loss_weights={"cls": 1.0, "reg": 0.5}, metrics={"cls": "accuracy"})
    return model


def _heads_data(n=24, seed=4):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 6)).astype(np.float32)
    return X, (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 1), (2 * X[:, :1] - X[:, 2:3])


def test_two_outputs_with_weighted_losses_equal_pytorch(tmp_path):
    X, labels, values = _heads_data()
    model = _two_heads()
    assert model.loss.fused == ("softmax", None)  # the classifier trains on its logits
    net = TorchTwoHeads()
    _copy_into(net, model.get_weights())
    history = model.fit(X, {"cls": labels, "reg": values}, epochs=1, batch_size=8,
                        shuffle=False, verbose=0)
    assert set(history.history) == {"loss", "cls_accuracy"}
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    for a in range(0, len(X), 8):
        optimizer.zero_grad()
        logits, value = net(torch.tensor(X[a:a + 8]))
        loss = nn.functional.cross_entropy(logits, torch.tensor(labels[a:a + 8])) + \
            0.5 * nn.functional.mse_loss(value, torch.tensor(values[a:a + 8]))
        loss.backward()
        optimizer.step()
    _assert_close(model.get_weights(), _torch_weights(net))
    probabilities, predicted = model.predict(X)
    logits, value = net(torch.tensor(X))
    np.testing.assert_allclose(probabilities, torch.softmax(logits, 1).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(predicted, value.detach().numpy(), rtol=1e-4, atol=1e-5)
    logs = model.evaluate(X, [labels, values])
    model.save(str(tmp_path / "heads"))
    loaded = L.load_model(str(tmp_path / "heads"))
    assert loaded.evaluate(X, [labels, values]) == logs and set(logs) == {"loss", "cls_accuracy"}
    assert loaded.loss.weights == [1.0, 0.5] and loaded.loss.fused == ("softmax", None)


def test_targets_and_losses_of_several_outputs_are_checked():
    X, labels, values = _heads_data()
    model = _two_heads()
    with pytest.raises(ValueError, match=r"the model has 2 outputs \['cls', 'reg'\]: y must be a "
                                         r"list of 2 target arrays in that order, or a dict by "
                                         "output name; got ndarray"):
        model.fit(X, labels, verbose=0)
    with pytest.raises(ValueError, match=r"y is a dict of targets by output name; the model's "
                                         r"outputs are \['cls', 'reg'\]; missing \['reg'\]"):
        model.evaluate(X, {"cls": labels})
    with pytest.raises(ValueError, match=r"labels in y\['cls'\] must be integers in \[0, 3\)"):
        model.fit(X, [labels + 5, values], batch_size=8, verbose=0)
    with pytest.raises(ValueError, match=r"x has 24 rows but y\['reg'\] has 23"):
        model.fit(X, [labels, values[:-1]], verbose=0)
    with pytest.raises(ValueError, match="class_weight applies to models with one output"):
        model.fit(X, [labels, values], class_weight={0: 2.0}, verbose=0)
    with pytest.raises(ValueError, match=r"loss must be a list of 2 \(one per output, in that "
                                         r"order\) or a dict by output name, got 3"):
        model.compile(loss=["mse"] * 3)
    with pytest.raises(ValueError, match=r"loss_weights is a dict by output name.*unknown "
                                         r"\['size'\]"):
        model.compile(loss="mse", loss_weights={"cls": 1, "reg": 1, "size": 2})
    with pytest.raises(ValueError, match="loss_weights weighs the losses of a model with several "
                                         "outputs; this model has one"):
        _two_input_model().compile(loss="mse", loss_weights=[1.0])


# --- the same machinery as Sequential -------------------------------------------------------------
def test_a_graph_written_like_a_sequential_trains_bit_identically():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 6)).astype(np.float32)
    y = (X[:, 0] * X[:, 1] > 0).astype(np.int64)

    def layers():
        return [L.Dense(8, activation="relu"), L.Dropout(0.3), L.BatchNorm(),
                L.Dense(2, activation="softmax")]

    seq = L.Sequential([L.Dense(8, activation="relu", input_shape=(6,)), *layers()[1:]],
                       seed=4)
    x = L.Input((6,))
    h = x
    for layer in layers():
        h = layer(h)
    fn = L.Model(x, h, seed=4)
    histories = []
    for m in (seq, fn):
        m.compile(optimizer=Adam(0.01), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
        histories.append(m.fit(X, y, epochs=2, batch_size=16, validation_split=0.25, seed=7,
                               verbose=0).history)
    assert histories[0] == histories[1]
    assert [k.split(".")[1] for k in seq.layout.keys] == [k.split(".")[1] for k in fn.layout.keys]
    for u, v in zip(seq.get_weights(), fn.get_weights()):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(seq.predict(X), fn.predict(X))
    np.testing.assert_array_equal(seq.predict_proba(X), fn.predict_proba(X))
    assert seq.evaluate(X, y) == fn.evaluate(X, y)


def test_weights_follow_the_order_of_first_calls():
    head, body = L.Dense(3, name="head"), L.Dense(2, name="body")  # made in this order
    x = L.Input((4,))
    out = head(L.Dense(3, name="middle")(body(x)))                # called body, middle, head
    model = L.Model(x, out)
    assert [layer.name for layer in model.layers] == ["body", "middle", "head"]
    assert [w.shape for w in model.get_weights()] == [(2, 4), (2,), (3, 2), (3,), (3, 3), (3,)]


def test_inputs_as_a_list_or_a_dict_give_one_result_in_fit_evaluate_and_predict():
    A, B, y = _two_inputs()
    runs = []
    for x in ([A, B], {"a": A, "b": B}, (A, B)):
        m = _two_input_model()
        h = m.fit(x, y, epochs=2, batch_size=5, validation_data=(x, y), seed=3, verbose=0)
        runs.append((h.history, m.evaluate(x, y), m.predict(x, batch_size=7)))
    for history, logs, predictions in runs[1:]:
        assert history == runs[0][0] and logs == runs[0][1]
        np.testing.assert_array_equal(predictions, runs[0][2])
    # a shuffled batch takes the same rows of every input: two inputs concatenated train as
    # the one input that holds both
    a, b = L.Input((5,)), L.Input((3,))
    two = L.Model([a, b], L.Dense(3)(L.Concatenate()([a, b])), seed=0)
    x = L.Input((8,))
    one = L.Model(x, L.Dense(3)(x), seed=0)
    for m, data in ((two, [A, B]), (one, np.concatenate([A, B], axis=1))):
        m.compile(optimizer=Adam(0.1), loss="sparse_categorical_crossentropy")
        m.fit(data, y, epochs=2, batch_size=5, seed=9, verbose=0)
    for u, v in zip(two.get_weights(), one.get_weights()):
        np.testing.assert_array_equal(u, v)


def test_checkpoint_and_resume_a_two_input_model(tmp_path):
    A, B, y = _two_inputs()
    whole = _two_input_model()
    whole.fit([A, B], y, epochs=2, batch_size=5, seed=2, verbose=0)
    first = _two_input_model()
    first.fit([A, B], y, epochs=1, batch_size=5, seed=2, verbose=0,
              checkpoint_dir=str(tmp_path))
    resumed = _two_input_model()
    history = resumed.fit({"a": A, "b": B}, y, epochs=2, batch_size=5, seed=2, verbose=0,
                          checkpoint_dir=str(tmp_path), resume=True)
    assert history.params["resumed_from"]
    for u, v in zip(whole.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(u, v)


def test_a_tampered_graph_file_is_refused(tmp_path):
    A, B, y = _two_inputs()
    path = tmp_path / "two"
    _two_input_model().save(str(path))

    def edit(change):
        meta = json.loads((path / "model.json").read_text())
        change(meta["config"])
        (path / "model.json").write_text(json.dumps(meta))

    edit(lambda c: c["nodes"][2].update(inputs=[2, 9]))
    with pytest.raises(ValueError, match=r"model\.json': node 2 must be \{'layer'"):
        L.load_model(str(path))
    edit(lambda c: c["nodes"][2].update(inputs=[2, 3]))
    L.load_model(str(path))

    def list_out_of_order(c):  # the same graph, its first two layers listed the other way round
        c["layers"][:2] = c["layers"][1::-1]
        c["nodes"][0]["layer"], c["nodes"][1]["layer"] = 1, 0

    edit(list_out_of_order)
    with pytest.raises(ValueError, match="'layers' must list every layer once, in the order of "
                                         "its first call"):
        L.load_model(str(path))
    edit(lambda c: c["inputs"][0].update(shape=[7]))
    with pytest.raises(ValueError, match=r"Dense layer declares input_shape=\(5,\) but is called "
                                         r"on Input 'a' of shape \(7,\)"):
        L.load_model(str(path))


def test_summary_lists_each_call_with_its_inputs():
    a, b = L.Input((4,), name="left"), L.Input((4,), name="right")
    shared = L.Dense(3, name="shared")
    model = L.Model([a, b], L.Dense(1, name="head")(L.Add()([shared(a), shared(b)])))
    lines = []
    assert model.summary(print_fn=lines.append) is None
    text = lines[0]
    for row in (r"left\s+Input\s+\(None, 4\)", r"0\s+shared\[0\]\s+Dense\s+\(None, 3\)\s+15\s+left",
                r"1\s+shared\[1\]\s+Dense\s+\(None, 3\)\s+shared\s+right",
                r"2\s+add_1\s+Add\s+\(None, 3\)\s+0\s+shared\[0\], shared\[1\]",
                r"3\s+head\s+Dense\s+\(None, 1\)\s+4\s+add_1", r"total parameters: 19"):
        assert re.search(row, text), (row, text)


def test_specs_and_the_fused_output_activation():
    A, B, y = _two_inputs()
    a, b = L.Input((5,), name="a", dtype="int64"), L.Input((3,), name="b")
    out = L.Dense(3, activation="softmax", name="probs")(L.Concatenate()([a, b]))
    model = L.Model([a, b], out)
    assert [(s.name, s.shape, s.dtype) for s in model.input_specs] == \
        [("a", (5,), "int64"), ("b", (3,), "float32")]
    assert [(s.name, s.shape) for s in model.output_specs] == [("probs", (3,))]
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    assert model.loss.fused == "softmax"  # trained on the logits, predicts probabilities
    np.testing.assert_allclose(model.predict([A, B]).sum(axis=1), 1, rtol=1e-5)
    # a softmax that also feeds another layer is not left out
    x = L.Input((3,))
    p = L.Dense(3, activation="softmax")(x)
    assert L.Model(x, p).output_activation()[0] == "softmax"
    assert L.Model(x, L.Add()([p, L.Dense(3)(p)])).output_activation() is None


# --- errors ---------------------------------------------------------------------------------------
def test_bad_graphs_are_refused_with_errors_that_name_them():
    a, b, c = L.Input((4,), name="a"), L.Input((4,), name="b"), L.Input((3,), name="c")
    added = L.Add(name="plus")([a, b])
    with pytest.raises(ValueError, match=r"outputs depend on Input 'b' of shape \(4,\), which is "
                                         r"not in inputs: add it to Model\(inputs="):
        L.Model(a, L.Dense(2)(added))
    with pytest.raises(ValueError, match=r"Model inputs\[2\] \(Input 'c' of shape \(3,\)\) is "
                                         "not used by any output"):
        L.Model([a, b, c], added)
    with pytest.raises(ValueError, match=r"inputs\[0\] is the output of Add layer 'plus' "
                                         r"\(shape \(4,\)\), not an L.Input"):
        L.Model(added, L.Dense(2)(added))
    with pytest.raises(ValueError, match=r"Dense layer takes one input, got a list of 2: .*"
                                         r"L\.Concatenate\(\)\(\[a, b\]\)"):
        L.Dense(2)([a, b])
    with pytest.raises(ValueError, match=r"Add layer cannot take Input 'a' of shape \(4,\), "
                                         r"Input 'c' of shape \(3,\)"):
        L.Add()([a, c])
    with pytest.raises(TypeError, match=r"got ndarray at position 1"):
        L.Add()([a, np.ones((2, 4))])
    with pytest.raises(TypeError, match="call a layer on symbolic tensors"):
        L.Dense(2)(np.ones((2, 4)))
    with pytest.raises(TypeError, match=r"Model outputs\[0\] must be a symbolic tensor"):
        L.Model(a, np.ones(3))
    shared = L.Dense(2, name="d")
    shared(a)
    with pytest.raises(ValueError, match=r"Dense layer 'd' cannot take Input 'c'.*built for "
                                         r"input shape \(4,\), got \(3,\)"):
        shared(c)
    bn = L.BatchNorm()
    with pytest.raises(ValueError, match=r"BatchNorm layer is called 2 times.*cannot be shared"):
        L.Model([a, b], L.Add()([bn(a), bn(b)]))
    with pytest.raises(ValueError, match="two layers are named 'same'"):
        L.Model(a, L.Dense(1, name="same")(L.Dense(4, name="same")(a)))
    other_a = L.Input((4,), name="a")
    with pytest.raises(ValueError, match="two inputs are named 'a'"):
        L.Model([a, other_a], L.Concatenate()([a, other_a]))
    with pytest.raises(TypeError, match="holds no data"):
        np.asarray(a)


def test_wrong_arrays_for_the_inputs_are_refused():
    A, B, y = _two_inputs()
    m = _two_input_model()
    with pytest.raises(ValueError, match=r"the model has 2 inputs \['a', 'b'\]: x must be a list "
                                         r"of 2 arrays in that order, or a dict by input name; "
                                         "got ndarray"):
        m.fit(A, y, verbose=0)
    with pytest.raises(ValueError, match=r"must be a list of 2 arrays in that order, got 3"):
        m.predict([A, B, B])
    with pytest.raises(ValueError, match=r"dict of arrays by input name; the model's inputs are "
                                         r"\['a', 'b'\]; missing \['b'\]; unknown \['B'\]"):
        m.evaluate({"a": A, "B": B}, y)
    with pytest.raises(ValueError, match=r"x\['b'\] has per-row shape \(5,\) but the model's "
                                         r"input 'b' expects \(3,\)"):
        m.predict([A, A])
    with pytest.raises(ValueError, match=r"every input needs the same rows, got x\['a'\] 24, "
                                         r"x\['b'\] 23"):
        m.fit([A, B[:-1]], y, verbose=0)
    with pytest.raises(ValueError, match=r"validation_data\['a'\] contains NaN"):
        bad = A.copy()
        bad[2, 1] = np.nan
        m.fit([A, B], y, batch_size=8, validation_data=([bad, B], y), verbose=0)
    with pytest.raises(ValueError, match=r"x has 24 rows but y has 23"):
        m.fit([A, B], y[:-1], verbose=0)


def test_docstring_examples_run():
    for module in (base, merge, graph, models):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__

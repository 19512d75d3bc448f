"""Sequence models end to end: they learn (digits row by row, a memory task, a padded token task),
train like PyTorch step for step, and train the same on Spark as in process."""
import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor.layers.embedding import Embedding
from rddtensor.layers.recurrent import GRU, LSTM
from rddtensor.optim import Adam


def _classifier(*layers, seed=0, lr=1e-2):
    model = L.Sequential(list(layers), seed=seed)
    model.compile(optimizer=Adam(lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def memory_task(n, T=12, seed=0):
    """Label = sign of the very first input: the net must carry it across all T steps."""
    X = np.random.default_rng(seed).uniform(-1, 1, (n, T, 2)).astype(np.float32)
    return X, (X[:, 0, 0] > 0).astype(np.int64)


def token_task(n, T=10, vocab=12, seed=0):
    """Variable-length id sequences (1..vocab-1) padded with 0; label = "contains token 3"."""
    rng = np.random.default_rng(seed)
    X = np.zeros((n, T), np.int64)
    for i, length in enumerate(rng.integers(2, T + 1, n)):
        X[i, :length] = rng.integers(1, vocab, length)
    return X, (X == 3).any(axis=1).astype(np.int64)


# --- they learn ----------------------------------------------------------------------------------
def test_lstm_classifies_digits_row_by_row():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    X = (digits.data.reshape(-1, 8, 8) / 16).astype(np.float32)  # 8 steps of 8 pixels
    Xtr, Xte, ytr, yte = train_test_split(X, digits.target, test_size=0.25, random_state=0)
    model = _classifier(LSTM(32, input_shape=(8, 8)), L.Dense(10))
    model.fit(Xtr, ytr, epochs=10, batch_size=32, verbose=0)
    assert model.evaluate(Xte, yte)["accuracy"] >= 0.85  # chance is 0.1


def test_gru_learns_a_memory_task():
    Xtr, ytr = memory_task(800, seed=1)
    Xte, yte = memory_task(400, seed=2)
    model = _classifier(GRU(16, input_shape=(12, 2)), L.Dense(2))
    model.fit(Xtr, ytr, epochs=10, batch_size=32, verbose=0)
    assert model.evaluate(Xte, yte)["accuracy"] >= 0.85  # chance is 0.5


def test_masked_embedding_lstm_learns_a_token_task():
    Xtr, ytr = token_task(1000, seed=1)
    Xte, yte = token_task(500, seed=2)
    assert 0.3 < ytr.mean() < 0.7
    model = _classifier(Embedding(12, 8, padding_idx=0, input_shape=(10,)),
                        LSTM(16, mask_value=0.0), L.Dense(2))
    model.fit(Xtr, ytr, epochs=10, batch_size=32, verbose=0)
    assert model.evaluate(Xte, yte)["accuracy"] >= 0.85  # the majority class is ~0.58
    # padding is ignored: more of it changes no prediction
    Xlong = np.concatenate([Xte, np.zeros((len(Xte), 5), Xte.dtype)], axis=1)
    np.testing.assert_allclose(model.forward(model.params, Xlong.astype(np.float32))[0],
                               model.predict(Xte), rtol=1e-6, atol=1e-6)


# --- like PyTorch ----------------------------------------------------------------------------
def test_embedding_lstm_dense_adam_steps_match_torch():
    torch = pytest.importorskip("torch")
    X, y = token_task(24, T=7, vocab=12, seed=3)
    y = y + (X[:, 0] % 2)  # three classes
    lengths = (X != 0).sum(axis=1)
    lr = 1e-2
    model = _classifier(Embedding(12, 5, padding_idx=0, input_shape=(7,)),
                        LSTM(6, mask_value=0.0), L.Dense(3), seed=4, lr=lr)
    model.build()
    weights = model.get_weights()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(12, 5, padding_idx=0)
            self.lstm = torch.nn.LSTM(5, 6, batch_first=True)
            self.fc = torch.nn.Linear(6, 3)

        def forward(self, ids):
            packed = torch.nn.utils.rnn.pack_padded_sequence(
                self.emb(ids), torch.from_numpy(lengths), batch_first=True, enforce_sorted=False)
            _, (h_n, _) = self.lstm(packed)
            return self.fc(h_n[0])

    net = Net()
    params = list(net.parameters())
    assert [tuple(p.shape) for p in params] == [w.shape for w in weights]  # same layouts
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(torch.from_numpy(w))
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    ids, yt = torch.from_numpy(X), torch.from_numpy(y)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(ids), yt).backward()
        opt.step()

    model.fit(X.astype(np.float32), y, epochs=5, batch_size=len(X), shuffle=False, verbose=0)
    assert model.step == 5
    for ours, theirs in zip(model.get_weights(), params):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(model.get_weights()[1], weights[1])  # the weights moved


# --- on Spark --------------------------------------------------------------------------------
@pytest.mark.slow  # ~10 s of Spark stages on two shared cores
@pytest.mark.spark
def test_distributed_lstm_equals_in_process(sc):
    X, y = memory_task(16, T=4, seed=5)

    def model():
        return _classifier(LSTM(3, input_shape=(4, 2)), L.Dense(2), seed=6)

    local = model()
    local.fit(X, y, epochs=1, batch_size=8, seed=7, verbose=0)  # 2 steps
    dist = model()
    history = dist.fit(sc.parallelize(list(zip(X, y)), 2), epochs=1, batch_size=8, seed=7,
                       verbose=0)
    assert history.params["partitions"] == 2
    assert dist.step == local.step == 2
    np.testing.assert_allclose(dist.theta, local.theta, rtol=1e-5, atol=1e-7)
    assert not np.allclose(dist.theta, model().build().theta)  # training changed the weights

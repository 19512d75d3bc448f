"""A small residual CNN on handwritten digits, written with the functional API.

scikit-learn's bundled 8x8 digits (1,797 images) as NCHW arrays in [0, 1]. The network is a
stem convolution, one residual block that keeps the shape (``x + f(x)``) and one that halves
the resolution with a projection shortcut (a strided 1x1 convolution), then global average
pooling and a linear classifier: ``L.Input``, layers called on symbolic tensors, ``L.Add`` and
``L.Model(inputs, outputs)``. It trains in this process on numpy arrays, reports held-out
accuracy, and is saved (JSON + .npz) and loaded back with the same predictions.

Run:  python examples/residual_cnn_digits.py      (RDDTENSOR_QUICK=1: fewer epochs)
"""
import os
import tempfile

import numpy as np
from sklearn.datasets import load_digits

from rddtensor import layers as L
from rddtensor.optim import Adam

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))


def conv_bn(x, filters, strides=1, relu=True):
    """Conv2D 3x3 (padding 1: PyTorch's "same" is for strides=1 only) -> BatchNorm (-> ReLU)."""
    x = L.BatchNorm()(L.Conv2D(filters, 3, strides=strides, padding=1)(x))
    return L.ReLU()(x) if relu else x


def residual_block(x, filters, strides=1):
    """``relu(f(x) + shortcut(x))``: the shortcut is ``x`` itself when the shape stays, else a
    strided 1x1 convolution (a projection) to the new shape."""
    branch = conv_bn(conv_bn(x, filters, strides), filters, relu=False)
    shortcut = x if strides == 1 and x.shape[0] == filters else \
        L.Conv2D(filters, 1, strides=strides)(x)
    return L.ReLU()(L.Add()([branch, shortcut]))


def build_model():
    images = L.Input((1, 8, 8), name="image")
    x = conv_bn(images, 8)
    x = residual_block(x, 8)                 # 8 x 8 x 8, identity shortcut
    x = residual_block(x, 16, strides=2)     # 16 x 4 x 4, projection shortcut
    logits = L.Dense(10)(L.GlobalAveragePooling2D()(x))
    return L.Model(images, logits, name="resnet_digits", seed=0)


def main():
    digits = load_digits()
    X = (digits.images / 16.0).astype(np.float32)[:, None]      # (1797, 1, 8, 8)
    y = digits.target
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1400], order[1400:]

    model = build_model()
    model.compile(optimizer=Adam(5e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.summary()
    model.fit(X[train], y[train], epochs=3 if QUICK else 8, batch_size=32, verbose=2)
    acc = model.evaluate(X[test], y[test])["accuracy"]

    with tempfile.TemporaryDirectory() as tmp:
        model.save(os.path.join(tmp, "resnet"))
        loaded = L.load_model(os.path.join(tmp, "resnet"))
    same = np.array_equal(loaded.predict(X[test]), model.predict(X[test]))
    print(f"held-out accuracy {acc:.4f} on {len(test)} digits; the reloaded model predicts "
          f"{'the same' if same else 'DIFFERENTLY'}")
    assert acc >= 0.95, f"the residual CNN should reach 95% on digits, got {acc:.3f}"
    assert same


if __name__ == "__main__":
    main()

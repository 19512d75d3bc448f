"""Recurrent layers: ``SimpleRNN``, ``LSTM`` and ``GRU`` with PyTorch weight layouts and gate order.

Every layer holds ``W_ih (G*units, n_in)``, ``W_hh (G*units, units)``, ``b_ih`` and ``b_hh``
(``G*units``,) exactly like ``torch.nn.RNN/LSTM/GRU`` (one layer, ``batch_first=True``), so
``weight_ih_l0 -> W_ih``, ``weight_hh_l0 -> W_hh``, ``bias_ih_l0 -> b_ih``, ``bias_hh_l0 -> b_hh``
map straight in. The input projection ``X @ W_ih.T`` of all time steps is one GEMM; the recurrence
(forward and backprop through time) is a Python loop over time steps, vectorised over batch and
units; the weight gradients are again one GEMM each over all steps.

Padding (the only mask a layer can see through ``Sequential``, which passes just ``X``): with
``mask_value=v`` a time step whose features ALL equal ``v`` is padding. At a padded step the state
is carried over unchanged (``h_t = h_{t-1}``, ``c_t = c_{t-1}``) and the output there is zero, so
``return_sequences=False`` returns the state after the last real step. That is what PyTorch
computes on a ``pack_padded_sequence`` batch. It composes: an ``Embedding(padding_idx=0)``
(zero padding row that never trains) followed by ``LSTM(mask_value=0.0)`` skips padded tokens,
and a ``return_sequences=True`` layer outputs zeros at padded steps, so a second recurrent layer
with ``mask_value=0.0`` skips the same steps.

Example:
    >>> import numpy as np
    >>> from rddtensor.layers.recurrent import LSTM
    >>> lstm = LSTM(4, return_sequences=True)
    >>> lstm.build((5, 3))
    (5, 4)
    >>> params = lstm.init_params(np.random.default_rng(0))
    >>> Y, backprop = lstm.forward(params, np.ones((2, 5, 3), np.float32))
    >>> dX, grads = backprop(np.ones_like(Y))
    >>> Y.shape, dX.shape, grads["W_ih"].shape
    ((2, 5, 4), (2, 5, 3), (16, 3))
"""
from __future__ import annotations

import math

import numpy as np

from rddtensor.layers.activations import activation_config, get_activation
from rddtensor.layers.base import Layer, flag, mask_value_arg, positive_int, register
from rddtensor.layers.initializers import get_initializer, initialize
from rddtensor.backend import get_array_module

__all__ = ["Recurrent", "SimpleRNN", "LSTM", "GRU", "valid_steps"]


def valid_steps(X, mask_value):
    """``(batch, time)`` booleans: False where every feature of a step equals ``mask_value``.

    ``None`` when ``mask_value`` is ``None`` (no masking).

    Example:
        >>> import numpy as np
        >>> valid_steps(np.array([[[1.0, 0.0], [0.0, 0.0]]]), 0.0)
        array([[ True, False]])
    """
    if mask_value is None:
        return None
    xp = get_array_module(X)
    return xp.any(X != mask_value, axis=-1)


def _sigmoid_(xp, Z):
    # in place, also on strided gate slices: sigmoid(z) = (1 + tanh(z / 2)) / 2, overflow-free.
    # NumPy's tanh is vectorised and scipy's expit is not, so this is faster on float32 gate
    # slices, and the float32 error is no larger (max 5.9e-8 vs 8.6e-8 against float64)
    Z *= 0.5
    xp.tanh(Z, out=Z)
    Z *= 0.5
    Z += 0.5
    return Z




def _initializer(name, what: str):
    return None if name is None else get_initializer(name, what)


class Recurrent(Layer):
    """Base of the recurrent layers: config, weights, masking and the GEMMs around the time loop.

    Subclasses set ``_gates`` (G) and implement ``_scan`` (forward over time, returning the
    states ``H`` of shape ``(time + 1, batch, units)`` with ``H[0] = 0`` and a cache) and
    ``_scan_backward`` (backprop through time, returning the gradients of the pre-activations
    that ``W_ih`` and ``W_hh`` feed, each ``(time, batch, G*units)``).

    Args:
        units: size of the hidden state, a positive integer.
        return_sequences: output every step's state ``(batch, time, units)`` instead of the last
            one ``(batch, units)``.
        mask_value: ``None``, or a number: a time step whose features all equal it is padding
            (state carried over, output zero there; see the module docstring).
        use_bias: add ``b_ih`` and ``b_hh`` (PyTorch's ``bias=``).
        kernel_initializer, recurrent_initializer, bias_initializer: names in
            ``rddtensor.layers.initializers.INITIALIZERS`` for ``W_ih``, ``W_hh`` and the biases; ``None``
            (default) is PyTorch's ``U(-1/sqrt(units), 1/sqrt(units))``.
        input_shape, name: see ``Layer``.
    """

    _gates = 1

    def __init__(self, units, return_sequences=False, mask_value=None, use_bias=True,
                 kernel_initializer=None, recurrent_initializer=None, bias_initializer=None, *,
                 input_shape=None, name=None):
        super().__init__(input_shape=input_shape, name=name)
        self.units = positive_int(units, "units")
        self.return_sequences = flag(return_sequences, "return_sequences")
        self.mask_value = mask_value_arg(mask_value)
        self.use_bias = flag(use_bias, "use_bias")
        self.kernel_initializer = _initializer(kernel_initializer, "kernel_initializer")
        self.recurrent_initializer = _initializer(recurrent_initializer, "recurrent_initializer")
        self.bias_initializer = _initializer(bias_initializer, "bias_initializer")

    # --- shapes and weights -------------------------------------------------------------
    def compute_output_shape(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(f"{self.describe()} needs a per-sample input shape (time, features), "
                             f"got {tuple(input_shape)}")
        return (input_shape[0], self.units) if self.return_sequences else (self.units,)

    def param_shapes(self):
        if self.input_shape is None:
            raise ValueError(f"{self.describe()} has no input shape yet: call build(input_shape) "
                             f"or pass input_shape=")
        gu = self._gates * self.units
        shapes = {"W_ih": (gu, self.input_shape[-1]), "W_hh": (gu, self.units)}
        if self.use_bias:
            shapes.update(b_ih=(gu,), b_hh=(gu,))
        return shapes

    def init_params(self, rng, dtype=np.float32):
        inits = {"W_ih": self.kernel_initializer, "W_hh": self.recurrent_initializer,
                 "b_ih": self.bias_initializer, "b_hh": self.bias_initializer}
        k = 1.0 / math.sqrt(self.units)
        params = {}
        for key, shape in self.param_shapes().items():
            if inits[key] is None:  # PyTorch's default for every RNN weight and bias
                if not isinstance(rng, np.random.Generator):
                    raise ValueError(f"rng must be a numpy.random.Generator "
                                     f"(np.random.default_rng(seed)), got {type(rng).__name__}")
                params[key] = rng.uniform(-k, k, shape).astype(dtype)
            else:
                params[key] = initialize(inits[key], rng, shape, dtype)
        return params

    # --- compute --------------------------------------------------------------------------
    def forward(self, params, X, training=False, rng=None):
        xp = get_array_module(X)
        W_ih = params["W_ih"]
        self._check_input(X, W_ih.shape[1])
        batch, T, n_in = X.shape
        gu, u = self._gates * self.units, self.units
        valid = valid_steps(X, self.mask_value)
        if valid is not None:
            # time-major (T, batch, 1) for per-step slices; an all-real batch needs no mask
            valid = None if bool(valid.all()) else xp.ascontiguousarray(valid.T)[:, :, None]
        p = self._to_scan_order(xp, params)
        Xt = xp.ascontiguousarray(X.swapaxes(0, 1)).reshape(T * batch, n_in)
        W_in, b_in = self._projection(xp, p)
        XW = (Xt @ W_in.T).reshape(T, batch, gu)  # one GEMM for every step's input projection
        if b_in is not None:
            XW += b_in
        H, cache = self._scan(xp, XW, p, valid)
        if self.return_sequences:
            Hs = H[1:] if valid is None else xp.where(valid, H[1:], 0.0)
            Y = xp.ascontiguousarray(Hs.swapaxes(0, 1))
        else:
            Y = H[T].copy()

        def backprop(dY):
            if self.return_sequences:
                dYt = xp.ascontiguousarray(dY.swapaxes(0, 1))
                if valid is not None:
                    dYt = xp.where(valid, dYt, 0.0)  # the output at a padded step is constant 0
                dh_last = None
            else:
                dYt, dh_last = None, dY
            dGi, dGh = self._scan_backward(xp, cache, p, valid, dYt, dh_last)
            # (T * batch, gu) views; the scans may hand back strided (not contiguous) rows
            dGi2, dGh2 = dGi.reshape(T * batch, gu), dGh.reshape(T * batch, gu)
            grads = {"W_ih": dGi2.T @ Xt, "W_hh": dGh2.T @ H[:-1].reshape(T * batch, u)}
            if self.use_bias:
                grads["b_ih"] = dGi2.sum(axis=0)
                grads["b_hh"] = grads["b_ih"].copy() if dGh is dGi else dGh2.sum(axis=0)
            dX = (dGi2 @ p["W_ih"]).reshape(T, batch, n_in).swapaxes(0, 1)
            return xp.ascontiguousarray(dX), self._to_scan_order(xp, grads)
        return Y, backprop

    def _to_scan_order(self, xp, params):
        """The weights (or their gradients) with gate rows in the order ``_scan`` uses.

        The identity here; a subclass that reorders its gates overrides it with a permutation
        that is its own inverse, so the same call maps gradients back to PyTorch's order.
        """
        return params

    def _projection(self, xp, params):
        """``(W, b)`` of the input projection ``XW = X W^T + b`` that ``_scan`` receives.

        Both biases here (they are plain sums of the pre-activation); ``None`` without bias.
        """
        b = params["b_ih"] + params["b_hh"] if self.use_bias else None
        return params["W_ih"], b

    def _scan(self, xp, XW, params, valid):
        raise NotImplementedError

    def _scan_backward(self, xp, cache, params, valid, dYt, dh_last):
        raise NotImplementedError

    def _check_input(self, X, n_in):
        if X.ndim != 3:
            raise ValueError(f"{self.describe()} expects inputs of shape (batch, time, features), "
                             f"got shape {tuple(X.shape)}")
        if X.shape[-1] != n_in:
            raise ValueError(f"{self.describe()} expects inputs with {n_in} features (last axis), "
                             f"got {X.shape[-1]}")

    def _initial_grads(self, xp, dtype, batch, dh_last):
        dh = xp.zeros((batch, self.units), dtype) if dh_last is None else dh_last.astype(dtype)
        return dh

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "return_sequences": self.return_sequences,
            "mask_value": self.mask_value,
            "use_bias": self.use_bias,
            "kernel_initializer": self.kernel_initializer,
            "recurrent_initializer": self.recurrent_initializer,
            "bias_initializer": self.bias_initializer,
        }


def _carry(xp, valid, t, new, old):
    """The state after step ``t``: ``new`` at real steps, ``old`` carried over at padded ones."""
    return new if valid is None else xp.where(valid[t], new, old)


def _split_grad(xp, valid, t, d):
    """Split the gradient into a state between the step's new value and the carried one."""
    if valid is None:
        return d, None
    v = valid[t]
    return xp.where(v, d, 0.0), xp.where(v, 0.0, d)


@register
class SimpleRNN(Recurrent):
    """Elman RNN, ``torch.nn.RNN``: ``h_t = f(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``, ``h_0 = 0``.

    Args:
        units: size of the hidden state.
        activation: ``f``, ``"tanh"`` (default, as PyTorch) or ``"relu"`` (PyTorch's other
            ``nonlinearity``), or any activation of ``rddtensor.layers.activations.get_activation``.
        return_sequences, mask_value, use_bias, kernel_initializer, recurrent_initializer,
        bias_initializer, input_shape, name: see ``Recurrent``.

    Shape:
        input ``(batch, time, n_in)``; output ``(batch, time, units)`` with
        ``return_sequences=True``, else ``(batch, units)``; params ``W_ih (units, n_in)``,
        ``W_hh (units, units)``, ``b_ih (units,)``, ``b_hh (units,)``.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.recurrent import SimpleRNN
        >>> rnn = SimpleRNN(3, activation="relu")
        >>> rnn.build((4, 2))
        (3,)
        >>> rnn(rnn.init_params(np.random.default_rng(0)), np.zeros((5, 4, 2))).shape
        (5, 3)
    """

    _gates = 1

    def __init__(self, units, activation="tanh", return_sequences=False, mask_value=None,
                 use_bias=True, kernel_initializer=None, recurrent_initializer=None,
                 bias_initializer=None, *, input_shape=None, name=None):
        super().__init__(units, return_sequences, mask_value, use_bias, kernel_initializer,
                         recurrent_initializer, bias_initializer, input_shape=input_shape,
                         name=name)
        self.activation = get_activation(activation)

    def _scan(self, xp, XW, params, valid):
        T, batch, u = XW.shape
        W_hhT = params["W_hh"].T
        H = xp.zeros((T + 1, batch, u), XW.dtype)
        Z = xp.empty((T, batch, u), XW.dtype)
        backprops = []
        for t in range(T):
            xp.matmul(H[t], W_hhT, out=Z[t])
            Z[t] += XW[t]
            h, bp = self.activation.apply(Z[t])
            backprops.append(bp)
            H[t + 1] = _carry(xp, valid, t, h, H[t])
        return H, backprops

    def _scan_backward(self, xp, backprops, params, valid, dYt, dh_last):
        W_hh = params["W_hh"]
        T, batch = len(backprops), (dh_last.shape[0] if dYt is None else dYt.shape[1])
        dZ = xp.empty((T, batch, self.units), W_hh.dtype)
        dh = self._initial_grads(xp, W_hh.dtype, batch, dh_last)
        for t in reversed(range(T)):
            if dYt is not None:
                dh = dh + dYt[t]
            dh_new, dh_kept = _split_grad(xp, valid, t, dh)
            dZ[t] = backprops[t](dh_new)
            dh = dZ[t] @ W_hh
            if dh_kept is not None:
                dh += dh_kept
        return dZ, dZ

    def get_config(self):
        cfg = super().get_config()
        cfg["activation"] = activation_config(self.activation)
        return cfg


@register
class LSTM(Recurrent):
    """Long short-term memory, ``torch.nn.LSTM`` (gates in PyTorch order i, f, g, o).

    With ``G_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh`` split into four blocks of ``units``::

        i_t = sigmoid(G_i)    f_t = sigmoid(G_f)    g_t = tanh(G_g)    o_t = sigmoid(G_o)
        c_t = f_t * c_{t-1} + i_t * g_t
        h_t = o_t * tanh(c_t)                      (h_0 = c_0 = 0)

    Args:
        units: size of the hidden and cell state.
        return_sequences, mask_value, use_bias, kernel_initializer, recurrent_initializer,
        bias_initializer, input_shape, name: see ``Recurrent``.

    Shape:
        input ``(batch, time, n_in)``; output ``(batch, time, units)`` with
        ``return_sequences=True``, else ``(batch, units)`` (``h`` after the last real step);
        params ``W_ih (4*units, n_in)``, ``W_hh (4*units, units)``, ``b_ih``, ``b_hh``
        ``(4*units,)``.

    Example:
        >>> import numpy as np, rddtensor.layers as L
        >>> from rddtensor.layers.recurrent import LSTM
        >>> model = L.Sequential([LSTM(16, input_shape=(8, 8)), L.Dense(10)], seed=0)
        >>> model.predict(np.zeros((2, 8, 8), np.float32)).shape
        (2, 10)
    """

    _gates = 4

    # The scan orders the gate blocks g, f, i, o (PyTorch stores i, f, g, o; the permutation
    # swaps i and g, so it is its own inverse) and computes the sigmoid gates through tanh,
    # sigmoid(z) = (1 + tanh(z / 2)) / 2: the rows of f, i, o are pre-scaled by 1/2 (exact), one
    # tanh call covers all four gates and two in-place ops finish f, i, o. NumPy's tanh is
    # vectorised; scipy's expit is not, so the one tanh call is the faster way.
    _SCAN_ORDER = (2, 1, 0, 3)

    def _to_scan_order(self, xp, params):
        u = self.units
        return {k: xp.concatenate([v[j * u:(j + 1) * u] for j in self._SCAN_ORDER])
                for k, v in params.items()}

    def _gate_scale(self, xp, dtype):
        """``(4 units, 1)``: 1 for the g rows, 1/2 for the sigmoid gates' rows."""
        scale = xp.full((4 * self.units, 1), 0.5, dtype)
        scale[:self.units] = 1.0
        return scale

    def _projection(self, xp, params):
        W, b = super()._projection(xp, params)
        scale = self._gate_scale(xp, W.dtype)
        return W * scale, None if b is None else b * scale[:, 0]

    def _scan(self, xp, XW, params, valid):
        T, batch, gu = XW.shape
        u = self.units
        dtype = XW.dtype
        W_hhT = (params["W_hh"] * self._gate_scale(xp, dtype)).T
        A = XW                                     # becomes the activated gates g, f, i, o
        H = xp.zeros((T + 1, batch, u), dtype)     # states after each step (carried at padding)
        C = xp.zeros((T + 1, batch, u), dtype)
        TC = xp.empty((T, batch, u), dtype)        # tanh of each step's new cell state
        hw = xp.empty((batch, gu), dtype)
        ig = xp.empty((batch, u), dtype)
        for t in range(T):
            a = A[t]
            xp.matmul(H[t], W_hhT, out=hw)
            a += hw
            xp.tanh(a, out=a)
            s = a[:, u:]
            s *= 0.5
            s += 0.5
            g, f, i, o = a[:, :u], a[:, u:2 * u], a[:, 2 * u:3 * u], a[:, 3 * u:]
            c = C[t + 1]
            xp.multiply(f, C[t], out=c)
            xp.multiply(i, g, out=ig)
            c += ig
            xp.tanh(c, out=TC[t])
            xp.multiply(o, TC[t], out=H[t + 1])
            if valid is not None:
                c[...] = _carry(xp, valid, t, c, C[t])
                H[t + 1] = _carry(xp, valid, t, H[t + 1], H[t])
        return H, (A, C, TC)

    def _scan_backward(self, xp, cache, params, valid, dYt, dh_last):
        A, C, TC = cache
        T, batch, gu = A.shape
        u = self.units
        A4 = A.reshape(T, batch, 4, u)
        g, f, i, o = A4[:, :, 0], A4[:, :, 1], A4[:, :, 2], A4[:, :, 3]
        # (dg, df, di) = dc * F3, do = dh * Fo, with dc = dc_{t+1} f_{t+1} + dh * Fc: the
        # factors do not depend on the loop, so they are computed for all steps at once
        # (in place through one scratch array: fresh temporaries cost page faults here)
        F3 = xp.empty((T, batch, 3, u), A.dtype)
        tmp = xp.multiply(g, g)
        xp.subtract(1.0, tmp, out=tmp)
        xp.multiply(i, tmp, out=F3[:, :, 0])
        xp.subtract(1.0, f, out=tmp)
        tmp *= f
        xp.multiply(C[:-1], tmp, out=F3[:, :, 1])
        xp.subtract(1.0, i, out=tmp)
        tmp *= i
        xp.multiply(g, tmp, out=F3[:, :, 2])
        Fo = xp.subtract(1.0, o)
        Fo *= o
        Fo *= TC
        Fc = xp.multiply(TC, TC, out=tmp)
        xp.subtract(1.0, Fc, out=Fc)
        Fc *= o
        W_hh = params["W_hh"]
        dG = xp.empty((T, batch, gu), A.dtype)
        dG4 = dG.reshape(T, batch, 4, u)
        dh = self._initial_grads(xp, A.dtype, batch, dh_last)
        dc = xp.zeros((batch, u), A.dtype)
        dcn = xp.empty((batch, u), A.dtype)
        for t in reversed(range(T)):
            if dYt is not None:
                dh += dYt[t]
            dh_new, dh_kept = _split_grad(xp, valid, t, dh)
            dc_new, dc_kept = _split_grad(xp, valid, t, dc)
            xp.multiply(dh_new, Fc[t], out=dcn)
            dcn += dc_new
            xp.multiply(dcn[:, None, :], F3[t], out=dG4[t, :, :3])
            xp.multiply(dh_new, Fo[t], out=dG4[t, :, 3])
            dc = dcn * f[t]
            dh = dG[t] @ W_hh
            if dh_kept is not None:
                dc += dc_kept
                dh += dh_kept
        return dG, dG


@register
class GRU(Recurrent):
    """Gated recurrent unit, ``torch.nn.GRU`` (gates in PyTorch order r, z, n).

    With ``Gi = W_ih x_t + b_ih`` and ``Gh = W_hh h_{t-1} + b_hh``, each split into three
    blocks of ``units``::

        r_t = sigmoid(Gi_r + Gh_r)
        z_t = sigmoid(Gi_z + Gh_z)
        n_t = tanh(Gi_n + r_t * Gh_n)
        h_t = (1 - z_t) * n_t + z_t * h_{t-1}      (h_0 = 0)

    Args:
        units: size of the hidden state.
        return_sequences, mask_value, use_bias, kernel_initializer, recurrent_initializer,
        bias_initializer, input_shape, name: see ``Recurrent``.

    Shape:
        input ``(batch, time, n_in)``; output ``(batch, time, units)`` with
        ``return_sequences=True``, else ``(batch, units)``; params ``W_ih (3*units, n_in)``,
        ``W_hh (3*units, units)``, ``b_ih``, ``b_hh`` ``(3*units,)``.

    Example:
        >>> import numpy as np
        >>> from rddtensor.layers.recurrent import GRU
        >>> gru = GRU(4, return_sequences=True, mask_value=0.0)
        >>> gru.build((3, 2))
        (3, 4)
        >>> Y = gru(gru.init_params(np.random.default_rng(0)), np.ones((1, 3, 2)))
        >>> Y.shape
        (1, 3, 4)
    """

    _gates = 3

    def _projection(self, xp, params):
        # b_hh stays inside the recurrence: r multiplies W_hh h + b_hh in the n gate
        return params["W_ih"], params["b_ih"] if self.use_bias else None

    def _scan(self, xp, XW, params, valid):
        T, batch, gu = XW.shape
        u = self.units
        b_hh = params["b_hh"] if self.use_bias else None
        W_hhT = params["W_hh"].T
        dtype = XW.dtype
        A = xp.empty((T, batch, gu), dtype)        # r, z, n
        HW = xp.empty((T, batch, gu), dtype)       # W_hh h_{t-1} + b_hh (its n block is needed)
        H = xp.zeros((T + 1, batch, u), dtype)
        for t in range(T):
            hw, a = HW[t], A[t]
            xp.matmul(H[t], W_hhT, out=hw)
            if b_hh is not None:
                hw += b_hh
            rz = a[:, :2 * u]
            xp.add(XW[t, :, :2 * u], hw[:, :2 * u], out=rz)
            _sigmoid_(xp, rz)
            n = a[:, 2 * u:]
            xp.multiply(a[:, :u], hw[:, 2 * u:], out=n)
            n += XW[t, :, 2 * u:]
            xp.tanh(n, out=n)
            h = H[t] - n
            h *= a[:, u:2 * u]
            h += n                                  # n + z * (h_{t-1} - n)
            H[t + 1] = _carry(xp, valid, t, h, H[t])
        return H, (A, HW, H)

    def _scan_backward(self, xp, cache, params, valid, dYt, dh_last):
        A, HW, H = cache
        T, batch, gu = A.shape
        u = self.units
        r, z, n = A[:, :, :u], A[:, :, u:2 * u], A[:, :, 2 * u:]
        Fn = (1.0 - z) * (1.0 - n * n)             # d pre-activation of n / d h_t
        Fh = xp.empty((T, batch, 3, u), A.dtype)   # dGh = dh_t * Fh
        Fh[:, :, 0] = Fn * HW[:, :, 2 * u:] * r * (1.0 - r)
        Fh[:, :, 1] = (H[:-1] - n) * z * (1.0 - z)
        Fh[:, :, 2] = Fn * r
        W_hh = params["W_hh"]
        dGh = xp.empty((T, batch, gu), A.dtype)
        dGh3 = dGh.reshape(T, batch, 3, u)
        dH = xp.empty((T, batch, u), A.dtype)      # gradient into each step's new state
        dh = self._initial_grads(xp, A.dtype, batch, dh_last)
        for t in reversed(range(T)):
            if dYt is not None:
                dh = dh + dYt[t]
            dh_new, dh_kept = _split_grad(xp, valid, t, dh)
            dH[t] = dh_new
            xp.multiply(dh_new[:, None, :], Fh[t], out=dGh3[t])
            dh = dGh[t] @ W_hh
            dh += dh_new * z[t]
            if dh_kept is not None:
                dh += dh_kept
        dGi = dGh.copy()  # the input side differs only in the n block (no factor r)
        dGi[:, :, 2 * u:] = dH * Fn
        return dGi, dGh

"""The training floor: the model protocol, the shared Keras API (``keras_api``), ``Sequential``
and graph models (``graph``, ``outputs``), the step functions, batching, ``fit_loop`` and the
in-process runner, callbacks, history, the checkpoint format and model files.

It builds on the math floor (``rddtensor.layers``, ``rddtensor.optim``) and knows nothing of
Spark: the Spark engine (``rddtensor.spark``) registers itself in
``rddtensor.training.engines`` and calls these step functions inside its tasks. Users reach the
public names through ``rddtensor.layers`` (``L.Sequential``, ``L.Model``, ``L.load_model``,
``L.History``), and ``fit``'s epoch order ``BlockShuffle`` here (``from rddtensor.training
import BlockShuffle``).
"""
from rddtensor.training.batching import BlockShuffle

__all__ = ["BlockShuffle"]

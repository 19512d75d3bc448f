"""Neural-network layers: forward and backprop on one partition's local arrays.

The layers are math (the floor below training). ``Sequential``, ``Model`` (graph models:
``L.Model(inputs, outputs)`` over ``L.Input`` tensors), ``load_model``, ``History`` and
``ParamLayout`` live in the training floor (``rddtensor.training``); this package hands them on
on first use, so users write ``L.Sequential`` and the training floor may import the layers.

Example:
    >>> from rddtensor import layers as L
    >>> model = L.Sequential([L.Dense(8, activation="relu", input_shape=(4,)), L.Dense(2)])
    >>> model.count_params()
    58
"""
import importlib

from rddtensor.layers.activations import (ELU, GELU, Activation, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh,
                                get_activation)
from rddtensor.layers.attention import MultiHeadAttention, PositionalEmbedding, TransformerEncoderLayer
from rddtensor.layers.base import Input, Layer, SymbolicTensor, layer_class, register
from rddtensor.layers.conv import Conv1D, Conv2D, Conv2DTranspose
from rddtensor.layers.core import Dropout, Flatten, Reshape
from rddtensor.layers.dense import Dense
from rddtensor.layers.embedding import Embedding
from rddtensor.layers.merge import Add, Average, Concatenate, Dot, Multiply, Subtract
from rddtensor.layers.normalization import BatchNorm, LayerNorm
from rddtensor.layers.pooling import (AvgPool2D, GlobalAveragePooling1D, GlobalAveragePooling2D,
                                     GlobalAvgPool2D, GlobalMaxPooling1D, MaxPool1D, MaxPool2D,
                                     UpSampling2D)
from rddtensor.layers.recurrent import GRU, LSTM, SimpleRNN
from rddtensor.layers.wrappers import Bidirectional, TimeDistributed

__all__ = [
    "Layer", "register", "layer_class", "Sequential", "History", "load_model", "ParamLayout",
    "BlockShuffle", "Input", "SymbolicTensor", "Model",
    "Add", "Subtract", "Multiply", "Average", "Concatenate", "Dot",
    "Dense", "Dropout", "Flatten", "Reshape", "Activation", "get_activation",
    "ReLU", "LeakyReLU", "ELU", "GELU", "Sigmoid", "Tanh", "Softmax", "BatchNorm", "LayerNorm",
    "Embedding", "SimpleRNN", "LSTM", "GRU", "Bidirectional", "TimeDistributed",
    "Conv1D", "Conv2D", "Conv2DTranspose", "MaxPool1D", "MaxPool2D", "AvgPool2D",
    "GlobalAvgPool2D", "UpSampling2D",
    "MultiHeadAttention", "TransformerEncoderLayer", "PositionalEmbedding",
    "GlobalAveragePooling1D", "GlobalMaxPooling1D", "GlobalAveragePooling2D",
]

#: training-floor names this face hands on (imported on first use: the training floor imports
#: these layers, so an eager import here would be a loop)
_TRAINING = {"Sequential": "rddtensor.training.sequential", "Model": "rddtensor.training.graph",
             "load_model": "rddtensor.training.models",
             "History": "rddtensor.training.history", "ParamLayout": "rddtensor.training.params",
             "BlockShuffle": "rddtensor.training.batching"}


def __getattr__(name):
    module = _TRAINING.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_TRAINING))

"""Neural-network layers: forward and backprop on one partition's local arrays.

Example:
    >>> from rddtensor import layers as L
    >>> model = L.Sequential([L.Dense(8, activation="relu", input_shape=(4,)), L.Dense(2)])
    >>> model.count_params()
    58
"""
from rddtensor.layers.activations import (ELU, GELU, Activation, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh,
                                get_activation)
from rddtensor.layers.base import Layer, layer_class, register
from rddtensor.layers.conv import Conv1D, Conv2D, Conv2DTranspose
from rddtensor.layers.core import Dropout, Flatten, Reshape
from rddtensor.layers.dense import Dense
from rddtensor.layers.embedding import Embedding
from rddtensor.layers.history import History
from rddtensor.layers.normalization import BatchNorm, LayerNorm
from rddtensor.layers.params import ParamLayout
from rddtensor.layers.pooling import AvgPool2D, GlobalAvgPool2D, MaxPool1D, MaxPool2D, UpSampling2D
from rddtensor.layers.recurrent import GRU, LSTM, SimpleRNN
from rddtensor.layers.sequential import Sequential, load_model
from rddtensor.layers.wrappers import Bidirectional, TimeDistributed

__all__ = [
    "Layer", "register", "layer_class", "Sequential", "History", "load_model", "ParamLayout",
    "Dense", "Dropout", "Flatten", "Reshape", "Activation", "get_activation",
    "ReLU", "LeakyReLU", "ELU", "GELU", "Sigmoid", "Tanh", "Softmax", "BatchNorm", "LayerNorm",
    "Embedding", "SimpleRNN", "LSTM", "GRU", "Bidirectional", "TimeDistributed",
    "Conv1D", "Conv2D", "Conv2DTranspose", "MaxPool1D", "MaxPool2D", "AvgPool2D",
    "GlobalAvgPool2D", "UpSampling2D",
]

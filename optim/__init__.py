"""Optimizers, learning-rate schedules, gradient clipping, losses and metrics.

Everything here computes on one process's arrays (NumPy or CuPy via ``rddtensor.backend``) and
never imports pyspark: the distributed engine applies the same update functions to parameter
blocks.
"""
from rddtensor.optim.clipping import clip_by_global_norm, clip_by_value, global_norm
from rddtensor.optim.losses import (Loss, binary_crossentropy, categorical_crossentropy, get_loss, hinge,
                          huber, mae, mse, sparse_categorical_crossentropy)
from rddtensor.optim.metrics import Metric, get_metric
from rddtensor.optim.optimizers import (LAMB, LARS, SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop,
                              adagrad_update, adam_update, get_optimizer, lamb_update, lars_update,
                              rmsprop_update, sgd_update)
from rddtensor.optim.schedules import (Constant, CosineDecay, ExponentialDecay, LinearWarmup, Schedule,
                             StepDecay, get_schedule)

__all__ = [
    "Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "LARS", "LAMB", "get_optimizer",
    "sgd_update", "adam_update", "rmsprop_update", "adagrad_update", "lars_update", "lamb_update",
    "Schedule", "Constant", "StepDecay", "ExponentialDecay", "CosineDecay", "LinearWarmup",
    "get_schedule", "clip_by_global_norm", "clip_by_value", "global_norm",
    "Loss", "get_loss", "mse", "mae", "huber", "binary_crossentropy", "categorical_crossentropy",
    "sparse_categorical_crossentropy", "hinge", "Metric", "get_metric",
]

"""Time-series forecasting with a GRU: predict the next value of a noisy seasonal series.

A series with a daily and a weekly cycle plus noise (hourly values) is cut into sliding windows
of the last 48 hours -> the next hour, as a Spark DataFrame with an array ``features`` column of
shape (48, 1) per row. The first 80% of the timeline trains a GRU (then a Dense read-out); the
last 20% is the test period. The forecast beats the naive "same as an hour ago" forecast.

Run:  python examples/gru_forecasting.py      (RDDTENSOR_QUICK=1: shorter series, fewer epochs)
"""
import os

import numpy as np

from rddtensor import layers as L
from rddtensor.optim import Adam
from rddtensor.spark.session import get_spark

QUICK = bool(os.environ.get("RDDTENSOR_QUICK"))
WINDOW = 48


def series(n_hours, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n_hours)
    return (np.sin(2 * np.pi * t / 24) + 0.5 * np.sin(2 * np.pi * t / (24 * 7))
            + rng.normal(scale=0.1, size=n_hours)).astype(np.float32)


def windows(x):
    """Rows ``(x[i:i+WINDOW] as (WINDOW, 1), x[i+WINDOW])``."""
    idx = np.arange(len(x) - WINDOW)[:, None] + np.arange(WINDOW)
    return x[idx][..., None], x[WINDOW:]


def main():
    spark = get_spark()
    spark.sparkContext.setLogLevel("ERROR")
    x = series(24 * (60 if QUICK else 120))
    X, y = windows(x)
    split = int(0.8 * len(X))
    df = spark.createDataFrame([(w.tolist(), float(t)) for w, t in zip(X[:split], y[:split])],
                               ["features", "label"]).repartition(2)

    model = L.Sequential([L.GRU(16, input_shape=(WINDOW, 1)), L.Dense(1)], seed=0)
    model.compile(optimizer=Adam(1e-2), loss="mse", metrics=["rmse"])
    model.fit(df, epochs=6 if QUICK else 12, batch_size=128)

    forecast = model.predict(X[split:]).ravel()
    rmse = float(np.sqrt(np.mean((forecast - y[split:]) ** 2)))
    naive = float(np.sqrt(np.mean((X[split:, -1, 0] - y[split:]) ** 2)))
    print(f"test period ({len(forecast)} hours): GRU rmse {rmse:.4f}, naive 'same as an hour "
          f"ago' rmse {naive:.4f}, noise level 0.1")
    assert rmse < 0.8 * naive, "the GRU forecast should beat the naive forecast"


if __name__ == "__main__":
    main()

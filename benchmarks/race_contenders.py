"""The five contenders of the digits race, each as "train once with this config and budget".

Every contender trains the same 64-128-64-10 ReLU network (softmax cross-entropy) on the same
rows and is scored on the same 450 held-out test images. ``train(config, budget)`` returns
``{"wall_s", "accuracy", "steps"}``: ``wall_s`` is the clock around the training call only,
from an untrained model definition to trained weights in the driver process; ``accuracy`` is
computed afterwards, off the clock. ``budget`` is epochs, or L-BFGS/GD iterations for MLlib.

- ``rddtensor-distributed``: ``model.fit(train_df, ...)`` on ``local[2]`` (the engine's
  all-reduce; the DataFrame read through Arrow batches; up to 32 iterations per Spark job,
  across epoch ends; weights gathered to the driver at the end of ``fit``).
- ``rddtensor-inprocess``: ``model.fit(X, y, ...)`` on numpy arrays.
- ``mllib-mlpc``: ``MultilayerPerceptronClassifier(...).fit(train_df)``.
- ``torchdistributor``: ``TorchDistributor(local_mode=True, num_processes=2, use_gpu=False)
  .run(fn, ...)`` with DDP (gloo); the arrays travel pickled with the function (the cheapest
  way in for it: no Parquet/Petastorm); rank 0's weights come back as numpy.
- ``pytorch``: a plain PyTorch loop in this process on tensors.

Both PyTorch contenders use the same batches: one permutation per epoch from
``default_rng([seed, epoch])``; DDP rank r takes rows ``r::2`` of each global batch, and DDP's
gradient average over two half-batches equals the full batch's mean gradient.
"""
from __future__ import annotations

import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (64, 128, 64, 10)
CONTENDERS = ("rddtensor-distributed", "rddtensor-inprocess", "mllib-mlpc", "torchdistributor",
              "pytorch")
SPARK_CONTENDERS = ("rddtensor-distributed", "mllib-mlpc", "torchdistributor")


# --- data -----------------------------------------------------------------------------------------
def race_data(replicas: int = 20, noise: float = 0.05, seed: int = 0):
    """Digits x``replicas``: the 1,347 training images of ``load_digits`` (75/25 split,
    ``random_state=0``, features / 16) replicated with Gaussian noise (sd ``noise``, fixed seed);
    the 450 test images unchanged. Returns ``Xtr, ytr, Xte, yte`` (float32, int64)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    X, y = (d.data / 16).astype(np.float32), d.target.astype(np.int64)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
    rng = np.random.default_rng(seed)
    reps = [Xtr + rng.normal(0.0, noise, Xtr.shape).astype(np.float32) for _ in range(replicas)]
    return np.concatenate(reps), np.tile(ytr, replicas), Xte, yte


def spark_frames(spark, Xtr, ytr, Xte, yte, partitions: int = 2):
    """Cached, materialised DataFrames ``(train, test)`` with ``features`` (vector), ``label``.

    Partition j holds the j-th consecutive slice of the rows, so the rows keep their global
    order and the distributed engine takes exactly the in-process run's batches.
    """
    from pyspark.ml.linalg import Vectors, VectorUDT
    from pyspark.sql.types import DoubleType, StructField, StructType
    schema = StructType([StructField("features", VectorUDT()), StructField("label", DoubleType())])

    def frame(X, y):
        rows = [(Vectors.dense(x.astype(np.float64)), float(v)) for x, v in zip(X, y)]
        df = spark.createDataFrame(spark.sparkContext.parallelize(rows, partitions),
                                   schema).cache()
        df.count()
        return df
    return frame(Xtr, ytr), frame(Xte, yte)


# --- rddtensor ------------------------------------------------------------------------------------
def make_optimizer(cfg: dict):
    """An ``rddtensor.optim`` optimizer from a config: ``{"optimizer", "lr", "warmup"?, "decay"?}``."""
    from rddtensor.optim import LAMB, LARS, Adam, ExponentialDecay, LinearWarmup
    lr = cfg["lr"]
    if cfg.get("decay"):
        lr = ExponentialDecay(lr, decay_rate=cfg["decay"])
    if cfg.get("warmup"):
        lr = LinearWarmup(lr, cfg["warmup"], start_factor=0.1)
    cls = {"adam": Adam, "lamb": LAMB, "lars": LARS}[cfg["optimizer"]]
    return cls(lr)


def rddtensor_model(cfg: dict, seed: int = 0):
    from rddtensor import layers as L
    model = L.Sequential([L.Dense(SIZES[1], activation="relu", input_shape=(SIZES[0],)),
                          L.Dense(SIZES[2], activation="relu"), L.Dense(SIZES[3])], seed=seed)
    model.compile(optimizer=make_optimizer(cfg), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def rddtensor_accuracy(model, Xte, yte) -> float:
    return float(model.evaluate(Xte, yte)["accuracy"])


def rddtensor_epoch_curve(cfg, Xtr, ytr, Xte, yte, max_epochs: int, target: float) -> list:
    """Test accuracy after each epoch of one in-process fit (stops at ``target``): the search.

    The distributed engine takes the same batches and the same updates (to float rounding), so
    its curve is this one.
    """
    model, curve = rddtensor_model(cfg), []

    class Reached(Exception):
        pass

    def check(epoch, logs):
        curve.append(rddtensor_accuracy(model, Xte, yte))
        if curve[-1] >= target:
            raise Reached
    try:
        model.fit(Xtr, ytr, epochs=max_epochs, batch_size=cfg["batch"], verbose=0, seed=0,
                  callbacks=[check])
    except Reached:
        pass
    return curve


def train_rddtensor_inprocess(cfg, epochs, data) -> dict:
    Xtr, ytr, Xte, yte = data["arrays"]
    t0 = time.perf_counter()
    model = rddtensor_model(cfg)
    model.fit(Xtr, ytr, epochs=epochs, batch_size=cfg["batch"], verbose=0, seed=0)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "accuracy": rddtensor_accuracy(model, Xte, yte),
            "steps": int(model.step)}


def train_rddtensor_distributed(cfg, epochs, data) -> dict:
    from rddtensor.training.batching import steps_per_epoch
    Xtr, ytr, Xte, yte = data["arrays"]
    # no validation or callbacks: one Spark job may run across epoch ends, so the whole fit
    # (up to 32 iterations of lineage) runs as one job
    steps = epochs * steps_per_epoch(len(Xtr), cfg["batch"])
    t0 = time.perf_counter()
    model = rddtensor_model(cfg)
    history = model.fit(data["train_df"], epochs=epochs, batch_size=cfg["batch"], verbose=0,
                        seed=0, allreduce=cfg.get("allreduce", "auto"),
                        iterations_per_job=cfg.get("iterations_per_job", min(steps, 32)))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "accuracy": rddtensor_accuracy(model, Xte, yte),
            "steps": int(model.step), "allreduce": history.params.get("allreduce"),
            "partitions": history.params.get("partitions")}


# --- MLlib ----------------------------------------------------------------------------------------
def train_mlpc(cfg, max_iter, data) -> dict:
    from pyspark.ml.classification import MultilayerPerceptronClassifier
    t0 = time.perf_counter()
    mlpc = MultilayerPerceptronClassifier(layers=list(SIZES), solver=cfg["solver"],
                                          maxIter=int(max_iter), blockSize=cfg["block_size"],
                                          stepSize=cfg.get("step_size", 0.03), seed=0)
    model = mlpc.fit(data["train_df"])
    wall = time.perf_counter() - t0
    pred = model.transform(data["test_df"]).select("label", "prediction").toPandas()
    acc = float((pred["label"] == pred["prediction"]).mean())
    return {"wall_s": wall, "accuracy": acc, "steps": int(max_iter)}


# --- PyTorch --------------------------------------------------------------------------------------
def torch_net(seed: int = 0):
    import torch
    from torch import nn
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.ReLU(), nn.Linear(SIZES[1], SIZES[2]),
                         nn.ReLU(), nn.Linear(SIZES[2], SIZES[3]))


def torch_accuracy(net, Xte, yte) -> float:
    import torch
    with torch.no_grad():
        pred = net(torch.from_numpy(Xte)).argmax(1).numpy()
    return float((pred == yte).mean())


def torch_epochs(net, X, y, cfg, epochs, *, rank=0, world=1, seed=0, on_epoch=None) -> int:
    """Adam on the global batches of ``cfg["batch"]`` rows; this rank takes rows ``rank::world``.

    Returns the number of optimizer steps taken.
    """
    import torch
    from torch import nn
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    loss_fn = nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    n, batch, steps = len(X), cfg["batch"], 0
    for epoch in range(epochs):
        order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
        for a in range(0, n, batch):
            rows = order[a:a + batch][rank::world]
            opt.zero_grad(set_to_none=True)
            loss_fn(net(Xt[rows]), yt[rows]).backward()
            opt.step()
            steps += 1
        if on_epoch is not None and on_epoch(epoch):
            break
    return steps


def torch_epoch_curve(cfg, Xtr, ytr, Xte, yte, max_epochs: int, target: float) -> list:
    """Test accuracy after each epoch of one PyTorch run (stops at ``target``): the search."""
    net, curve = torch_net(), []

    def check(epoch):
        curve.append(torch_accuracy(net, Xte, yte))
        return curve[-1] >= target
    torch_epochs(net, Xtr, ytr, cfg, max_epochs, on_epoch=check)
    return curve


def train_pytorch(cfg, epochs, data) -> dict:
    Xtr, ytr, Xte, yte = data["arrays"]
    t0 = time.perf_counter()
    net = torch_net()
    steps = torch_epochs(net, Xtr, ytr, cfg, epochs)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "accuracy": torch_accuracy(net, Xte, yte), "steps": steps}


def ddp_train(X, y, cfg, epochs, threads):
    """The TorchDistributor training function: DDP over gloo, returns (steps, weights)."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        net = torch_net()
        model = DDP(net)
        steps = torch_epochs(model, X, y, cfg, epochs, rank=rank, world=world)
        return steps, [p.detach().numpy().copy() for p in net.parameters()]
    finally:
        dist.destroy_process_group()


def train_torchdistributor(cfg, epochs, data) -> dict:
    import torch
    from pyspark.ml.torch.distributor import TorchDistributor
    Xtr, ytr, Xte, yte = data["arrays"]
    procs = cfg.get("num_processes", 2)
    threads = max(1, (os.cpu_count() or 1) // procs)
    # the training function is found by module path in the torchrun processes
    path = os.environ.get("PYTHONPATH", "")
    if ROOT not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = ROOT + (os.pathsep + path if path else "")
    t0 = time.perf_counter()
    steps, weights = TorchDistributor(local_mode=True, num_processes=procs, use_gpu=False).run(
        ddp_train, Xtr, ytr, cfg, epochs, threads)
    wall = time.perf_counter() - t0
    net = torch_net()
    with torch.no_grad():
        for p, w in zip(net.parameters(), weights):
            p.copy_(torch.from_numpy(w))
    return {"wall_s": wall, "accuracy": torch_accuracy(net, Xte, yte), "steps": int(steps)}


TRAIN = {"rddtensor-distributed": train_rddtensor_distributed,
         "rddtensor-inprocess": train_rddtensor_inprocess, "mllib-mlpc": train_mlpc,
         "torchdistributor": train_torchdistributor, "pytorch": train_pytorch}

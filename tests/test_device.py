"""``rddtensor.spark.device``: which device a task uses, the executor-local cache, the discovery script.

These run on any machine. The choice logic is exercised by switching ``backend``'s answers
(cupy installed, GPUs visible) with monkeypatch: that checks the messages and the fallback
rules, not CUDA. The cache is device-agnostic and is tested with NumPy values. What needs a GPU
(``Placement``'s copies, a distributed fit on CuPy) is in ``tests/test_gpu_training.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from rddtensor import layers as L
from rddtensor import backend
from rddtensor.spark import device
from rddtensor.cli import main


def gpus(*addresses):
    """What ``TaskContext.resources()`` holds when Spark assigned GPUs to a task."""
    return {"gpu": SimpleNamespace(name="gpu", addresses=list(addresses))}


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(device, "_WARNED", set())


@pytest.fixture
def cupy_without_gpu(monkeypatch, fresh_warnings):
    monkeypatch.setattr(backend, "has_cupy", lambda: True)
    monkeypatch.setattr(backend, "gpu_available", lambda: False)


# --- the device option ----------------------------------------------------------------------------
def test_check_device_accepts_the_three_choices_and_names_them():
    assert [backend.check_device(d) for d in ("auto", "CPU", "gpu")] == ["auto", "cpu", "gpu"]
    with pytest.raises(ValueError, match=r"device must be one of 'auto', 'cpu', 'gpu', got 'tpu'"):
        backend.check_device("tpu")
    with pytest.raises(ValueError, match="got 0"):
        backend.check_device(0)


def test_compile_validates_and_stores_the_device():
    model = L.Sequential([L.Dense(2, input_shape=(3,))], seed=0)
    assert model.device == "auto"
    model.compile(loss="mse", device="CPU")
    assert model.device == "cpu"
    with pytest.raises(ValueError, match="device must be one of"):
        model.compile(loss="mse", device="cuda")


def test_in_process_fit_refuses_device_gpu():
    model = L.Sequential([L.Dense(2, input_shape=(3,))], seed=0)
    model.compile(loss="mse", device="gpu")
    with pytest.raises(ValueError, match="fit on numpy arrays trains in-process on NumPy; pass an "
                                         "RDD or DataFrame"):
        model.fit(np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32), verbose=0)


# --- Spark's GPU address -> CUDA ordinal ----------------------------------------------------------
@pytest.mark.parametrize("address, visible, count, ordinal", [
    ("1", None, 2, 1),        # no CUDA_VISIBLE_DEVICES: the address is the ordinal
    ("3", "2,3", 2, 1),       # renumbered by CUDA_VISIBLE_DEVICES
    (" 2 ", "0, 2", 2, 1),
    ("5", None, 1, 0),        # isolated: the only visible device, whatever its host index
    ("GPU-1f2e", "GPU-1f2e", 1, 0),  # UUIDs in CUDA_VISIBLE_DEVICES
])
def test_gpu_ordinal(address, visible, count, ordinal):
    assert backend.gpu_ordinal(address, visible=visible, count=count) == ordinal


def test_gpu_ordinal_out_of_range_says_what_the_discovery_script_must_print():
    with pytest.raises(ValueError, match=r"address '4' but this process sees 2 device\(s\).*"
                                         r"nvidia-smi"):
        backend.gpu_ordinal("4", visible="", count=2)


# --- choosing the device --------------------------------------------------------------------------
def test_cpu_is_numpy_whatever_is_installed(cupy_without_gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device.choose_device("cpu", gpus("0")) is None


def test_auto_without_cupy_is_numpy_and_silent(monkeypatch, fresh_warnings):
    monkeypatch.setattr(backend, "has_cupy", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device.choose_device("auto", None) is None


def test_auto_with_cupy_but_no_gpu_warns_once_and_uses_numpy(cupy_without_gpu):
    with pytest.warns(RuntimeWarning, match=r"cupy is installed but sees no CUDA GPU .*"
                                            r"spark.executor.resource.gpu.amount.*"
                                            r"computing on NumPy"):
        assert device.choose_device("auto", None) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per worker, not once per task
        assert device.choose_device("auto", None) is None


def test_auto_with_a_spark_gpu_but_no_cupy_names_the_extra(monkeypatch, fresh_warnings):
    monkeypatch.setattr(backend, "has_cupy", lambda: False)
    with pytest.warns(RuntimeWarning, match=r"pip install rddtensor\[gpu\].*address\(es\) "
                                            r"\['1'\]"):
        assert device.choose_device("auto", gpus("1")) is None


def test_gpu_requested_without_a_gpu_fails_with_the_reason(cupy_without_gpu):
    with pytest.raises(RuntimeError, match=r"device='gpu' was requested, but cupy is installed "
                                           r"but sees no CUDA GPU .*device='auto'"):
        device.choose_device("gpu", gpus("0"))


def test_gpu_visible_picks_sparks_address(monkeypatch):
    picked = []
    monkeypatch.setattr(backend, "gpu_available", lambda: True)
    monkeypatch.setattr(backend, "device_count", lambda: 2)
    monkeypatch.setattr(backend, "select_device", lambda i: picked.append(i) or i)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device.choose_device("auto", gpus("1")) == 1
    monkeypatch.setenv("RDDTENSOR_DEVICE", "0")
    assert device.choose_device("gpu", {}) == 0
    assert picked == [1, 0]


def test_task_placement_is_none_here_and_outside_spark_there_are_no_resources():
    if backend.gpu_available():
        pytest.skip("this machine has a GPU")
    assert device.task_resources() is None
    arrays = {"X": np.zeros((2, 3), np.float32), "y": np.zeros(2, np.float32)}
    assert device.task_placement("cpu", {"j": 0, "n": 2}, arrays) is None


# --- the executor-local cache ---------------------------------------------------------------------
def test_cache_hits_on_the_same_version_and_rebuilds_on_a_new_one():
    cache, built = device.DeviceCache(max_bytes=None), []

    def make(tag):
        return lambda: built.append(tag) or {"X": np.full(4, tag)}

    a = cache.get(("shard", "run", 0), 3, make(1))
    assert cache.get(("shard", "run", 0), 3, make(2)) is a          # hit
    b = cache.get(("shard", "run", 0), 4, make(3))                  # new version replaces
    assert b["X"][0] == 3 and cache.get(("shard", "run", 0), 4, make(4)) is b
    assert built == [1, 3]
    assert cache.stats() == {"hits": 2, "misses": 2, "entries": 1, "bytes": b["X"].nbytes}


def test_cache_evicts_least_recently_used_by_entries_and_bytes():
    cache = device.DeviceCache(max_bytes=3 * 80, max_entries=10)
    for j in range(3):
        cache.get(j, 0, lambda: np.zeros(10))                       # 80 bytes each
    cache.get(0, 0, lambda: pytest.fail("0 is cached"))             # 0 is now the most recent
    cache.get(3, 0, lambda: np.zeros(10))                           # over 240 bytes: evict 1
    assert sorted(cache._entries) == [0, 2, 3]
    small = device.DeviceCache(max_bytes=None, max_entries=2)
    for j in range(3):
        small.get(j, 0, lambda: np.zeros(1))
    assert sorted(small._entries) == [1, 2]
    huge = device.DeviceCache(max_bytes=10)                         # bigger than the limit:
    assert huge.get("big", 0, lambda: np.zeros(100)).size == 100    # kept, alone
    assert huge.stats()["entries"] == 1


def test_cache_empties_itself_and_retries_once_when_memory_runs_out():
    cleared = []
    cache = device.DeviceCache(on_clear=lambda: cleared.append(True))
    cache.get("a", 0, lambda: np.zeros(2))
    calls = []

    def make():
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("out of device memory")
        return np.ones(2)

    assert cache.get("b", 0, make)[0] == 1
    assert calls == [1, 1] and cleared == [True] and sorted(cache._entries) == ["b"]
    with pytest.raises(MemoryError):  # an empty cache has nothing to give back: no retry
        device.DeviceCache().get("c", 0, lambda: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(ValueError):   # other errors pass through untouched
        cache.get("d", 0, lambda: (_ for _ in ()).throw(ValueError("bad")))


def test_cache_size_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv("RDDTENSOR_DEVICE_CACHE_MB", "0.5")
    assert device._default_limit() == 2 ** 19


def test_pinned_buffer_is_reused_and_plain_numpy_without_a_gpu():
    a = device.pinned_buffer("test", 8, np.float32)
    b = device.pinned_buffer("test", 5, np.float32)
    assert b.size == 5 and np.shares_memory(a, b)
    assert device.pinned_buffer("test", 9, np.float32).size == 9


# --- discovery script and info --------------------------------------------------------------------
def _run_script(path_dirs):
    env = dict(os.environ, PATH=os.pathsep.join(path_dirs))
    return subprocess.run([device.discovery_script_path()], capture_output=True, text=True,
                          env=env, timeout=30)


def test_discovery_script_prints_sparks_resource_format(tmp_path):
    path = device.discovery_script_path()
    assert os.access(path, os.X_OK), f"{path} must be executable"
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nprintf '0\\n1\\n3\\n'\n")
    smi.chmod(0o755)
    r = _run_script([str(tmp_path), "/usr/bin", "/bin"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"name": "gpu", "addresses": ["0", "1", "3"]}


def test_discovery_script_without_nvidia_smi_finds_no_gpus(tmp_path):
    r = _run_script([str(tmp_path), "/usr/bin", "/bin"]) if not any(
        os.path.exists(os.path.join(d, "nvidia-smi")) for d in ("/usr/bin", "/bin")) else None
    if r is None:
        pytest.skip("nvidia-smi is installed in /usr/bin")
    assert r.returncode == 0 and json.loads(r.stdout) == {"name": "gpu", "addresses": []}


def test_discovery_script_reports_a_failing_nvidia_smi(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    smi.chmod(0o755)
    r = _run_script([str(tmp_path), "/usr/bin", "/bin"])
    assert r.returncode == 1 and "driver" in r.stderr


def test_info_reports_the_device_and_the_discovery_script(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(li for li in out.splitlines() if li.startswith("device    "))
    assert ("gpu 0:" in line) if backend.gpu_available() else line.startswith("device    cpu")
    assert device.discovery_script_path() in out
    assert main(["info", "--gpu-discovery-script"]) == 0
    assert capsys.readouterr().out.strip() == device.discovery_script_path()


def test_no_gpu_line_names_the_extra_or_the_missing_device(monkeypatch, capsys):
    from rddtensor import cli
    monkeypatch.setattr(backend, "has_cupy", lambda: True)
    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    assert "cupy is installed but sees no CUDA GPU" in cli._device_line()
    monkeypatch.setattr(backend, "has_cupy", lambda: False)
    assert "pip install rddtensor[gpu]" in cli._device_line()


# --- through Spark --------------------------------------------------------------------------------
@pytest.mark.spark
def test_distributed_fit_with_device_gpu_and_no_gpu_fails_with_the_reason(sc):
    if backend.gpu_available():
        pytest.skip("this machine has a GPU")
    rng = np.random.default_rng(0)
    rows = [(x, np.float32(x.sum())) for x in rng.standard_normal((8, 3)).astype(np.float32)]
    model = L.Sequential([L.Dense(1, input_shape=(3,))], seed=0)
    model.compile(optimizer="sgd", loss="mse", device="gpu")
    with pytest.raises(Exception, match=r"device='gpu' was requested, but cupy is not installed"):
        model.fit(sc.parallelize(rows, 2), epochs=1, batch_size=4, verbose=0)
    model.compile(optimizer="sgd", loss="mse", device="cpu")  # and "cpu" trains as "auto" does
    model.fit(sc.parallelize(rows, 2), epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(model.get_weights()[0]).all()

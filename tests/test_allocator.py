"""``rddtensor.allocator``: training steps set glibc's malloc thresholds once per process, so the
temporaries of one step reuse the pages of the last instead of faulting in fresh ones.

Each case runs in a fresh interpreter: the settings are process-wide and stay set.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc malloc settings (Linux only)")

# a step's worth of temporaries: four 3 MB arrays, written, then freed together (with glibc's
# defaults the freed top of the heap exceeds its trim threshold and goes back to the kernel)
_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from rddtensor import layers as L
    from rddtensor import allocator
    if sys.argv[1] == "fit":  # the in-process training step applies the settings itself
        m = L.Sequential([L.Dense(2, input_shape=(3,))], seed=0)
        m.compile(optimizer="sgd", loss="mse")
        m.fit(np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32), batch_size=4, verbose=0)
    def step():
        arrays = [np.empty(750_000, np.float32) for _ in range(4)]
        for a in arrays:
            a.fill(1.0)
    for _ in range(5):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
    print(json.dumps({"state": allocator._STATE.get("result"), "faults": faults}))
""")


def _probe(mode: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_training_step_tunes_malloc_and_temporaries_stop_faulting():
    untouched = _probe("none")
    tuned = _probe("fit")
    assert untouched["state"] is None and tuned["state"] == "tuned"
    assert untouched["faults"] > 1000  # ~2,900 pages of 4 KiB per step, every step
    assert tuned["faults"] < 50


def test_rddtensor_malloc_default_leaves_glibc_alone():
    got = _probe("fit", RDDTENSOR_MALLOC="default")
    assert got["state"] == "default"
    assert got["faults"] > 1000


def test_tune_malloc_is_idempotent():
    from rddtensor.allocator import tune_malloc
    first = tune_malloc()
    assert first in ("tuned", "default", "unavailable")
    assert tune_malloc() == first

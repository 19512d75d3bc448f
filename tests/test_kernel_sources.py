"""Every CUDA source in ``rddtensor.ops.cupy_ops`` compiles with NVRTC, for float and double.

Needs no GPU, only NVRTC (``libnvrtc.so``: the CUDA toolkit, or ``pip install
nvidia-cuda-nvrtc-cu12``; ``RDDTENSOR_NVRTC=/path/to/libnvrtc.so.12`` names it). Skips without
it. Each ``ElementwiseKernel`` operation is wrapped the way CuPy calls it (``i`` the element
index, raw arguments indexable, inputs const, outputs references) in a stand-in harness: this
checks that the operations are valid CUDA C++ for both types; that CuPy generates the same
wrapper is checked only by the ``gpu`` tests.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import re

import pytest

from rddtensor.ops import cupy_ops


def _find_nvrtc():
    names = [os.environ.get("RDDTENSOR_NVRTC"), ctypes.util.find_library("nvrtc")]
    try:
        import nvidia.cuda_nvrtc as pkg  # the pip wheel
        names += glob.glob(os.path.join(list(pkg.__path__)[0], "lib", "libnvrtc.so*"))
    except ImportError:
        pass
    for name in filter(None, names):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@pytest.fixture(scope="module")
def nvrtc():
    lib = _find_nvrtc()
    if lib is None:
        pytest.skip("NVRTC not found (pip install nvidia-cuda-nvrtc-cu12, or RDDTENSOR_NVRTC=)")
    return lib


def _compile(lib, source: str, name: str) -> str:
    """The NVRTC log; raises AssertionError with it when compilation fails."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None,
                                  None) == 0
    opts = [b"--gpu-architecture=compute_80", b"-std=c++14"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    status = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    text = log.value.decode(errors="replace")
    assert status == 0, f"{name} does not compile:\n{text}\n--- source ---\n{source}"
    return text


_HARNESS = """

typedef int int32;
template <typename U> struct Raw {
    U* p;
    __device__ U& operator[](ptrdiff_t k) const { return p[k]; }
};
"""


def _param(decl: str, ctype: str, out: bool):
    parts = decl.split()
    raw = parts[0] == "raw"
    typ, name = parts[-2], parts[-1]
    typ = ctype if typ == "T" else {"int32": "int"}.get(typ, typ)
    if raw:
        return f"Raw<{typ}> {name}", None
    if out:
        return f"{typ}* {name}_", f"{typ}& {name} = {name}_[i];"
    return f"const {typ}* {name}_", f"const {typ} {name} = {name}_[i];"


def _elementwise_source(name: str, ctype: str) -> str:
    in_params, out_params, operation = cupy_ops._ELEMENTWISE[name]
    args, binds = [], []
    for decls, out in ((in_params, False), (out_params, True)):
        for decl in decls.split(","):
            arg, bind = _param(decl.strip(), ctype, out)
            args.append(arg)
            if bind:
                binds.append(bind)
    body = "\n    ".join(binds)
    return (f"{_HARNESS}\n"
            f'extern "C" __global__ void k({", ".join(args)}, ptrdiff_t _n_elements) {{\n'
            f"    typedef {ctype} T;\n"
            f"    const ptrdiff_t i = (ptrdiff_t)blockIdx.x * blockDim.x + threadIdx.x;\n"
            f"    if (i >= _n_elements) return;\n    {body}\n{operation}\n}}\n")


@pytest.mark.parametrize("ctype", ["float", "double"])
@pytest.mark.parametrize("name", sorted(cupy_ops._ELEMENTWISE))
def test_elementwise_operation_compiles(nvrtc, name, ctype):
    _compile(nvrtc, _elementwise_source(name, ctype), f"{name}_{ctype}.cu")


@pytest.mark.parametrize("ctype", ["float", "double"])
def test_softmax_cross_entropy_source_compiles(nvrtc, ctype):
    source = (cupy_ops._SOFTMAX_XENT_SOURCE.replace("TYPE", ctype)
              .replace("BLOCK", str(cupy_ops._SOFTMAX_XENT_BLOCK)))
    _compile(nvrtc, source, f"softmax_xent_{ctype}.cu")


def test_harness_catches_a_broken_operation(nvrtc, monkeypatch):
    monkeypatch.setitem(cupy_ops._ELEMENTWISE, "broken", ("T x", "T y", "y = x +;"))
    with pytest.raises(AssertionError, match="does not compile"):
        _compile(nvrtc, _elementwise_source("broken", "float"), "broken.cu")


def test_the_sources_are_the_ones_cupy_ops_runs():
    # one ElementwiseKernel per name; the cell kernels of the recurrent layers are gone
    assert set(cupy_ops._ELEMENTWISE) == {
        "adam", "adam_amsgrad", "sgd_momentum", "sgd_plain", "relu_backward", "sigmoid_backward",
        "tanh_backward", "gelu_tanh_backward", "im2col", "col2im"}
    assert re.search(r"rdd_softmax_xent_TYPE", cupy_ops._SOFTMAX_XENT_SOURCE)

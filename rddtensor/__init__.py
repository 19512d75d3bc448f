"""rddtensor: deep learning on Apache Spark in pure Python."""
from rddtensor.backend import asarray, get_array_module, gpu_available, has_cupy, to_numpy

__version__ = "0.1.0"

__all__ = ["__version__", "asarray", "get_array_module", "gpu_available", "has_cupy", "to_numpy"]

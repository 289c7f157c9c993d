"""What this copy of ftops was compiled with."""
from __future__ import annotations

import torch

from . import _build_info


def build_info() -> dict:
    """Return what was compiled in.

    Keys: ``torch_built`` (the torch version the kernels were compiled against), ``torch_running``,
    ``cuda`` (whether CUDA kernels are compiled in), ``cuda_archs`` (the CUDA architectures, CMake
    syntax), ``nvcc``, ``torch_cuda`` (the CUDA version of the torch it was built against),
    ``cpu_threads`` (``torch.get_num_threads()``, the threads the CPU kernels use),
    ``parallel_backend`` (OpenMP or native, as torch reports it) and ``cpu_target`` (``"auto"``:
    the CPU loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time;
    else the one GCC target they were compiled for, from the ``FTOPS_CPU_TARGET`` build option).
    """
    parallel = torch.__config__.parallel_info()
    backend = "OpenMP" if "ATen parallel backend: OpenMP" in parallel else "native"
    return {
        "torch_built": _build_info.TORCH_VERSION,
        "torch_running": torch.__version__,
        "cuda": _build_info.WITH_CUDA,
        "cuda_archs": _build_info.CUDA_ARCHS or None,
        "nvcc": _build_info.NVCC_VERSION or None,
        "torch_cuda": _build_info.TORCH_CUDA_VERSION or None,
        "cpu_threads": torch.get_num_threads(),
        "parallel_backend": backend,
        "cpu_target": _build_info.CPU_TARGET or "auto",
    }

"""Writes what CMake needs to know about the installed torch as CMake `set()` commands."""
import sys

import torch
from torch.utils import cpp_extension


def cmake_list(items):
    return ";".join(str(i).replace("\\", "/") for i in items)


with open(sys.argv[1], "w") as out:
    out.write(f'set(TORCH_VERSION "{torch.__version__}")\n')
    out.write(f'set(TORCH_CUDA_VERSION "{torch.version.cuda or ""}")\n')
    out.write(f'set(TORCH_CXX11_ABI {int(torch._C._GLIBCXX_USE_CXX11_ABI)})\n')
    out.write(f'set(TORCH_INCLUDE_DIRS "{cmake_list(cpp_extension.include_paths())}")\n')
    out.write(f'set(TORCH_LIBRARY_DIRS "{cmake_list(cpp_extension.library_paths())}")\n')

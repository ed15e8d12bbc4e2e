"""Builds the custom ops when the project is installed (`pip install --no-build-isolation -e .`).

The custom ops in csrc/ are built here as the `common._C` extension (see common/ops.py
and csrc/README.md): the C++ CPU kernels always, the CUDA kernels whenever nvcc is
found (CUDA_HOME, or nvcc on PATH, or /usr/local/cuda). TORCH_CUDA_ARCH_LIST defaults to
the GPUs present, else "8.0;9.0". SSL_OPS_NO_CUDA=1 builds the CPU kernels only.

    CUDA_HOME=/usr/local/cuda python setup.py build_ext --inplace
    pip install --no-build-isolation -e .
"""
import glob
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # torch is needed to build the ops; without it the references are used
    torch = None


def _cuda_library_includes(cuda_home):
    """cuBLAS headers: in CUDA_HOME, else in the nvidia-* wheels torch was installed with.

    (cublasGemmEx itself resolves at load time through libtorch_cuda's libcublas.)
    """
    if os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    return sorted({os.path.dirname(h) for root in nvidia.__path__
                   for h in glob.glob(os.path.join(root, "*", "include", "cublas_v2.h"))})


def _cuda_toolkit_home():
    """The CUDA toolkit to build against, or None.

    torch guesses CUDA_HOME from `which nvcc` when it is unset; a wrapper script such as
    /usr/local/bin/nvcc then gives /usr/local, which has no CUDA headers or libcudart, and the
    link fails. A guess without cuda_runtime.h falls back to /usr/local/cuda, else to CPU only.
    """
    home = cpp_extension.CUDA_HOME
    if home is None or os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    fallback = "/usr/local/cuda"
    usable = os.path.exists(os.path.join(fallback, "include", "cuda_runtime.h"))
    source = "CUDA_HOME" if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") else "nvcc on PATH"
    print(f"setup.py: {home} (from {source}) is not a CUDA toolkit; "
          + (f"using {fallback}" if usable else "building the CPU kernels only (set CUDA_HOME)"), file=sys.stderr)
    if not usable:
        return None
    cpp_extension.CUDA_HOME = fallback  # torch joins CUDA_HOME for nvcc, headers and libraries
    return fallback


if torch is not None:
    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = os.environ.get("SSL_OPS_NO_CUDA", "0") != "1" and _cuda_toolkit_home() is not None
    cxx_flags = ["-O3", "-g0"]  # -g0: no debug info (much faster build); the C++ standard is the one torch.utils.cpp_extension picks for this torch
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline template over `#pragma omp parallel`: without -fopenmp it compiles to a
        # serial loop. libgomp.so.1 resolves at run time to the copy torch has already loaded (same SONAME).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
                os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{major}.{minor}" for major, minor in caps)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext = cpp_extension.CUDAExtension(
            "common._C", cpp_sources + cu_sources,
            define_macros=[("WITH_CUDA", None)],
            include_dirs=_cuda_library_includes(cpp_extension.CUDA_HOME),
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension("common._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=link_flags)
    ext_modules = [ext]
    cmdclass = {"build_ext": cpp_extension.BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)  # the package's metadata is in pyproject.toml

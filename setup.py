"""Builds attnkernels._C: the C++ CPU kernels always, the CUDA kernels when CUDA is usable.

Environment:
  FORCE_CUDA=1   build csrc/cuda/*.cu even without a visible GPU (needs nvcc / CUDA_HOME)
  FORCE_CPU=1    skip the CUDA sources
  ATTNKERNELS_PORTABLE=1   do not tune the CPU code for this machine (-march=native)
  MAX_JOBS=N     parallel compile jobs (ninja)
  ATTNKERNELS_NVCC_FLAGS="..."   extra nvcc flags (scripts/build_for_gpu.sh: --compress-mode=size)
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _say(message):
    print(f"attnkernels setup: {message}", file=sys.stderr, flush=True)


def _extension():
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-DPy_LIMITED_API=0x030a0000"]
    if not _flag("ATTNKERNELS_PORTABLE"):
        cxx_flags += ["-march=native", "-mprefer-vector-width=512"]
    else:
        # The 16-channel vector values of csrc/cpu/sampler_core.h pass between inline functions only:
        # the ABI note for 512-bit vectors on a target without AVX-512 does not apply.
        cxx_flags += ["-Wno-psabi"]
    import torch

    cuda_usable = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and torch.cuda.is_available()
    if _flag("FORCE_CPU"):
        build_cuda, why = False, "FORCE_CPU=1 is set"
    elif not cuda_sources:
        build_cuda, why = False, "there are no CUDA sources in csrc/cuda"
    elif _flag("FORCE_CUDA"):
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda)")
        build_cuda, why = True, "FORCE_CUDA=1 is set"
    elif cuda_usable:
        build_cuda, why = True, "a CUDA device and toolkit are available"
    else:
        reasons = []
        if torch.version.cuda is None:
            reasons.append("this torch is a CPU-only build")
        if cpp_extension.CUDA_HOME is None:
            reasons.append("no CUDA toolkit (CUDA_HOME) was found")
        if not torch.cuda.is_available():
            reasons.append("no CUDA device is visible (set FORCE_CUDA=1 to build anyway)")
        build_cuda, why = False, "; ".join(reasons)

    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": cxx_flags}
    if build_cuda:
        _say(f"building the CPU and CUDA kernels ({why}); CUDA_HOME={cpp_extension.CUDA_HOME}")
        # ATen's CUDA headers include cuBLAS/cuSPARSE headers that the CUDA torch wheels ship.
        for path in sys.path:
            wheel_include = os.path.join(path, "nvidia", "cu13", "include")
            if os.path.isdir(wheel_include):
                include_dirs.append(wheel_include)
                break
        extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        extra["nvcc"] += os.environ.get("ATTNKERNELS_NVCC_FLAGS", "").split()
        return cpp_extension.CUDAExtension(
            "attnkernels._C", sources + cuda_sources, include_dirs=include_dirs, extra_compile_args=extra,
            extra_link_args=["-fopenmp"], py_limited_api=True,
        )
    _say(f"building the CPU kernels only: {why}")
    return cpp_extension.CppExtension(
        "attnkernels._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
        extra_link_args=["-fopenmp"], py_limited_api=True,
    )


def _build_ext():
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        _say("ninja is missing: the sources compile one at a time, not in parallel (pip install ninja)")
    return cpp_extension.BuildExtension.with_options(use_ninja=True)


setup(
    packages=find_packages(include=["attnkernels", "attnkernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _build_ext()},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)

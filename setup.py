"""Builds attnkernels._C: the C++ CPU kernels always, the CUDA kernels when CUDA is usable.

Environment:
  FORCE_CUDA=1   build csrc/cuda/*.cu even without a visible GPU (needs nvcc / CUDA_HOME)
  FORCE_CPU=1    skip the CUDA sources
  ATTNKERNELS_CPU_VARIANTS=0   on x86-64, build only the default CPU variant (no avx2 / avx512 objects)
  MAX_JOBS=N     parallel compile jobs (ninja)
  ATTNKERNELS_NVCC_FLAGS="..."   extra nvcc flags (scripts/build_for_gpu.sh: --compress-mode=size)
"""

import glob
import os
import platform
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _say(message):
    print(f"attnkernels setup: {message}", file=sys.stderr, flush=True)


def _compiler_finds(compiler, name):
    """The path `compiler -print-file-name=name` gives, or None where it does not find the file."""
    try:
        found = subprocess.run([*compiler, f"-print-file-name={name}"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return found if os.path.isabs(found) and os.path.exists(found) else None


def _loaded_libstdcxx():
    """The libstdc++ shared library this process has loaded (torch links it), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and os.path.basename(fields[-1]).startswith("libstdc++.so"):
                    return fields[-1]
    except OSError:
        pass
    return None


def _shared_libstdcxx_args(compiler, loaded=None):
    """Link arguments that keep the C++ library shared where `compiler` would link it statically.

    A compiler installed with libstdc++.a but no libstdc++.so (e.g. a GCC under /opt that CXX names)
    links its static copy into the extension. The process then runs two copies of the C++ library,
    and where the extension binds its own calls to its own copy (Ubuntu's Python links extensions with
    -Bsymbolic-functions), formatting a number into an error message crashes (SIGSEGV). Naming the
    libstdc++.so that torch runs with resolves the C++ library there instead.
    """
    if not sys.platform.startswith("linux"):
        return []
    if _compiler_finds(compiler, "libstdc++.so") or not _compiler_finds(compiler, "libstdc++.a"):
        return []
    loaded = loaded or _loaded_libstdcxx()
    if loaded is None:
        _say(f"WARNING: {compiler[0]} would link libstdc++ statically and no shared libstdc++ is loaded to "
             "link instead; if error messages crash, build with a compiler that has libstdc++.so (set CXX)")
        return []
    _say(f"{compiler[0]} has only a static libstdc++: linking {loaded} (the one torch runs with) instead")
    return [loaded]


# The hot CPU kernels, compiled once more per x86-64 variant (see csrc/cpu_isa.h); csrc/cpu/cpu_dispatch.cpp
# (compiled once, with the plain flags) picks the variant at run time from the CPU.
CPU_VARIANT_SOURCES = [
    os.path.join("csrc", "cpu", "grid_sample_kernel.cpp"),
    os.path.join("csrc", "cpu", "affine_grid_sample_kernel.cpp"),
    os.path.join("csrc", "cpu", "attention_kernel.cpp"),
]
# What each variant may use; cpu_dispatch.cpp checks exactly these features before choosing it.
CPU_VARIANT_FLAGS = {
    "avx2": ["-DATTNKERNELS_CPU_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-DATTNKERNELS_CPU_AVX512", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mprefer-vector-width=512"],
}


def _builds_cpu_variants():
    return platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("ATTNKERNELS_CPU_VARIANTS") != "0"


def _start_cpu_variants(build_ext, ext):
    """Starts compiling CPU_VARIANT_SOURCES once per CPU_VARIANT_FLAGS entry, each in its own thread;
    returns (the thread pool, the futures, the object files they write).

    The objects are linked after the extension's own (default-variant) objects on purpose: an inline function of
    torch or the C++ library compiled in several variants keeps one definition, the first the linker sees, so
    every caller gets a copy compiled for its own variant or a lower one, never a higher one (csrc/cpu_isa.h).
    """
    from concurrent.futures import ThreadPoolExecutor

    variants = CPU_VARIANT_FLAGS if _builds_cpu_variants() else {}
    pool = ThreadPoolExecutor(max_workers=max(1, len(variants)))
    futures, objects = [], []
    for variant, flags in variants.items():
        output_dir = os.path.join(build_ext.build_temp, f"cpu_{variant}")
        objects += build_ext.compiler.object_filenames(CPU_VARIANT_SOURCES, output_dir=output_dir)
        _say(f"compiling the {variant} variant of the CPU kernels")
        futures.append(pool.submit(
            build_ext.compiler.compile, CPU_VARIANT_SOURCES, output_dir=output_dir, include_dirs=ext.include_dirs,
            depends=ext.depends, extra_postargs={"cxx": list(ext.extra_compile_args["cxx"]) + flags}))
    return pool, futures, objects


def _extension():
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # No -march=native: the library must run on any CPU of its architecture. The hot kernels get their
    # AVX2 and AVX-512 builds from _start_cpu_variants, chosen at run time.
    # -Wno-psabi: the 16-channel vector values of csrc/cpu/channel_blocks.h pass between inline functions only,
    # so the ABI note for 512-bit vectors on a target without AVX-512 does not apply.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi", "-DPy_LIMITED_API=0x030a0000"]
    if _builds_cpu_variants():
        cxx_flags.append("-DATTNKERNELS_CPU_VARIANTS")
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
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        def build_extension(self, ext):
            # The variants compile in threads (one ninja run each) while the extension's own sources
            # compile; the link waits for them.
            # The link runs the C++ compiler (CXX) or the linker command Python names: check each.
            linkers = {tuple(getattr(self.compiler, name, None) or ())[:1]
                       for name in ("compiler_cxx", "linker_so_cxx", "linker_so")} - {()}
            for linker in sorted(linkers):
                fix = _shared_libstdcxx_args(list(linker))
                if fix:
                    ext.extra_link_args = list(ext.extra_link_args or []) + fix
                    break
            pool, futures, variant_objects = _start_cpu_variants(self, ext)
            ext.extra_objects = [o for o in (ext.extra_objects or []) if o not in variant_objects] + variant_objects
            link = self.compiler.link_shared_object

            def link_after_variants(*args, **kwargs):
                for future in futures:
                    future.result()
                return link(*args, **kwargs)

            self.compiler.link_shared_object = link_after_variants
            try:
                super().build_extension(ext)
            finally:
                self.compiler.link_shared_object = link
                pool.shutdown(wait=True)

    return BuildExtension


# Run by pip (setuptools' build backend) and `python setup.py` as __main__; the tests import the helpers.
if __name__ == "__main__":
    setup(
        packages=find_packages(include=["attnkernels", "attnkernels.*"]),
        ext_modules=[_extension()],
        cmdclass={"build_ext": _build_ext()},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )

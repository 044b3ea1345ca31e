"""Compile one CUDA source of the package the way setup.py does, without building the package.

    python scripts/compile_cuda_unit.py csrc/cuda/grid_sample_kernel.cu --arch 90 [--ptxas-verbose] [--time]

For measuring one translation unit's compile time and checking registers, spills and SASS
(`--keep-object` writes the object for `cuobjdump --dump-sass`). Needs nvcc (CUDA_HOME, default
/usr/local/cuda) and a CUDA build of torch for the headers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def language_standard() -> str:
    """The C++ standard torch's own extension builds pass (C++20 on recent torch, C++17 on 2.11)."""
    from torch.utils import cpp_extension

    with open(cpp_extension.__file__) as source:
        return "c++20" if "-std=c++20" in source.read() else "c++17"


def nvcc_command(source: str, arch: str, output: str, extra: list[str]) -> list[str]:
    import sysconfig

    from torch.utils import cpp_extension

    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    includes = [os.path.join(ROOT, "csrc"), *cpp_extension.include_paths(device_type="cuda"),
                sysconfig.get_paths()["include"], os.path.join(cuda_home, "include")]
    for path in sys.path:
        wheel_include = os.path.join(path, "nvidia", "cu13", "include")
        if os.path.isdir(wheel_include):
            includes.append(wheel_include)
            break
    return [os.path.join(cuda_home, "bin", "nvcc"), "-c", source, "-o", output,
            *[f"-I{path}" for path in includes], *cpp_extension.COMMON_NVCC_FLAGS,
            "-O3", "-lineinfo", "--expt-relaxed-constexpr", f"-std={language_standard()}", "-Xcompiler", "-fPIC",
            "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DPy_LIMITED_API=0x030a0000",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", *extra]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source")
    parser.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    parser.add_argument("--ptxas-verbose", action="store_true", help="print registers, spills, shared memory")
    parser.add_argument("--keep-object", default="", help="write the object here (for cuobjdump)")
    parser.add_argument("--time", action="store_true", help="print nvcc's per-phase times")
    parser.add_argument("--nvcc-flag", action="append", default=[], help="one more nvcc flag (repeatable)")
    args = parser.parse_args(argv)
    extra = (["-Xptxas", "-v"] if args.ptxas_verbose else []) + args.nvcc_flag
    with tempfile.TemporaryDirectory() as scratch:
        output = args.keep_object or os.path.join(scratch, "unit.o")
        if args.time:
            extra += ["--time", os.path.join(scratch, "time.csv")]
        command = nvcc_command(args.source, args.arch, output, extra)
        start = time.perf_counter()
        result = subprocess.run(command)
        print(f"{args.source} sm_{args.arch}: {time.perf_counter() - start:.1f} s, exit {result.returncode}",
              file=sys.stderr)
        if args.time and os.path.exists(os.path.join(scratch, "time.csv")):
            print(open(os.path.join(scratch, "time.csv")).read(), file=sys.stderr)
        return result.returncode


if __name__ == "__main__":
    sys.exit(main())

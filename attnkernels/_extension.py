"""Loads the compiled extension, attnkernels._C, if it was built.

Importing it registers the torch.ops.attnkernels.* operators and their CPU
(and CUDA) kernels. Without it the package still works, on the reference
backend, and says so once.
"""

from __future__ import annotations

import warnings

import torch

try:
    from . import _C  # noqa: F401
except ImportError as error:  # not built, or built against another torch
    _C = None
    LOAD_ERROR: str | None = str(error)
    warnings.warn(
        "attnkernels: the compiled extension attnkernels._C could not be loaded "
        f"({error}); every op falls back to the slow 'reference' backend. "
        "Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    LOAD_ERROR = None

# The CPU variant of the compiled kernels (csrc/cpu/cpu_dispatch.cpp), chosen once from the CPU and
# ATTNKERNELS_CPU_CAPABILITY; asked for here so that a request the CPU cannot honour warns at import.
CPU_CAPABILITY: str | None = None
if _C is not None:
    CPU_CAPABILITY = _C.cpu_capability()
    if _C.cpu_capability_note():
        warnings.warn(_C.cpu_capability_note(), RuntimeWarning, stacklevel=2)


def cpu_capability() -> str | None:
    """The CPU variant of the compiled kernels in use: ``"default"``, ``"avx2"``, ``"avx512"``, ``"avx512_bf16"``
    or ``"avx512_amx"``.

    ``"avx512_bf16"`` is the avx512 variant with bfloat16 attention on the AVX512-BF16 dot products;
    ``"avx512_amx"`` that, with bfloat16 attention on the AMX tile multipliers (head dims that are
    multiples of 32).

    The best one this CPU runs, unless the environment variable ``ATTNKERNELS_CPU_CAPABILITY`` (read once,
    at import) names a lower one. None when the compiled extension is not loaded.
    """
    return CPU_CAPABILITY


def cpu_sampling_paths() -> str | None:
    """Which of the CPU sampling forwards' machine-dependent paths the variant in use takes, in words (pixel quads
    or gathers for 3-4 channels, pair or single-tap gathers in the avx2 variant): each is measured once per process
    on first use (this call measures them if no forward has) unless its environment variable forces it. None when
    the compiled extension is not loaded."""
    return None if _C is None else _C.cpu_sampling_paths()


def _ops_with_kernel(dispatch_key: str) -> frozenset[str]:
    if _C is None:
        return frozenset()
    names = (n for n in torch._C._dispatch_get_all_op_names() if n.startswith("attnkernels::"))
    return frozenset(n.split("::", 1)[1] for n in names
                     if torch._C._dispatch_has_kernel_for_dispatch_key(n, dispatch_key))


# Read once at import, so that backend selection is plain Python that
# torch.compile traces without graph breaks.
CPU_OPS = _ops_with_kernel("CPU")
CUDA_OPS = _ops_with_kernel("CUDA")


def has_extension() -> bool:
    """Whether attnkernels._C is loaded (CPU kernels available)."""
    return _C is not None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether attnkernels::<op> has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    return op in (CUDA_OPS if dispatch_key == "CUDA" else CPU_OPS)


def has_cuda_kernels() -> bool:
    """Whether the extension was built with CUDA kernels."""
    return bool(CUDA_OPS)


def why_no_extension() -> str:
    return f"the compiled extension attnkernels._C is not loaded ({LOAD_ERROR})"

"""Backend selection: the one place that decides which implementation runs.

Each public op declares, per backend, a function that returns None when that
backend can serve the given inputs and otherwise a sentence saying why not
(the xformers pattern). ``select_backend`` tries them in order of preference,
or checks the one the caller asked for and raises with its reason.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence

import torch

from . import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")

WhyNot = Callable[[], "str | None"]


# Read once at import (torch.compile traces plain constants without graph breaks).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _wrap_triton_takes_interpreted_kernels() -> bool:
    """Whether this torch's wrap_triton accepts the interpreter's kernels (torch 2.11's accepts only
    compiled ones, so there the triton backend serves CUDA tensors alone)."""
    import triton
    from torch.library import wrap_triton

    @triton.jit
    def probe(x):
        pass

    try:
        wrap_triton(probe)
    except RuntimeError:
        return False
    return True


# TRITON_INTERPRET=1 runs Triton kernels on CPU tensors: how CI tests them.
_TRITON_INTERPRETER = (os.environ.get("TRITON_INTERPRET", "0") == "1" and _TRITON_INSTALLED
                       and _wrap_triton_takes_interpreted_kernels())


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpreter() -> bool:
    return _TRITON_INTERPRETER


def triton_module():
    """attnkernels.triton, or None where Triton (or that module) is not available.

    A plain import rather than importlib, so that torch.compile traces through it.
    """
    if not _TRITON_INSTALLED:
        return None
    try:
        from attnkernels import triton as module
    except ImportError:
        return None
    return module


def why_not_device(tensor: torch.Tensor, backend: str, op: str) -> str | None:
    """Common rules for the compiled (attnkernels::<op>) and Triton backends."""
    if backend == "cpu":
        if not _extension.has_extension():
            return _extension.why_no_extension()
        if not _extension.has_kernel(op, "CPU"):
            return f"the extension has no CPU kernel for {op}"
        if tensor.device.type != "cpu":
            return f"the inputs are on {tensor.device}, and the cpu backend runs on CPU tensors only"
        return None
    if backend == "cuda":
        if not _extension.has_kernel(op, "CUDA"):
            return (f"the extension was built without a CUDA kernel for {op} "
                    "(see the README: building with CUDA)")
        if tensor.device.type != "cuda":
            return f"the inputs are on {tensor.device}, and the cuda backend runs on CUDA tensors only"
        return None
    if backend == "triton":
        if not triton_installed():
            return "Triton is not installed"
        if tensor.device.type == "cuda":
            return None
        if tensor.device.type == "cpu" and triton_interpreter():
            return None
        if tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            return (f"the inputs are on {tensor.device}; TRITON_INTERPRET=1 is set, but torch "
                    f"{torch.__version__}'s wrap_triton does not take interpreted kernels (torch 2.14 does)")
        return (f"the inputs are on {tensor.device}; the triton backend runs on CUDA tensors, "
                "or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1)")
    return None


def preference(tensor: torch.Tensor, cuda_order: Sequence[str] = ("cuda", "triton")) -> tuple[str, ...]:
    """Backends to try for ``backend=None``, best first, for the tensor's device.

    On CPU tensors the Triton interpreter is never chosen automatically: it is
    a test vehicle, far slower than the C++ kernels. Under torch.func transforms
    (grad, jacrev, vmap, ...) the reference serves: the compiled and Triton ops'
    autograd (torch.library.register_autograd) does not support them, and the
    reference is plain differentiable torch code.
    """
    if torch._C._are_functorch_transforms_active():
        return ("reference",)
    if tensor.device.type == "cuda":
        return (*cuda_order, "reference")
    return ("cpu", "reference")


def select_backend(op: str, requested: str | None, why_not: Mapping[str, WhyNot], order: Sequence[str]) -> str:
    """The backend that runs ``op``: ``requested`` if it can, else the first of ``order`` that can."""
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"attnkernels.{op}: `backend` must be one of {', '.join(BACKENDS)} or None, "
                             f"got {requested!r}")
        check = why_not.get(requested)
        reason = f"{op} has no {requested} implementation" if check is None else check()
        if reason is not None:
            raise RuntimeError(f"attnkernels.{op}: the {requested!r} backend cannot serve these inputs: {reason}")
        return requested
    reasons = []
    for name in order:
        check = why_not.get(name)
        reason = f"no {name} implementation" if check is None else check()
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    raise RuntimeError(f"attnkernels.{op}: no backend can serve these inputs ({'; '.join(reasons)})")


def available_backends() -> list[str]:
    """The backends usable in this process, in order of preference.

    ``cuda`` when the extension has CUDA kernels and a GPU is visible;
    ``triton`` when Triton is installed and there is a GPU or TRITON_INTERPRET=1;
    ``cpu`` when the extension is built; ``reference`` always.
    """
    found = []
    gpu = torch.cuda.is_available()
    if gpu and _extension.has_cuda_kernels():
        found.append("cuda")
    if triton_installed() and (gpu or triton_interpreter()):
        found.append("triton")
    if _extension.has_extension():
        found.append("cpu")
    found.append("reference")
    return found

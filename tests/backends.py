"""(device, backend) parametrisation shared by the op tests, and the calls that go through a backend.

Each op's checks are written once and run for every pair the op is tested on: CPU tensors on the
compiled CPU kernels, the reference and the Triton kernels (through the Triton interpreter), and
CUDA tensors on the CUDA kernels. The marks select them: `cuda` (skipped without a GPU, chosen by
the GPU check) and `triton`; a pair that cannot run in this process is skipped with the reason.
"""

from __future__ import annotations

import os

import pytest
import torch

from attnkernels import available_backends
from attnkernels._dispatch import triton_installed

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The backends that run on CPU tensors, and the pairs every sampling op is tested on (Triton on CUDA
# tensors compiles each specialisation: its own, smaller, set of tests keeps the GPU check's budget).
ON_CPU = (("cpu", "cpu"), ("cpu", "reference"), ("cpu", "triton"))
SAMPLING = (*ON_CPU, ("cuda", "cuda"))


def _why_not_here(device: str, backend: str) -> str | None:
    """Why this process cannot run `backend` on `device` tensors, or None."""
    if device == "cuda":
        return None  # the `cuda` mark skips without a GPU (tests/conftest.py)
    if backend == "triton" and not (INTERPRETER and triton_installed()):
        return "the triton backend runs CPU tensors only under TRITON_INTERPRET=1 with Triton installed"
    if backend not in available_backends():
        return f"the {backend!r} backend is not available here (available: {available_backends()})"
    return None


def device_backends(*pairs: tuple[str, str], exclude: tuple[str, ...] = ()) -> list:
    """pytest params (device, backend) with ids "device-backend" and their marks; `exclude` drops backends."""
    params = []
    for device, backend in pairs or SAMPLING:
        if backend in exclude:
            continue
        marks = []
        if device == "cuda":
            marks.append(pytest.mark.cuda)
        if backend == "triton":
            marks.append(pytest.mark.triton)
        reason = _why_not_here(device, backend)
        if reason:
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return params


def serve_or_skip(backend: str, fn, *args, declines=("triton",), **kwargs):
    """fn(*args, backend=backend, **kwargs); skips when a backend in `declines` says it cannot serve."""
    try:
        return fn(*args, backend=backend, **kwargs)
    except RuntimeError as error:
        marker = "cannot serve these inputs:"
        if marker in str(error) and backend in declines:
            reason = str(error).split(marker, 1)[1].strip()
            assert reason, "a backend that declines must say why"
            pytest.skip(f"{backend}: {reason}")
        raise


def triton_device_or_skip_module() -> str:
    """The device the Triton-only test modules run on ("cpu" under the interpreter, else "cuda");
    skips the calling module where the triton backend cannot run at all."""
    if not triton_installed():
        pytest.skip("Triton is not installed", allow_module_level=True)
    if not (INTERPRETER or torch.cuda.is_available()):
        pytest.skip("the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 for CPU tensors",
                    allow_module_level=True)
    return "cpu" if INTERPRETER else "cuda"


def forward_and_grads(fn, *inputs, seed=3):
    """(fn(*inputs), gradient of each input) for a fixed random output gradient."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    return (out, *torch.autograd.grad(out, leaves, grad_out))

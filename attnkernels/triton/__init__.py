"""The ``triton`` backend: Triton kernels for grid_sample, affine_grid, the fused affine_grid_sample
and attention, and their entries in the ops' backend tables (``BACKENDS``).

Only this subpackage imports Triton; ``attnkernels`` imports it lazily, and works without Triton
installed. The kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported), which is how CI tests them.

The functions the public API runs once it has validated the arguments (modes as numbers):

- ``grid_sample(input, grid, interpolation, padding, align_corners)``;
- ``affine_grid(theta, size, align_corners)``;
- ``affine_grid_sample(input, theta, size, interpolation, padding, align_corners)``;
- ``attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> (out, lse)``.
"""

from __future__ import annotations

import dataclasses

import torch

from .._dispatch import Backend, Request, not_supported_reasons
from .affine_grid import affine_grid
from .attention import MAX_HEAD_DIM
from .attention_op import _attention_backward_op, attention
from .sampling import affine_grid_sample, grid_sample

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _sampler_limits(request: Request) -> str | None:
    if request.mode == "bicubic" and request.dims == 3 and request.tensor.device.type == "cuda":
        # 64 unrolled taps: several minutes of Triton compilation for one kernel.
        return "the triton sampler serves tricubic (5-D bicubic) only under the interpreter; use cuda or cpu"
    return None


def _attention_limits(request: Request) -> str | None:
    if request.tensor.device.type != "cuda":
        return None  # the interpreter has neither limit
    if request.tensor.dtype == torch.float64:
        # Triton 3.x lowers some float64 tl.dot shapes to an MMA path that aborts the process
        # ("fp64 don't support largeK MMA"): float64 runs only under the interpreter.
        return "the triton attention runs float64 only under the Triton interpreter; on CUDA use float32 or lower"
    for name, value in zip(("head_dim", "value_dim"), request.head_dims or (), strict=False):
        if value > MAX_HEAD_DIM:
            return (f"the triton attention keeps a query tile of the padded head dim in registers and "
                    f"serves {name} up to {MAX_HEAD_DIM}, got {value}")
    return None


_GRID_SAMPLE = Backend("triton", run=grid_sample, label="the triton sampler", dtypes=_FLOATING, dims=(2, 3),
                       modes=("bilinear", "nearest", "bicubic"), extra_reasons=_sampler_limits)

BACKENDS = {
    "grid_sample": _GRID_SAMPLE,
    "affine_grid": Backend("triton", run=affine_grid, label="the triton affine_grid", dtypes=_FLOATING),
    "affine_grid_sample": dataclasses.replace(_GRID_SAMPLE, run=affine_grid_sample),
    "attention": Backend("triton", run=attention, label="the triton attention", dtypes=_FLOATING,
                         features=frozenset({"mask", "dropout", "causal", "gqa"}), extra_reasons=_attention_limits,
                         gradient=_attention_backward_op),
}


def why_not(op: str, tensor: torch.Tensor, **details) -> str | None:
    """None when the Triton kernels can serve ``op`` for these inputs, else a sentence saying why not
    (the ``BACKENDS`` entry's reasons, for tools and tests that ask without calling the op).

    Sampling details: ``mode`` ("bilinear", "nearest", "bicubic"), ``dims`` (2 or 3).
    Attention details: ``head_dim``, ``value_dim``, ``has_mask``, ``dropout``.
    Unknown details are ignored.
    """
    if op not in BACKENDS:
        return f"the triton backend has no {op} kernel"
    head_dim = details.get("head_dim")
    features = {name for name, detail in (("mask", "has_mask"), ("dropout", "dropout")) if details.get(detail)}
    request = Request(op, tensor, dims=details.get("dims"), mode=details.get("mode"),
                      head_dims=None if head_dim is None else (head_dim, details.get("value_dim", head_dim)),
                      features=frozenset(features))
    return not_supported_reasons(BACKENDS[op], request)


__all__ = ["BACKENDS", "affine_grid", "affine_grid_sample", "attention", "grid_sample", "why_not"]

"""The ``triton`` backend: Triton kernels for grid_sample, the fused affine_grid_sample and attention.

Only this subpackage imports Triton; ``attnkernels`` imports it lazily, and
works without Triton installed. The kernels run on CUDA tensors, or on CPU
tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set before
Triton is imported), which is how CI tests them.

The hooks the public API calls after validating its arguments:

- ``why_not(op, tensor, **details)``: None when this backend can serve, else why not;
- ``grid_sample(input, grid, interpolation, padding, align_corners)``;
- ``affine_grid(theta, size, align_corners)``;
- ``affine_grid_sample(input, theta, size, interpolation, padding, align_corners)``;
- ``attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> (out, lse)``.
"""

from __future__ import annotations

import torch

from ._sampler import INTERPRETER
from .affine_grid import affine_grid
from .attention import MAX_HEAD_DIM
from .attention_op import attention
from .sampling import affine_grid_sample, grid_sample

_OPS = ("grid_sample", "affine_grid", "affine_grid_sample", "attention")
_SAMPLING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def why_not(op: str, tensor: torch.Tensor, **details) -> str | None:
    """None when the Triton kernels can serve ``op`` for these inputs, else a sentence saying why not.

    Sampling details: ``mode`` ("bilinear", "nearest", "bicubic"), ``dims`` (2 or 3).
    Attention details: ``dtype``, ``head_dim``, ``value_dim``, ``has_mask``, ``dropout``.
    Unknown details are ignored.
    """
    if op not in _OPS:
        return f"the triton backend has no {op} kernel"
    if tensor.device.type == "cuda":
        pass
    elif tensor.device.type == "cpu" and INTERPRETER:
        pass
    else:
        return (f"the inputs are on {tensor.device}; Triton kernels run on CUDA tensors, or on CPU tensors "
                "under the Triton interpreter (TRITON_INTERPRET=1 set before the first import of triton)")
    if op == "affine_grid":
        if tensor.dtype not in _SAMPLING_DTYPES:
            return f"the triton affine_grid takes float16, bfloat16, float32 or float64 theta, not {tensor.dtype}"
        return None
    if op in ("grid_sample", "affine_grid_sample"):
        if tensor.dtype not in _SAMPLING_DTYPES:
            return f"the triton sampler takes float16, bfloat16, float32 or float64 inputs, not {tensor.dtype}"
        mode = details.get("mode", "bilinear")
        if mode not in ("bilinear", "nearest", "bicubic"):
            return f"the triton sampler has no {mode!r} mode"
        dims = details.get("dims", 2)
        if dims not in (2, 3):
            return "the triton sampler takes 4-D or 5-D inputs"
        if mode == "bicubic" and dims == 3 and tensor.device.type == "cuda":
            # 64 unrolled taps: several minutes of Triton compilation for one kernel.
            return "the triton sampler serves tricubic (5-D bicubic) only under the interpreter; use cuda or cpu"
        return None
    dtype = details.get("dtype", tensor.dtype)
    if dtype not in _ATTENTION_DTYPES:
        return f"the triton attention takes float16, bfloat16, float32 or float64, not {dtype}"
    if dtype == torch.float64 and tensor.device.type == "cuda":
        # Triton 3.x lowers some float64 tl.dot shapes to an MMA path that aborts the process
        # ("fp64 don't support largeK MMA"): float64 runs only under the interpreter.
        return "the triton attention runs float64 only under the Triton interpreter; on CUDA use float32 or lower"
    for name in ("head_dim", "value_dim"):
        value = details.get(name)
        if value is not None and value > MAX_HEAD_DIM and tensor.device.type == "cuda":
            return (f"the triton attention keeps a query tile of the padded head dim in registers and "
                    f"serves {name} up to {MAX_HEAD_DIM}, got {value}")
    return None


__all__ = ["affine_grid", "affine_grid_sample", "attention", "grid_sample", "why_not"]

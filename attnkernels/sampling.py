"""Spatial transformer sampling: grid_sample, affine_grid and the fused affine_grid_sample.

Drop-in replacements for ``torch.nn.functional.grid_sample`` and
``affine_grid`` (same arguments, shapes, dtypes and errors), plus the fused
sampler. Each function validates its arguments, selects a backend from the op's table
(``_dispatch.select``) and runs it.
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from collections.abc import Sequence

import torch

from ._checks import check_like, check_tensor
from ._dispatch import Backend, Request, backend_table, call_op, select, triton_module, unavailable
from ._modes import INTERPOLATIONS, PADDINGS
from .reference.backends import BACKENDS as REFERENCE_BACKENDS

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _compiled(op: str):
    """The C++ op attnkernels::<op>: its CPU and CUDA kernels serve every dtype, mode and dims the API takes."""
    def run(*args):
        # Its one overload, named: calling the overload packet resolves the overload on every call.
        overload = getattr(torch.ops.attnkernels, op).default
        return call_op(overload, args, [a for a in args if isinstance(a, torch.Tensor)])
    return run


_COMPILED_BACKENDS = {op: (Backend("cuda", run=_compiled(op)), Backend("cpu", run=_compiled(op)))
                      for op in ("grid_sample", "affine_grid", "affine_grid_sample")}


def _backends(op: str) -> tuple[Backend, ...]:
    """The table of ``op``, in the order tried on CUDA tensors: the hand-written CUDA kernels before
    Triton (no GPU measurement has compared them yet), then cpu and reference."""
    return backend_table(op, lambda: _build_backends(op))


def _build_backends(op: str) -> tuple[Backend, ...]:
    cuda, cpu = _COMPILED_BACKENDS[op]
    module = triton_module()
    triton = (module.BACKENDS[op] if module is not None
              else unavailable("triton", "the attnkernels.triton module could not be imported"))
    return cuda, triton, cpu, REFERENCE_BACKENDS[op]


def _resolve_align_corners(op: str, align_corners: bool | None) -> bool:
    if align_corners is not None and not isinstance(align_corners, bool):  # "False" is truthy: refuse, as torch
        raise TypeError(f"attnkernels.{op}: expected `align_corners` to be a bool or None, "
                        f"got {type(align_corners).__name__}")
    if align_corners is None:
        warnings.warn(
            "Default grid_sample and affine_grid behavior has changed to align_corners=False since 1.3.0. "
            "Please specify align_corners=True if the old behavior is desired.",
            UserWarning,
            stacklevel=3,
        )
        return False
    return align_corners


def _resolve_modes(op: str, mode: str, padding_mode: str) -> tuple[int, int]:
    if mode not in INTERPOLATIONS:
        raise ValueError(f"attnkernels.{op}: expected `mode` to be 'bilinear', 'nearest' or 'bicubic', "
                         f"got {mode!r}")
    if padding_mode not in PADDINGS:
        raise ValueError(f"attnkernels.{op}: expected `padding_mode` to be 'zeros', 'border' or 'reflection', "
                         f"got {padding_mode!r}")
    return INTERPOLATIONS[mode], PADDINGS[padding_mode]


def _check_floating(op: str, name: str, t: torch.Tensor) -> None:
    check_tensor(op, name, t)
    if t.dtype not in _FLOATING:
        raise RuntimeError(f"attnkernels.{op}: expected `{name}` to be float16, bfloat16, float32 or float64, "
                           f"got {t.dtype}")


def _check_sampled_input(op: str, input: torch.Tensor) -> None:
    _check_floating(op, "input", input)
    shape = input.shape
    if len(shape) not in (4, 5):
        raise RuntimeError(f"attnkernels.{op}: expected `input` of shape (N, C, H, W) or (N, C, D, H, W), "
                           f"got sizes {list(shape)}")
    if 0 in shape[2:]:
        raise RuntimeError(f"attnkernels.{op}: expected `input` to have non-empty spatial dimensions, "
                           f"got sizes {list(shape)}")


def _check_grid_sample(input: torch.Tensor, grid: torch.Tensor) -> None:
    op = "grid_sample"
    _check_sampled_input(op, input)
    _check_floating(op, "grid", grid)
    input_shape, grid_shape = input.shape, grid.shape
    if len(grid_shape) != len(input_shape):
        raise RuntimeError(f"attnkernels.{op}: expected `grid` to have {len(input_shape)} dimensions like `input`, "
                           f"got sizes {list(grid_shape)}")
    dims = len(input_shape) - 2
    if grid_shape[-1] != dims:
        raise RuntimeError(f"attnkernels.{op}: expected `grid` to have size {dims} in its last dimension, "
                           f"got sizes {list(grid_shape)}")
    if grid_shape[0] != input_shape[0]:
        raise RuntimeError(f"attnkernels.{op}: expected `grid` and `input` to have the same batch size, "
                           f"got {grid_shape[0]} and {input_shape[0]}")
    check_like(op, "grid", grid, "input", input)


def grid_sample(input: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Sample ``input`` at the normalised points of ``grid``, as ``torch.nn.functional.grid_sample``.

    input: (N, C, H, W) or (N, C, D, H, W)
    grid: (N, Ho, Wo, 2) or (N, Do, Ho, Wo, 3); last dimension x, y(, z) in [-1, 1]
    returns: (N, C, Ho, Wo) or (N, C, Do, Ho, Wo)

    ``mode``: bilinear (trilinear for 5-D), nearest, or bicubic (tricubic for
    5-D, which torch lacks). ``backend``: None for the best available, or one
    of ``available_backends()``.
    """
    interpolation, padding = _resolve_modes("grid_sample", mode, padding_mode)
    align = _resolve_align_corners("grid_sample", align_corners)
    _check_grid_sample(input, grid)
    input_shape = input.shape
    _check_fits_in_memory("grid_sample", "grid", (*input_shape[:2], *grid.shape[1:-1]), input)
    request = Request("grid_sample", input, dims=len(input_shape) - 2, mode=mode,
                      tensors={"input": input, "grid": grid})
    chosen = select("grid_sample", backend, _backends("grid_sample"), request)
    return chosen.run(input, grid, interpolation, padding, align)


def _as_sizes(op: str, size: Sequence[int]) -> list[int]:
    """The entries of ``size`` as ints; floats are refused (4.9 is not a size), as torch refuses them."""
    if type(size) in (tuple, list, torch.Size) and all(type(s) is int for s in size):
        return list(size)  # the common case, first: this runs on every call
    if isinstance(size, torch.Tensor) or not isinstance(size, Sequence):
        raise TypeError(f"attnkernels.{op}: expected `size` to be a sequence of ints, got {type(size).__name__}")
    for s in size:
        if isinstance(s, (bool, float)) or not hasattr(type(s), "__index__"):
            raise TypeError(f"attnkernels.{op}: expected `size` to be a sequence of ints, got {tuple(size)}")
    return [s if isinstance(s, torch.SymInt) else operator.index(s) for s in size]


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# Read once at import (torch.compile traces plain constants without graph breaks).
_CPU_MEMORY = _physical_memory()


def _device_memory(device: torch.device) -> int | None:
    """Bytes of memory of ``device``, or None where unknown."""
    if device.type == "cpu":
        return _CPU_MEMORY
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def _check_fits_in_memory(op: str, name: str, shape: Sequence[int], like: torch.Tensor) -> None:
    """Refuses an output larger than the device's memory before anything is allocated.

    torch's kernels allocate their output first and fail at once; the reference builds
    intermediates piece by piece, and the first ones fit, so without this check it runs
    the machine out of memory instead of raising.
    """
    for size in shape:
        if isinstance(size, torch.SymInt):
            return
    elements = math.prod(shape)
    needed = elements * like.element_size()
    available = _CPU_MEMORY if like.is_cpu else _device_memory(like.device)
    if elements >= 2**63 or (available is not None and needed > available):
        raise RuntimeError(f"attnkernels.{op}: `{name}` asks for an output of sizes {list(shape)} "
                           f"({needed / 2**30:.1f} GiB), more than the {like.device} memory"
                           + ("" if available is None else f" ({available / 2**30:.1f} GiB)"))


def _check_affine(op: str, theta: torch.Tensor, size: Sequence[int]) -> list[int]:
    _check_floating(op, "theta", theta)
    size = _as_sizes(op, size)
    if len(size) not in (4, 5):
        raise ValueError(f"attnkernels.{op}: expected `size` of length 4 (N, C, H, W) or 5 (N, C, D, H, W), "
                         f"got {tuple(size)}")
    dims = len(size) - 2
    theta_shape = theta.shape
    if len(theta_shape) != 3 or tuple(theta_shape[1:]) != (dims, dims + 1):
        raise ValueError(f"attnkernels.{op}: expected `theta` of shape (N, {dims}, {dims + 1}) for size "
                         f"{tuple(size)}, got {tuple(theta_shape)}")
    if theta_shape[0] != size[0]:
        raise ValueError(f"attnkernels.{op}: expected `theta` to have the batch size size[0] = {size[0]}, "
                         f"got {theta_shape[0]}")
    if min(size[2:]) <= 0:
        raise ValueError(f"attnkernels.{op}: expected positive spatial sizes in `size`, got {tuple(size)}")
    return size


def affine_grid(theta: torch.Tensor, size: Sequence[int], align_corners: bool | None = None, *,
                backend: str | None = None) -> torch.Tensor:
    """Sampling grid of a batch of affine maps, as ``torch.nn.functional.affine_grid``.

    theta: (N, 2, 3) with size (N, C, H, W), or (N, 3, 4) with size (N, C, D, H, W)
    returns: (N, H, W, 2) or (N, D, H, W, 3)
    """
    align = _resolve_align_corners("affine_grid", align_corners)
    size = _check_affine("affine_grid", theta, size)
    if min(size) <= 0:  # torch's rule: no empty grids
        raise ValueError(f"attnkernels.affine_grid: expected positive sizes in `size`, got {tuple(size)}")
    _check_fits_in_memory("affine_grid", "size", (size[0], *size[2:], len(size) - 2), theta)
    request = Request("affine_grid", theta, tensors={"theta": theta})
    chosen = select("affine_grid", backend, _backends("affine_grid"), request)
    return chosen.run(theta, size, align)


def affine_grid_sample(input: torch.Tensor, theta: torch.Tensor, size: Sequence[int] | None = None,
                       mode: str = "bilinear", padding_mode: str = "zeros", align_corners: bool | None = None, *,
                       backend: str | None = None) -> torch.Tensor:
    """The fused spatial-transformer sampler: ``grid_sample(input, affine_grid(theta, size))``
    without storing the grid, differentiable to ``input`` and ``theta``.

    input: (N, C, H, W) or (N, C, D, H, W)
    theta: (N, 2, 3) or (N, 3, 4)
    size: the output size (N, C, [Do,] Ho, Wo); defaults to ``input.shape``
    returns: a tensor of ``size``
    """
    op = "affine_grid_sample"
    interpolation, padding = _resolve_modes(op, mode, padding_mode)
    align = _resolve_align_corners(op, align_corners)
    _check_sampled_input(op, input)
    input_shape = input.shape
    size = _check_affine(op, theta, input_shape if size is None else size)
    if len(size) != len(input_shape) or size[0] != input_shape[0] or size[1] != input_shape[1]:
        raise ValueError(f"attnkernels.{op}: expected `size` of length {len(input_shape)} starting with the batch "
                         f"and channels of `input` {tuple(input_shape[:2])}, got {tuple(size)}")
    check_like(op, "theta", theta, "input", input)
    _check_fits_in_memory(op, "size", size, input)
    chosen = select(op, backend, _backends(op), Request(op, input, dims=len(input_shape) - 2, mode=mode,
                                                        tensors={"input": input, "theta": theta}))
    return chosen.run(input, theta, size, interpolation, padding, align)


__all__ = ["affine_grid", "affine_grid_sample", "grid_sample"]


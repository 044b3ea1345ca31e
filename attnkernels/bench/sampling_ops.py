"""The sampling benchmark ops: grid_sample, affine_grid and the fused affine_grid_sample, 2-D, video
(with its channel sweep, channels-last and deterministic-backward variants) and RGB.

Byte counts (the floor of memory traffic; the same count for every backend, so the rate is
comparable across them):
    sampling forward:      input read once + grid read + output written
    sampling fwd+bwd:      forward + grad_output, input and grid read again,
                           grad_input and grad_grid written (3·input + 3·grid + 2·output)
    sampling bwd:          what fwd+bwd adds to the forward (2·input + 2·grid + output)
    affine_grid_sample:    as above with theta in place of the grid (fusion removes the grid)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

import attnkernels

from .op_spec import Inputs, OpSpec, Shape, randn


def _near_identity_theta(batch: int, dims: int, generator: torch.Generator) -> torch.Tensor:
    """Random affine maps close to the identity (an STN's typical output); some points land outside."""
    eye = torch.eye(dims, dims + 1).expand(batch, dims, dims + 1)
    return eye + 0.15 * torch.randn(batch, dims, dims + 1, generator=generator)


def _spatial(shape: Shape, dims: int) -> tuple[int, ...]:
    return tuple(shape[axis] for axis in "DHW"[3 - dims:])


def _sampling_shape(batch: dict[str, int], channels: dict[str, int], dims: int) -> Callable[[int, str], Shape]:
    def shape(size: int, device_type: str) -> Shape:
        sides = {"D": size, "H": size, "W": size} if dims == 3 else {"H": size, "W": size}
        return {"N": batch[device_type], "C": channels[device_type], **sides}
    return shape


def _sampling_label(dims: int) -> Callable[[Shape], str]:
    return lambda s: f"N={s['N']} C={s['C']} {'x'.join(str(v) for v in _spatial(s, dims))}"


def _sampling_bytes(dims: int, fused: bool) -> Callable[[Shape, torch.dtype, bool], float]:
    def work(shape: Shape, dtype: torch.dtype, backward: bool) -> float:
        element = torch.empty((), dtype=dtype).element_size()
        points = shape["N"] * math.prod(_spatial(shape, dims))  # output size == input size here
        image = points * shape["C"] * element
        coordinates = shape["N"] * dims * (dims + 1) * element if fused else points * dims * element
        if backward:
            return 3 * image + 3 * coordinates + 2 * image
        return image + coordinates + image
    return work


def _grid_inputs(dims: int) -> Callable[[Shape, torch.dtype, torch.device, torch.Generator], Inputs]:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> Inputs:
        size = (shape["N"], shape["C"], *_spatial(shape, dims))
        theta = _near_identity_theta(shape["N"], dims, generator)
        grid = F.affine_grid(theta.to(device=device, dtype=torch.float64), size, align_corners=False)
        return {"input": randn(size, dtype, device, generator), "grid": grid.to(dtype)}
    return make


def _theta_inputs(dims: int) -> Callable[[Shape, torch.dtype, torch.device, torch.Generator], Inputs]:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> Inputs:
        size = (shape["N"], shape["C"], *_spatial(shape, dims))
        theta = _near_identity_theta(shape["N"], dims, generator)
        return {"input": randn(size, dtype, device, generator), "theta": theta.to(device=device, dtype=dtype)}
    return make


def _torch_2d_half_cpu_fails(shape: Shape, dtype: torch.dtype, device: torch.device) -> str | None:
    """torch 2.14's CPU grid_sample on float16/bfloat16 2-D inputs of 200 px and more (measured at 200,
    224 and 256 with near-identity affine grids; fine at 160 and below) reads outside the input: its
    output has NaN, or the process dies (segmentation fault, "corrupted size vs. prev_size")."""
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and max(shape["H"], shape["W"]) >= 200:
        return ("torch's CPU grid_sample reads outside 16-bit inputs of 200 px and more (NaN results or a "
                "crash)")
    return None


def _sampling_ops() -> list[OpSpec]:
    ops = []
    # CPU sizes keep a whole CPU run to a few minutes on 2 cores; GPU sizes fill an H100's bandwidth.
    for dims, batch, channels, cpu_sizes, gpu_sizes in (
        (2, {"cpu": 1, "cuda": 32}, {"cpu": 32, "cuda": 64}, (64, 128, 256), (128, 256, 512)),
        (3, {"cpu": 2, "cuda": 4}, {"cpu": 8, "cuda": 32}, (16, 32, 48), (32, 64, 128)),
    ):
        common = dict(
            size_meaning="side of the input and output (" + ("D = H = W" if dims == 3 else "H = W") + ")",
            work_unit="B",
            shape=_sampling_shape(batch, channels, dims),
            output_shape=lambda s, dims=dims: (s["N"], s["C"], *_spatial(s, dims)),
            label=_sampling_label(dims),
            default_sizes={"cpu": cpu_sizes, "cuda": gpu_sizes},
            quick_sizes={"cpu": (cpu_sizes[0] // 2,), "cuda": (gpu_sizes[0],)},
            torch_fails=_torch_2d_half_cpu_fails if dims == 2 else None,
        )
        ops.append(OpSpec(
            name=f"grid_sample_{dims}d",
            public_function="grid_sample",
            make_inputs=_grid_inputs(dims),
            torch_impl=lambda x: F.grid_sample(x["input"], x["grid"], align_corners=False),
            ours=lambda x, backend: attnkernels.grid_sample(x["input"], x["grid"], align_corners=False,
                                                            backend=backend),
            differentiable_inputs=("input", "grid"),
            work=_sampling_bytes(dims, fused=False),
            **common,
        ))
        ops.append(OpSpec(
            name=f"affine_grid_sample_{dims}d",
            public_function="affine_grid_sample",
            make_inputs=_theta_inputs(dims),
            # torch has no fused sampler: its equivalent is affine_grid followed by grid_sample.
            torch_impl=lambda x: F.grid_sample(
                x["input"], F.affine_grid(x["theta"], list(x["input"].shape), align_corners=False),
                align_corners=False),
            ours=lambda x, backend: attnkernels.affine_grid_sample(x["input"], x["theta"], align_corners=False,
                                                                   backend=backend),
            differentiable_inputs=("input", "theta"),
            work=_sampling_bytes(dims, fused=True),
            **common,
        ))
    return ops


def _video_ops() -> list[OpSpec]:
    """The video-volume cases of the sampling targets: D = 16 frames of H = W = size.

    grid_sample_video: one volume, C = 16 (CPU; torch's 3-D kernel runs a single volume on one
    core). affine_grid_sample_video: a batch of 4 RGB clips, fused against torch's affine_grid +
    grid_sample.
    """
    def video_shape(batch: dict[str, int], channels: dict[str, int]) -> Callable[[int, str], Shape]:
        return lambda size, device_type: {"N": batch[device_type], "C": channels[device_type], "D": 16,
                                          "H": size, "W": size}

    common = dict(
        size_meaning="height = width of 16-frame video volumes",
        work_unit="B",
        output_shape=lambda s: (s["N"], s["C"], *_spatial(s, 3)),
        label=_sampling_label(3),
        default_sizes={"cpu": (56, 112), "cuda": (112, 224)},
        quick_sizes={"cpu": (28,), "cuda": (112,)},
    )
    grid_op, fused_op = (op for op in _sampling_ops() if op.name in ("grid_sample_3d", "affine_grid_sample_3d"))
    return [
        dataclasses.replace(grid_op, name="grid_sample_video", shape=video_shape({"cpu": 1, "cuda": 8},
                                                                                 {"cpu": 16, "cuda": 32}), **common),
        dataclasses.replace(fused_op, name="affine_grid_sample_video", shape=video_shape({"cpu": 4, "cuda": 16},
                                                                                         {"cpu": 3, "cuda": 3}),
                            **common),
    ]


def _video_variant_ops() -> list[OpSpec]:
    """The video volume's variants measured for the CUDA sampler, none of them in --quick runs:

    grid_sample_video_channels: the channel sweep, C = 16, 32, 64 (the size is C) on 16 frames of
    112 x 112 (4 volumes; one volume of 56 x 56 on the CPU).
    grid_sample_video_channels_last: the input in channels_last_3d memory layout.
    grid_sample_video_deterministic: our backward under torch.use_deterministic_algorithms(True)
    (fwd+bwd only; torch's backward stays as it is, as its CUDA one has no deterministic version).
    """
    video_op = next(op for op in _video_ops() if op.name == "grid_sample_video")
    make_contiguous_inputs = video_op.make_inputs

    def channels_last_inputs(shape: Shape, dtype: torch.dtype, device: torch.device,
                             generator: torch.Generator) -> Inputs:
        inputs = make_contiguous_inputs(shape, dtype, device, generator)
        inputs["input"] = inputs["input"].contiguous(memory_format=torch.channels_last_3d)
        return inputs

    def channel_sweep_shape(size: int, device_type: str) -> Shape:
        side = 112 if device_type == "cuda" else 56
        return {"N": 4 if device_type == "cuda" else 1, "C": size, "D": 16, "H": side, "W": side}

    not_quick = {"cpu": (), "cuda": ()}
    return [
        dataclasses.replace(video_op, name="grid_sample_video_channels", shape=channel_sweep_shape,
                            size_meaning="channels C of 16-frame video volumes",
                            default_sizes={"cpu": (16, 32, 64), "cuda": (16, 32, 64)}, quick_sizes=not_quick),
        dataclasses.replace(video_op, name="grid_sample_video_channels_last", make_inputs=channels_last_inputs,
                            label=lambda s: _sampling_label(3)(s) + " channels-last", quick_sizes=not_quick),
        dataclasses.replace(video_op, name="grid_sample_video_deterministic", passes=("fwd+bwd", "bwd"),
                            deterministic_backward=True, label=lambda s: _sampling_label(3)(s) + " deterministic",
                            quick_sizes=not_quick),
    ]


def _rgb_ops() -> list[OpSpec]:
    """grid_sample_rgb: a batch of 4 RGB images (C = 3), the spatial transformer's usual input, where
    torch's 2-D kernel (vectorised over points) is strongest; affine_grid_sample_rgb: the same images
    through the fused op (a spatial transformer's sampler), against torch's affine_grid + grid_sample."""
    rgb = dict(shape=_sampling_shape({"cpu": 4, "cuda": 64}, {"cpu": 3, "cuda": 3}, 2),
               size_meaning="side of RGB images (H = W)", default_sizes={"cpu": (112, 224), "cuda": (224, 512)},
               quick_sizes={"cpu": (56,), "cuda": (224,)})
    grid_op = next(op for op in _sampling_ops() if op.name == "grid_sample_2d")
    fused_op = next(op for op in _sampling_ops() if op.name == "affine_grid_sample_2d")
    return [dataclasses.replace(grid_op, name="grid_sample_rgb", **rgb),
            dataclasses.replace(fused_op, name="affine_grid_sample_rgb", **rgb)]


def sampling_ops() -> list[OpSpec]:
    """Every sampling op, in the order the bench command lists them."""
    return [*_sampling_ops(), *_video_ops(), *_video_variant_ops(), *_rgb_ops()]

"""The Triton sampling kernels shared by grid_sample and the fused affine_grid_sample.

One program samples a block of BLOCK_P output positions of one batch item and
loops over the channels in chunks of BLOCK_C: each point's per-axis taps are
computed once (``axis_origin``), and every tap is one masked gather of a
(BLOCK_P, BLOCK_C) tile. 2-D problems run as 3-D ones with a depth of 1 and a
single tap along z.

The two ops differ only in where a point's coordinates come from: a stored
grid (``AFFINE=False``), or theta applied on the fly to affine_grid's base
grid (``AFFINE=True``), which never stores the grid. In the backward, the
gradient of the coordinates goes to ``grad_grid``, or is contracted with the
base grid into one partial theta gradient per program (summed afterwards
in a fixed order, so the theta gradient is deterministic).

The input gradient is scattered with atomic adds into a channels-last buffer
in the accumulation dtype: the atomics of one tap cover BLOCK_C contiguous
channels (coalesced), instead of one atomic per channel at a stride of the
whole volume; contention is limited to output points that share a tap.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._gradients import gradient_memory_format
from ._sampling_math import axis_origin, axis_tap, base_coordinate

INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _point_coordinates(coords_ptr, n, p, pmask, pz, py, px, OD, OH, OW, g_n, g_d, g_h, g_w, g_k,
                       DIMS: tl.constexpr, AFFINE: tl.constexpr, ALIGN_CORNERS: tl.constexpr, ACC: tl.constexpr):
    """(gx, gy, gz) of each point: loaded from the grid, or theta[n] @ [bx, by, (bz,) 1]."""
    if AFFINE:
        bx = base_coordinate(px, OW, ALIGN_CORNERS, ACC)
        by = base_coordinate(py, OH, ALIGN_CORNERS, ACC)
        theta = coords_ptr + n * (DIMS * (DIMS + 1))
        if DIMS == 3:
            bz = base_coordinate(pz, OD, ALIGN_CORNERS, ACC)
            gx = (tl.load(theta + 3).to(ACC) + tl.load(theta + 0).to(ACC) * bx + tl.load(theta + 1).to(ACC) * by
                  + tl.load(theta + 2).to(ACC) * bz)
            gy = (tl.load(theta + 7).to(ACC) + tl.load(theta + 4).to(ACC) * bx + tl.load(theta + 5).to(ACC) * by
                  + tl.load(theta + 6).to(ACC) * bz)
            gz = (tl.load(theta + 11).to(ACC) + tl.load(theta + 8).to(ACC) * bx + tl.load(theta + 9).to(ACC) * by
                  + tl.load(theta + 10).to(ACC) * bz)
        else:
            gx = tl.load(theta + 2).to(ACC) + tl.load(theta + 0).to(ACC) * bx + tl.load(theta + 1).to(ACC) * by
            gy = tl.load(theta + 5).to(ACC) + tl.load(theta + 3).to(ACC) * bx + tl.load(theta + 4).to(ACC) * by
            gz = tl.zeros_like(gx)
    else:
        point = coords_ptr + n.to(tl.int64) * g_n + pz * g_d + py * g_h + px * g_w
        gx = tl.load(point, mask=pmask, other=0).to(ACC)
        gy = tl.load(point + g_k, mask=pmask, other=0).to(ACC)
        if DIMS == 3:
            gz = tl.load(point + 2 * g_k, mask=pmask, other=0).to(ACC)
        else:
            gz = tl.zeros_like(gx)
    return gx, gy, gz


@triton.jit
def _wide(x, WIDE: tl.constexpr):
    """x as int64 when offsets may pass 2**31 (``WIDE``), else unchanged."""
    if WIDE:
        return tl.cast(x, tl.int64)
    else:
        return x


@triton.jit
def _block_of_points(OD, OH, OW, BLOCK_P: tl.constexpr, WIDE: tl.constexpr):
    """(n, positions p, mask, pz, py, px, P) of this program: a 1-D launch of N * cdiv(P, BLOCK_P)
    programs, so the batch is not bound by a grid axis limit of 65535."""
    P = _wide(OD, WIDE) * OH * OW
    blocks = tl.cdiv(P, BLOCK_P)
    pid = tl.program_id(0)
    n = pid // blocks
    p = _wide(pid % blocks, WIDE) * BLOCK_P + tl.arange(0, BLOCK_P)
    px = p % OW
    py = (p // OW) % OH
    pz = p // (OW * OH)
    return n, p, p < P, pz, py, px, P


@triton.jit
def _origins(gx, gy, gz, IW, IH, ID, MODE: tl.constexpr, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
             DIMS: tl.constexpr):
    """(origin, fraction, slope) of each axis (x, y, z) of the points' taps; z is unused in 2-D."""
    VOLUMETRIC: tl.constexpr = DIMS == 3
    ox, fx, sx = axis_origin(gx, IW, MODE, PADDING, ALIGN_CORNERS, VOLUMETRIC)
    oy, fy, sy = axis_origin(gy, IH, MODE, PADDING, ALIGN_CORNERS, VOLUMETRIC)
    if VOLUMETRIC:
        oz, fz, sz = axis_origin(gz, ID, MODE, PADDING, ALIGN_CORNERS, VOLUMETRIC)
        return ox, fx, sx, oy, fy, sy, oz, fz, sz
    else:
        return ox, fx, sx, oy, fy, sy, gz, gz, gz


@triton.jit
def _tap(ox, fx, sx, oy, fy, sy, oz, fz, sz, IW, IH, ID, TAP: tl.constexpr, K: tl.constexpr, MODE: tl.constexpr,
         PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr, DIMS: tl.constexpr):
    """Tap ``TAP`` of the tensor product of the axes' K taps (x fastest, then y, then z):
    (z, y, x indices, valid, weight, d weight / d gx, gy, gz)."""
    VOLUMETRIC: tl.constexpr = DIMS == 3
    ix, vx, wx, dwx = axis_tap(ox, fx, sx, IW, TAP % K, MODE, PADDING, ALIGN_CORNERS, VOLUMETRIC)
    iy, vy, wy, dwy = axis_tap(oy, fy, sy, IH, (TAP // K) % K, MODE, PADDING, ALIGN_CORNERS, VOLUMETRIC)
    if VOLUMETRIC:
        iz, vz, wz, dwz = axis_tap(oz, fz, sz, ID, TAP // (K * K), MODE, PADDING, ALIGN_CORNERS, VOLUMETRIC)
        weight = wx * wy * wz
        return iz, iy, ix, vx & vy & vz, weight, dwx * wy * wz, wx * dwy * wz, wx * wy * dwz
    else:
        weight = wx * wy
        return tl.zeros_like(ix), iy, ix, vx & vy, weight, dwx * wy, wx * dwy, tl.zeros_like(weight)


@triton.jit
def sample_forward_kernel(
    input_ptr, coords_ptr, out_ptr,
    C, ID, IH, IW, OD, OH, OW,
    i_n, i_c, i_d, i_h, i_w,  # input strides
    g_n, g_d, g_h, g_w, g_k,  # grid strides (unused when AFFINE)
    MODE: tl.constexpr, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr, DIMS: tl.constexpr,
    AFFINE: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
):
    """out: (N, C, OD * OH * OW) contiguous; one program per (n, block of BLOCK_P positions).
    WIDE: int64 positions and channels, for offsets past 2**31 within one batch item."""
    VOLUMETRIC: tl.constexpr = DIMS == 3
    K: tl.constexpr = 2 if MODE == 0 else (1 if MODE == 1 else 4)
    TAPS: tl.constexpr = K * K * (K if DIMS == 3 else 1)
    n, p, pmask, pz, py, px, P = _block_of_points(OD, OH, OW, BLOCK_P, WIDE)
    gx, gy, gz = _point_coordinates(coords_ptr, n, p, pmask, pz, py, px, OD, OH, OW, g_n, g_d, g_h, g_w, g_k,
                                    DIMS, AFFINE, ALIGN_CORNERS, ACC)
    ox, fx, sx, oy, fy, sy, oz, fz, sz = _origins(gx, gy, gz, IW, IH, ID, MODE, PADDING, ALIGN_CORNERS, DIMS)
    source = input_ptr + n.to(tl.int64) * i_n
    out = out_ptr + n.to(tl.int64) * C * P
    for c0 in range(0, C, BLOCK_C):
        c = _wide(c0, WIDE) + tl.arange(0, BLOCK_C)
        cmask = c < C
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
        for tap in tl.static_range(TAPS):
            iz, iy, ix, valid, weight, _, _, _ = _tap(
                ox, fx, sx, oy, fy, sy, oz, fz, sz, IW, IH, ID, tap, K, MODE, PADDING, ALIGN_CORNERS, DIMS)
            offset = iz * i_d + iy * i_h + ix * i_w
            values = tl.load(source + offset[:, None] + c[None, :] * i_c,
                             mask=(valid & pmask)[:, None] & cmask[None, :], other=0).to(ACC)
            if not VOLUMETRIC:
                # torch's 4-D kernel multiplies a non-finite weight by a zero tap: NaN.
                acc += weight[:, None] * values
            else:
                acc += tl.where(valid, weight, 0.0)[:, None] * values
        tl.store(out + c[None, :] * P + p[:, None], acc, mask=pmask[:, None] & cmask[None, :])


@triton.jit
def sample_backward_kernel(
    grad_out_ptr, input_ptr, coords_ptr, grad_input_ptr, grad_coords_ptr,
    C, ID, IH, IW, OD, OH, OW,
    o_n, o_c, o_d, o_h, o_w,  # grad_output strides
    i_n, i_c, i_d, i_h, i_w,  # input strides
    g_n, g_d, g_h, g_w, g_k,  # grid strides (unused when AFFINE)
    MODE: tl.constexpr, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr, DIMS: tl.constexpr,
    AFFINE: tl.constexpr, ACC: tl.constexpr, NEED_INPUT: tl.constexpr, NEED_COORDS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, WIDE: tl.constexpr,
):
    """grad_input: (N, ID, IH, IW, C) contiguous in ACC, zeroed, accumulated atomically;
    grad_coords: grad_grid (N, OD * OH * OW, DIMS) contiguous, or with AFFINE the partial theta
    gradients (N, programs along positions, DIMS * (DIMS + 1)) in ACC."""
    K: tl.constexpr = 2 if MODE == 0 else (1 if MODE == 1 else 4)
    TAPS: tl.constexpr = K * K * (K if DIMS == 3 else 1)
    COORD_GRAD: tl.constexpr = NEED_COORDS and MODE != 1
    n, p, pmask, pz, py, px, P = _block_of_points(OD, OH, OW, BLOCK_P, WIDE)
    gx, gy, gz = _point_coordinates(coords_ptr, n, p, pmask, pz, py, px, OD, OH, OW, g_n, g_d, g_h, g_w, g_k,
                                    DIMS, AFFINE, ALIGN_CORNERS, ACC)
    ox, fx, sx, oy, fy, sy, oz, fz, sz = _origins(gx, gy, gz, IW, IH, ID, MODE, PADDING, ALIGN_CORNERS, DIMS)
    source = input_ptr + n.to(tl.int64) * i_n
    grad_out = grad_out_ptr + n.to(tl.int64) * o_n + pz * o_d + py * o_h + px * o_w
    grad_source = grad_input_ptr + n.to(tl.int64) * ID * IH * IW * C
    grad_x = tl.zeros((BLOCK_P,), dtype=ACC)
    grad_y = tl.zeros((BLOCK_P,), dtype=ACC)
    grad_z = tl.zeros((BLOCK_P,), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = _wide(c0, WIDE) + tl.arange(0, BLOCK_C)
        cmask = c < C
        tile_mask = pmask[:, None] & cmask[None, :]
        g = tl.load(grad_out[:, None] + c[None, :] * o_c, mask=tile_mask, other=0).to(ACC)
        for tap in tl.static_range(TAPS):
            iz, iy, ix, valid, weight, dwx, dwy, dwz = _tap(
                ox, fx, sx, oy, fy, sy, oz, fz, sz, IW, IH, ID, tap, K, MODE, PADDING, ALIGN_CORNERS, DIMS)
            tap_mask = valid[:, None] & tile_mask
            if NEED_INPUT:
                cell = (iz * IH + iy) * IW + ix
                tl.atomic_add(grad_source + cell[:, None] * C + c[None, :], weight[:, None] * g,
                              mask=tap_mask, sem="relaxed")
            if COORD_GRAD:
                offset = iz * i_d + iy * i_h + ix * i_w
                values = tl.load(source + offset[:, None] + c[None, :] * i_c, mask=tap_mask,
                                 other=0).to(ACC)
                dot = tl.sum(values * g, axis=1)
                # Taps outside the input are skipped, whatever their weight.
                grad_x += tl.where(valid, dwx * dot, 0.0)
                grad_y += tl.where(valid, dwy * dot, 0.0)
                if DIMS == 3:
                    grad_z += tl.where(valid, dwz * dot, 0.0)
    if NEED_COORDS:
        if AFFINE:
            # d loss / d theta[n, r, a] = sum over points of grad_r * base_a (base of the last column: 1).
            bx = base_coordinate(px, OW, ALIGN_CORNERS, ACC)
            by = base_coordinate(py, OH, ALIGN_CORNERS, ACC)
            grad_x = tl.where(pmask, grad_x, 0.0)
            grad_y = tl.where(pmask, grad_y, 0.0)
            blocks = tl.cdiv(P, BLOCK_P)
            partial = grad_coords_ptr + (n.to(tl.int64) * blocks + tl.program_id(0) % blocks) * (DIMS * (DIMS + 1))
            if DIMS == 3:
                bz = base_coordinate(pz, OD, ALIGN_CORNERS, ACC)
                grad_z = tl.where(pmask, grad_z, 0.0)
                tl.store(partial + 0, tl.sum(grad_x * bx))
                tl.store(partial + 1, tl.sum(grad_x * by))
                tl.store(partial + 2, tl.sum(grad_x * bz))
                tl.store(partial + 3, tl.sum(grad_x))
                tl.store(partial + 4, tl.sum(grad_y * bx))
                tl.store(partial + 5, tl.sum(grad_y * by))
                tl.store(partial + 6, tl.sum(grad_y * bz))
                tl.store(partial + 7, tl.sum(grad_y))
                tl.store(partial + 8, tl.sum(grad_z * bx))
                tl.store(partial + 9, tl.sum(grad_z * by))
                tl.store(partial + 10, tl.sum(grad_z * bz))
                tl.store(partial + 11, tl.sum(grad_z))
            else:
                tl.store(partial + 0, tl.sum(grad_x * bx))
                tl.store(partial + 1, tl.sum(grad_x * by))
                tl.store(partial + 2, tl.sum(grad_x))
                tl.store(partial + 3, tl.sum(grad_y * bx))
                tl.store(partial + 4, tl.sum(grad_y * by))
                tl.store(partial + 5, tl.sum(grad_y))
        else:
            point = grad_coords_ptr + (n.to(tl.int64) * P + p) * DIMS
            tl.store(point, grad_x, mask=pmask)
            tl.store(point + 1, grad_y, mask=pmask)
            if DIMS == 3:
                tl.store(point + 2, grad_z, mask=pmask)


# ----------------------------------------------------------------------------- launch helpers


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return {torch.float64: tl.float64, torch.float32: tl.float32}[dtype]


def block_sizes(channels: int, taps: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): small tiles under the interpreter (each op is a numpy call there),
    about 4K elements per gather on a GPU, fewer positions for the 64-tap bicubic 3-D."""
    block_c = min(triton.next_power_of_2(max(channels, 1)), 16 if INTERPRETER else 64)
    if INTERPRETER:
        return 64, block_c
    block_p = max(16, min(256, 4096 // block_c))
    if taps >= 16:
        block_p = max(16, block_p // 2)
    return block_p, block_c


# Tests set this to run the int64-offset code on small inputs.
ALWAYS_WIDE = False


def item_extent(t: torch.Tensor) -> int:
    """One past the largest element offset within one batch item of ``t``."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))


def needs_wide_offsets(*extents: int) -> bool:
    """Whether some offset within one batch item (the largest of ``extents``) may not fit in int32."""
    return ALWAYS_WIDE or max(extents) >= 2**31 - 1


def launch_grid(batch: int, points: int, block_p: int) -> tuple[int]:
    """One program per (batch item, block of positions) on grid axis x (up to 2**31 - 1 programs)."""
    programs = batch * triton.cdiv(points, block_p)
    if programs >= 2**31:
        raise RuntimeError(f"attnkernels (triton): {batch} x {points} output positions need {programs} programs, "
                           f"more than a CUDA grid holds; split the batch")
    return (programs,)


def input_geometry(input: torch.Tensor) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """((D, H, W), input strides (n, c, d, h, w)) with D = 1 and stride 0 for 2-D inputs."""
    if input.dim() == 4:
        n_, c_, h_, w_ = input.stride()
        return (1, input.shape[2], input.shape[3]), (n_, c_, 0, h_, w_)
    return tuple(input.shape[2:]), tuple(input.stride())


def input_gradient(grad_source: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """The channels-last accumulation buffer (N, [D,] H, W, C) as the gradient of ``input``."""
    fmt = gradient_memory_format(input)
    return grad_source.movedim(-1, 1).to(input.dtype).contiguous(memory_format=fmt)


def output_geometry(spatial: list[int]) -> tuple[int, int, int]:
    return (1, *spatial) if len(spatial) == 2 else tuple(spatial)

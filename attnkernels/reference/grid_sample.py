"""grid_sample and affine_grid written from the math in plain PyTorch.

This is the independent oracle the kernels are tested against, and the
fallback backend when the extension is not built: it never calls
``F.grid_sample`` or ``F.affine_grid``. Every step is an ordinary
differentiable tensor op, so autograd gives gradients (and gradients of
gradients) to the input, the grid and theta.

Each spatial axis is handled alone: a normalised coordinate becomes a few
taps (index, weight, valid); a 2-D or 3-D sample is the tensor product of its
axes' taps, gathered from the flattened input.
"""

from __future__ import annotations

import itertools

import torch

from .._modes import INTERPOLATIONS, PADDINGS

_CUBIC_A = -0.75  # Keys' kernel, as torch


def _unnormalize(coord: torch.Tensor, size: int, align_corners: bool) -> torch.Tensor:
    """[-1, 1] to pixel units: the corners' centres (align_corners) or the corners' edges."""
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    return ((coord + 1) * size - 1) / 2


def _clip(x: torch.Tensor, size: int, nan_to: str) -> torch.Tensor:
    """Clip to [0, size - 1]; the gradient is 0 on and beyond the bounds.

    NaN goes to one edge, as torch's CPU kernels send it: the low edge for 4-D input (torch's
    documented rule, NaN as -1), the high edge for 5-D input (its 3-D kernel).
    """
    inside = (x > 0) & (x < size - 1)
    clipped = torch.where(inside, x, x.detach().clamp(0, size - 1))
    return torch.where(x.isnan(), 0.0 if nan_to == "low" else float(size - 1), clipped)


def _reflect(x: torch.Tensor, twice_low: int, twice_high: int) -> torch.Tensor:
    """Reflect about [twice_low / 2, twice_high / 2], repeatedly.

    The remainder modulo twice the span is exact in floating point (fmod always is), so huge
    coordinates reflect exactly; counting flips (distance / span) would round.
    """
    if twice_low == twice_high:
        # A size-1 axis: always 0, with a zero gradient (zeros_like would cut the grid out of the graph,
        # and autograd.grad to the grid would then fail instead of giving 0).
        return 0 * torch.nan_to_num(x)
    low = twice_low / 2
    span = (twice_high - twice_low) / 2
    shifted = x - low
    sign = torch.where(shifted < 0, -1.0, 1.0).to(x.dtype)
    distance = shifted * sign
    extra = torch.fmod(distance, 2 * span)
    return torch.where(extra > span, 2 * span - extra, extra) + low


def _pad(x: torch.Tensor, size: int, padding: str, align_corners: bool, nan_to: str) -> torch.Tensor:
    if padding == "border":
        return _clip(x, size, nan_to)
    if padding == "reflection":
        if align_corners:
            x = _reflect(x, 0, 2 * (size - 1))
        else:
            x = _reflect(x, -1, 2 * size - 1)
        return _clip(x, size, nan_to)  # an infinite coordinate reflects to NaN
    return x


def _cubic_weights(t: torch.Tensor) -> list[torch.Tensor]:
    """Keys' cubic convolution weights of the taps floor(x) - 1 .. floor(x) + 2."""
    a = _CUBIC_A

    def inner(s):  # |s| <= 1
        return ((a + 2) * s - (a + 3)) * s * s + 1

    def outer(s):  # 1 < |s| < 2
        return ((a * s - 5 * a) * s + 8 * a) * s - 4 * a

    return [outer(t + 1), inner(t), inner(1 - t), outer(2 - t)]


def _axis_taps(coord: torch.Tensor, size: int, mode: str, padding: str, align_corners: bool, nan_to: str):
    """The taps of one axis: a list of (integer coordinate, weight, valid)."""
    x = _unnormalize(coord, size, align_corners)
    if mode == "bicubic":
        x0 = torch.floor(x.detach())
        weights = _cubic_weights(x - x0)
        taps = []
        for k, w in enumerate(weights):
            tap = _pad(x0 + (k - 1), size, padding, align_corners, nan_to).detach()
            taps.append((tap, w, (tap >= 0) & (tap <= size - 1)))
        return taps
    x = _pad(x, size, padding, align_corners, nan_to)
    if mode == "nearest":
        tap = torch.round(x.detach())  # half to even, as nearbyint
        # Weight 1 (also for a non-finite coordinate) with a zero gradient to the grid, as torch reports.
        return [(tap, torch.where(x.isfinite(), x * 0 + 1, 1.0), (tap >= 0) & (tap <= size - 1))]
    x0 = torch.floor(x.detach())
    t = x - x0
    return [
        (x0, 1 - t, (x0 >= 0) & (x0 <= size - 1)),
        (x0 + 1, t, (x0 + 1 >= 0) & (x0 + 1 <= size - 1)),
    ]


def grid_sample(input: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool = False) -> torch.Tensor:
    """Sample ``input`` at ``grid``.

    input: (N, C, H, W) or (N, C, D, H, W)
    grid: (N, Ho, Wo, 2) or (N, Do, Ho, Wo, 3), last dimension ordered x, y(, z), in [-1, 1]
    returns: (N, C, Ho, Wo) or (N, C, Do, Ho, Wo)
    """
    if mode not in INTERPOLATIONS or padding_mode not in PADDINGS:
        raise ValueError(f"unknown mode {mode!r} or padding_mode {padding_mode!r}")
    out_dtype = input.dtype
    compute = torch.promote_types(input.dtype, torch.float32)
    input, grid = input.to(compute), grid.to(compute)
    n, c = input.shape[:2]
    spatial = input.shape[2:]  # (D,) H, W
    dims = len(spatial)
    out_spatial = grid.shape[1:-1]
    points = 1
    for s in out_spatial:
        points *= s
    flat_input = input.reshape(n, c, -1) if n and c else input.new_zeros((n, c, spatial.numel()))
    flat_grid = grid.reshape(n, points, dims)
    # Axis a of the grid (x, y, z) samples input dimension -1 - a.
    sizes = [spatial[dims - 1 - a] for a in range(dims)]
    axis_strides = [1]
    for a in range(1, dims):
        axis_strides.append(axis_strides[-1] * sizes[a - 1])
    # torch's 4-D CPU kernel sends NaN to the low edge and lets a NaN weight times an outside tap give
    # NaN; its 5-D kernel sends NaN to the high edge and skips outside taps (zeros padding gives 0).
    nan_to = "low" if dims == 2 else "high"
    axes = [_axis_taps(flat_grid[..., a], sizes[a], mode, padding_mode, align_corners, nan_to) for a in range(dims)]

    out = flat_input.new_zeros((n, c, points))
    for combo in itertools.product(*axes):
        index = torch.zeros((n, points), dtype=torch.long, device=input.device)
        weight = torch.ones((n, points), dtype=compute, device=input.device)
        valid = torch.ones((n, points), dtype=torch.bool, device=input.device)
        for (tap, w, ok), stride in zip(combo, axis_strides, strict=True):
            index = index + torch.where(ok, tap, 0).long() * stride
            weight = weight * w
            valid = valid & ok
        if dims == 3:  # outside taps skipped, their (possibly NaN) weights too
            weight = torch.where(valid, weight, 0.0)
        values = flat_input.gather(2, index.unsqueeze(1).expand(n, c, points))
        out = out + weight.unsqueeze(1) * torch.where(valid.unsqueeze(1), values, 0)
    return out.reshape(n, c, *out_spatial).to(out_dtype)


def base_grid(size: list[int] | tuple[int, ...], align_corners: bool, dtype: torch.dtype,
              device: torch.device | None = None) -> torch.Tensor:
    """Homogeneous base coordinates of an output of ``size`` (N, C, [D,] H, W).

    returns: ([D,] H, W, dims + 1), last dimension ordered x, y(, z), 1
    """
    spatial = list(size[2:])

    def axis(n: int) -> torch.Tensor:
        if n <= 1:
            return torch.zeros(max(n, 0), dtype=dtype, device=device)
        i = torch.arange(n, dtype=dtype, device=device)
        values = i * (2 / (n - 1)) - 1
        return values * (n - 1) / n if not align_corners else values

    coords = torch.meshgrid(*[axis(n) for n in spatial], indexing="ij")  # ordered z, y, x
    ones = torch.ones(spatial, dtype=dtype, device=device)
    return torch.stack([*reversed(coords), ones], dim=-1)


def affine_grid(theta: torch.Tensor, size: list[int] | tuple[int, ...], align_corners: bool = False) -> torch.Tensor:
    """Sampling grid of an affine map.

    theta: (N, 2, 3) for size (N, C, H, W), or (N, 3, 4) for size (N, C, D, H, W)
    returns: (N, H, W, 2) or (N, D, H, W, 3), grid = [x, y(, z), 1] @ theta^T
    """
    base = base_grid(size, align_corners, theta.dtype, theta.device)
    dims = len(size) - 2
    flat = base.reshape(1, -1, dims + 1).expand(theta.shape[0], -1, -1)
    return torch.bmm(flat, theta.transpose(1, 2)).reshape(theta.shape[0], *size[2:], dims)


def affine_grid_sample(input: torch.Tensor, theta: torch.Tensor, size: list[int] | tuple[int, ...],
                       mode: str = "bilinear", padding_mode: str = "zeros",
                       align_corners: bool = False) -> torch.Tensor:
    """grid_sample(input, affine_grid(theta, size)), with theta: (N, 2, 3) or (N, 3, 4)."""
    compute = torch.promote_types(theta.dtype, torch.float32)
    # The grid is computed in float64 and rounded once: a float32 product rounds some coordinates to
    # the other side of a pixel boundary, where the bilinear gradient jumps by a whole step; on the
    # bench's 256 x 256 output that put theta's gradient (summed over every point) 1.41e3 from the
    # float64 result, against torch's own 17.5. MPS has no float64.
    wide = compute if theta.device.type == "mps" else torch.float64
    grid = affine_grid(theta.to(wide), size, align_corners).to(compute)
    return grid_sample(input, grid, mode, padding_mode, align_corners)

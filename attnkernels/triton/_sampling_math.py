"""Per-axis index and weight math for grid sampling, as ``@triton.jit`` helpers.

Triton cannot include ``csrc/grid_sample_math.h``; this module mirrors it
function by function (same names, same order of floating-point operations,
same NaN policy), so the Triton kernels agree with the C++ ones:

- a normalised coordinate in [-1, 1] becomes pixel units (``unnormalize``),
- a padding mode moves it (``pad_coordinate``: identity, clip, reflect-then-clip),
- ``axis_origin`` reduces it to (origin, fraction, slope) once per point, and
- ``axis_tap`` gives tap k of the axis: (index, valid, weight, d weight / d coordinate).

``VOLUMETRIC`` selects the NaN policy of torch's 5-D CPU kernel (clipping
sends NaN to the high edge) rather than its 4-D one (to the low edge).
Modes and paddings are numbered as in torch: bilinear 0, nearest 1, bicubic 2;
zeros 0, border 1, reflection 2.
"""

from __future__ import annotations

import triton
import triton.language as tl

CUBIC_A: tl.constexpr = tl.constexpr(-0.75)  # Keys' kernel parameter, as torch


@triton.jit
def unnormalize(coord, size, ALIGN_CORNERS: tl.constexpr):
    """[-1, 1] to pixel units; also returns d pixel / d coordinate."""
    if ALIGN_CORNERS:
        return (coord + 1) / 2 * (size - 1), (size - 1) / 2
    else:
        return ((coord + 1) * size - 1) / 2, size / 2


@triton.jit
def clip_coordinate(x, size, VOLUMETRIC: tl.constexpr):
    """Clip to [0, size - 1]; the gradient factor is 0 on and beyond each bound."""
    high = tl.cast(size - 1, x.dtype)  # tl.cast: a size of 1 arrives as a constexpr, which has no .to()
    inside = (x > 0) & (x < high)
    if VOLUMETRIC:
        clipped = tl.where(x <= 0, 0.0, high)  # NaN fails both tests: high
    else:
        clipped = tl.where(x >= high, high, 0.0)  # NaN fails both tests: 0
    return tl.where(inside, x, clipped).to(x.dtype), tl.where(inside, 1.0, 0.0).to(x.dtype)


@triton.jit
def reflect_coordinate(x, twice_low, twice_high, VOLUMETRIC: tl.constexpr):
    """Reflect about [twice_low / 2, twice_high / 2] repeatedly; the gradient sign flips per reflection.

    Evaluated as csrc/grid_sample_math.h does for each policy (they differ only for huge coordinates):
    planar (4-D) by the remainder of a division by twice the span, volumetric (5-D) by fmod and the
    parity of the number of flips.
    """
    low = twice_low / 2
    shifted = x - low
    sign = tl.where(shifted < 0, -1.0, 1.0)
    distance = tl.abs(shifted)
    if VOLUMETRIC:
        span = (twice_high - twice_low) / 2
        extra = distance % span  # fmod: float remainder follows C's fmod, also under the interpreter
        # Parity of the flips in floating point (a huge or NaN count has no integer value).
        flips = tl.floor(distance / span)
        odd = (flips % 2) == 1
        reflected = tl.where(odd, span - extra + low, extra + low)
        grad = tl.where(odd, -sign, sign)
    else:
        twice_span = (twice_high - twice_low) * 1.0
        quotient = distance / twice_span
        extra = distance - tl.where(quotient < 0, tl.ceil(quotient), tl.floor(quotient)) * twice_span
        mirrored = twice_span - extra
        flip = extra > mirrored
        reflected = tl.where(flip, mirrored + low, extra + low)
        grad = tl.where(flip, -sign, sign)
    if x.dtype != tl.float64:
        # A huge float coordinate: the float flip count rounds whole pixels off; the remainder modulo
        # twice the span, taken in float64, is exact (as csrc/grid_sample_math.h does).
        wide = distance.to(tl.float64)
        wide_span = (twice_high - twice_low) * 1.0
        wide_extra = wide % wide_span.to(tl.float64)
        wide_flip = wide_extra > wide_span / 2
        huge = (distance >= 4194304.0) & (distance <= 3.0e38)
        reflected = tl.where(huge, (tl.where(wide_flip, wide_span - wide_extra, wide_extra) + low).to(x.dtype),
                             reflected)
        grad = tl.where(huge, tl.where(wide_flip, -sign, sign), grad)
    degenerate = twice_low == twice_high  # a size-1 axis (align_corners): always 0
    return tl.where(degenerate, 0.0, reflected).to(x.dtype), tl.where(degenerate, 0.0, grad).to(x.dtype)


@triton.jit
def pad_coordinate(x, size, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr, VOLUMETRIC: tl.constexpr):
    """Apply the padding mode to a pixel coordinate; also returns its gradient factor."""
    if PADDING == 1:
        return clip_coordinate(x, size, VOLUMETRIC)
    elif PADDING == 2:
        if ALIGN_CORNERS:
            reflected, reflect_grad = reflect_coordinate(x, 0, 2 * (size - 1), VOLUMETRIC)
        else:
            reflected, reflect_grad = reflect_coordinate(x, -1, 2 * size - 1, VOLUMETRIC)
        clipped, clip_grad = clip_coordinate(reflected, size, VOLUMETRIC)
        return clipped, reflect_grad * clip_grad
    else:
        return x, tl.full(x.shape, 1.0, x.dtype)


@triton.jit
def round_half_even(x):
    """nearbyint in the default rounding mode (0.5 -> 0, 1.5 -> 2, 2.5 -> 2)."""
    down = tl.floor(x)
    diff = x - down  # exact
    up = (diff > 0.5) | ((diff == 0.5) & ((down % 2) != 0))
    return tl.where(up, down + 1, down)


@triton.jit
def in_range(tap, size):
    """Whether an integral-valued coordinate lies in [0, size - 1] (False for NaN)."""
    return (tap >= 0) & (tap <= (size - 1))


@triton.jit
def cubic_weight(t, K: tl.constexpr):
    """Keys' weight of tap K (floor(x) - 1 + K) at fractional offset t, and d weight / dt."""
    A: tl.constexpr = CUBIC_A
    if K == 0:
        s = t + 1
        w = ((A * s - 5 * A) * s + 8 * A) * s - 4 * A
        dw = (3 * A * s - 10 * A) * s + 8 * A
    elif K == 1:
        s = t
        w = ((A + 2) * s - (A + 3)) * s * s + 1
        dw = (3 * (A + 2) * s - 2 * (A + 3)) * s
    elif K == 2:
        s = 1 - t
        w = ((A + 2) * s - (A + 3)) * s * s + 1
        dw = -((3 * (A + 2) * s - 2 * (A + 3)) * s)
    else:
        s = 2 - t
        w = ((A * s - 5 * A) * s + 8 * A) * s - 4 * A
        dw = -((3 * A * s - 10 * A) * s + 8 * A)
    return w.to(t.dtype), dw.to(t.dtype)


@triton.jit
def axis_origin(coord, size, MODE: tl.constexpr, PADDING: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
                VOLUMETRIC: tl.constexpr):
    """Reduce a normalised coordinate to (origin, fraction, slope), computed once per point.

    bilinear: origin = floor(padded x), slope = d padded x / d coord;
    nearest: origin = round(padded x);
    bicubic: origin = floor(unpadded x) (padding applies to each tap), slope = d x / d coord.
    """
    x, scale = unnormalize(coord, size, ALIGN_CORNERS)
    if MODE == 2:
        origin = tl.floor(x)
        return origin, x - origin, tl.full(x.shape, scale, x.dtype)
    padded, pad_grad = pad_coordinate(x, size, PADDING, ALIGN_CORNERS, VOLUMETRIC)
    if MODE == 1:
        return round_half_even(padded), tl.zeros_like(padded), tl.zeros_like(padded)
    origin = tl.floor(padded)
    return origin, padded - origin, scale * pad_grad


@triton.jit
def axis_tap(origin, frac, slope, size, K: tl.constexpr, MODE: tl.constexpr, PADDING: tl.constexpr,
             ALIGN_CORNERS: tl.constexpr, VOLUMETRIC: tl.constexpr):
    """Tap K of one axis: (index as int64, valid, weight, d weight / d normalised coordinate).

    Taps outside the input have valid False and index 0.
    """
    if MODE == 2:
        tap, _ = pad_coordinate(origin + (K - 1), size, PADDING, ALIGN_CORNERS, VOLUMETRIC)
        weight, dweight = cubic_weight(frac, K)
        dweight = dweight * slope
    elif MODE == 1:
        tap = origin
        weight = tl.full(origin.shape, 1.0, origin.dtype)
        dweight = tl.zeros_like(origin)
    else:
        tap = origin + K
        if K == 0:
            weight = 1 - frac
            dweight = -slope
        else:
            weight = frac
            dweight = slope
    valid = in_range(tap, size)
    index = tl.where(valid, tap, 0.0).to(tl.int64)
    return index, valid, weight, dweight


@triton.jit
def base_coordinate(i, n, ALIGN_CORNERS: tl.constexpr, DTYPE: tl.constexpr):
    """Position i of n on affine_grid's base grid: linspace(-1, 1, n), times (n - 1) / n without
    align_corners; a single position sits at 0. Evaluated symmetrically, like torch's linspace."""
    # tl.cast rather than .to(): Triton passes n == 1 as a constexpr.
    step = 2.0 / tl.cast(tl.maximum(tl.cast(n, tl.int32), 2) - 1, DTYPE)
    value = tl.where(i < n // 2, -1.0 + step * tl.cast(i, DTYPE), 1.0 - step * tl.cast(n - 1 - i, DTYPE))
    if not ALIGN_CORNERS:
        value = value * tl.cast(n - 1, DTYPE) / tl.cast(n, DTYPE)
    return tl.where(n <= 1, 0.0, value).to(DTYPE)

"""Shared inputs, random problems (hypothesis) and the low-precision error rule for the sampling tests."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hypothesis import strategies as st

MODES = ("bilinear", "nearest", "bicubic")
PADDINGS = ("zeros", "border", "reflection")
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def make_input(dims: int, dtype=torch.float64, batch=2, channels=3, spatial=None, seed=0) -> torch.Tensor:
    """A (batch, channels, [D,] H, W) input with odd, unequal sizes."""
    gen = torch.Generator().manual_seed(seed)
    spatial = spatial or ((5, 6, 7) if dims == 3 else (6, 7))
    return torch.randn((batch, channels, *spatial), generator=gen, dtype=torch.float64).to(dtype)


def make_grid(dims: int, dtype=torch.float64, batch=2, out=None, spread=1.25, seed=1) -> torch.Tensor:
    """Grid points in [-spread, spread]: some fall outside [-1, 1] to exercise the padding."""
    gen = torch.Generator().manual_seed(seed)
    out = out or ((3, 4, 5) if dims == 3 else (4, 5))
    g = (torch.rand((batch, *out, dims), generator=gen, dtype=torch.float64) * 2 - 1) * spread
    return g.to(dtype)


def make_theta(dims: int, batch: int = 2, dtype=torch.float64, spread=0.3, seed=0) -> torch.Tensor:
    """Near-identity affine maps with rotation, scale, shear and shift, some reaching outside the input."""
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(dims, dims + 1, dtype=torch.float64)
    return (eye + spread * torch.randn((batch, dims, dims + 1), generator=gen, dtype=torch.float64)).to(dtype)


def pixel_quad_cases(test):
    """The cases of the CPU pixel-quad tests (fp32 bilinear with 3 or 4 channels): 2-D and 3-D, zeros and border
    padding, both alignments, 3 and 4 channels, odd and one-pixel axes, 1 and 3 threads, and the forward reading the
    quads or gathering (ATTNKERNELS_PIXEL_QUADS; the CPU's own choice is one of the two)."""
    for name, values in reversed((("dims", (2, 3)), ("padding", ("zeros", "border")), ("align", (False, True)),
                                  ("channels", (3, 4)), ("spatial", ("odd", "thin")), ("threads", (1, 3)),
                                  ("forward_quads", ("on", "off")))):
        test = pytest.mark.parametrize(name, values)(test)
    return test


def pixel_quad_input(dims: int, channels: int, spatial: str) -> torch.Tensor:
    """A float32 input for pixel_quad_cases, with infinite and NaN values spread through it."""
    sizes = {"odd": (5, 6, 13), "thin": (1, 1, 9)}[spatial][3 - dims:]
    x = make_input(dims, torch.float32, channels=channels, spatial=sizes)
    x.view(-1)[4::17] = float("inf")
    x.view(-1)[9::23] = float("nan")
    return x


def float_bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns of `t`, every NaN made the same NaN (payloads are not compared)."""
    t = t.detach().float().contiguous()
    return torch.where(t.isnan(), torch.full_like(t, float("nan")), t).view(torch.int32)


def torch_supports(dims: int, mode: str) -> bool:
    """torch has no 5-D bicubic (tricubic)."""
    return not (dims == 3 and mode == "bicubic")


def all_cases():
    """(dims, mode, padding, align_corners) for every combination."""
    return list(itertools.product((2, 3), MODES, PADDINGS, (False, True)))


def case_id(case) -> str:
    dims, mode, padding, align = case
    return f"{dims}d-{mode}-{padding}-{'align' if align else 'noalign'}"


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_torch_error(ours: torch.Tensor, theirs: torch.Tensor, truth: torch.Tensor, factor: float,
                              what: str) -> None:
    """The FlashAttention rule: our error against float64 is at most `factor` times torch's own
    error in the same dtype (plus one unit in the last place of the dtype at the output's scale,
    so that an exactly rounded torch result does not demand a zero error)."""
    ours_err = max_error(ours, truth)
    torch_err = max_error(theirs, truth)
    ulp = torch.finfo(ours.dtype).eps * max(1.0, truth.abs().max().item())
    assert ours_err <= factor * torch_err + ulp, (
        f"{what}: error {ours_err:.3g} against float64, torch's own {torch_err:.3g} (allowed {factor}x + {ulp:.3g})")


@dataclasses.dataclass(frozen=True)
class RandomCase:
    """One drawn sampling problem: sizes, options and the seed of its input and grid."""

    dims: int
    batch: int
    channels: int
    in_size: tuple[int, ...]
    out_size: tuple[int, ...]
    mode: str
    padding: str
    align: bool
    seed: int

    @property
    def input(self) -> torch.Tensor:
        return make_input(self.dims, batch=self.batch, channels=self.channels, spatial=self.in_size, seed=self.seed)

    @property
    def grid(self) -> torch.Tensor:
        return make_grid(self.dims, batch=self.batch, out=self.out_size, seed=self.seed + 1)


@st.composite
def random_case(draw, max_batch=3, max_channels=20, max_in=7, out_ranges=((1, 6), (1, 6), (1, 6)), modes=MODES,
                paddings=PADDINGS) -> RandomCase:
    """A RandomCase with sizes up to the bounds; `out_ranges` bounds the output's (depth, height, width).
    5-D bicubic (which torch lacks) is drawn as bilinear."""
    dims = draw(st.sampled_from((2, 3)))
    mode = draw(st.sampled_from(modes))
    return RandomCase(
        dims=dims,
        batch=draw(st.integers(1, max_batch)),
        channels=draw(st.integers(1, max_channels)),
        in_size=tuple(draw(st.integers(1, max_in)) for _ in range(dims)),
        out_size=tuple(draw(st.integers(low, high)) for low, high in out_ranges[-dims:]),
        mode=mode if torch_supports(dims, mode) else "bilinear",
        padding=draw(st.sampled_from(paddings)),
        align=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )

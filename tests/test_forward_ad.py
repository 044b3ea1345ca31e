"""Forward-mode AD (torch.autograd.forward_ad dual tensors) through every op.

The kernels' ops have no forward derivative; a call with a tangent on any input goes to the
reference backend, whose plain torch code propagates it (torch's own grid_sampler and CPU SDPA
raise NotImplementedError here). The tangents are checked against central finite differences
in float64. A backend named explicitly refuses dual inputs with its reason instead of dropping
the tangent.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

import attnkernels

STEP = 1e-6


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tangent_and_difference(fn, primals: dict[str, torch.Tensor], tangents: dict[str, torch.Tensor]):
    """fn's output tangent for the given input tangents, and the central difference along them."""
    with forward_ad.dual_level():
        duals = {name: forward_ad.make_dual(value, tangents[name]) if name in tangents else value
                 for name, value in primals.items()}
        tangent = forward_ad.unpack_dual(fn(**duals)).tangent
    plus = fn(**{name: value + STEP * tangents[name] if name in tangents else value for name, value in primals.items()})
    minus = fn(**{name: value - STEP * tangents[name] if name in tangents else value
                  for name, value in primals.items()})
    return tangent, (plus - minus) / (2 * STEP)


def _randn(*shape, seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=_generator(seed))


@pytest.mark.parametrize("which", ["query", "key", "value", "attn_mask", "all"])
def test_attention_tangents(which):
    primals = {"query": _randn(2, 3, 5, 8, seed=1), "key": _randn(2, 3, 7, 8, seed=2),
               "value": _randn(2, 3, 7, 4, seed=3), "attn_mask": _randn(5, 7, seed=4)}
    names = list(primals) if which == "all" else [which]
    tangents = {name: _randn(*primals[name].shape, seed=10 + i) for i, name in enumerate(names)}
    tangent, difference = _tangent_and_difference(attnkernels.scaled_dot_product_attention, primals, tangents)
    assert tangent is not None, "the tangent was dropped"
    torch.testing.assert_close(tangent, difference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_grid_sample_tangents(dims, mode):
    spatial = (6, 7) if dims == 2 else (4, 5, 6)
    grid = torch.rand((2, *spatial[:-1], 3, dims), dtype=torch.float64, generator=_generator(2)) * 1.8 - 0.9
    primals = {"input": _randn(2, 3, *spatial, seed=1), "grid": grid}
    tangents = {"input": _randn(*primals["input"].shape, seed=3), "grid": 0.1 * _randn(*primals["grid"].shape, seed=4)}

    def sample(input, grid):
        return attnkernels.grid_sample(input, grid, mode=mode, padding_mode="border", align_corners=False)

    tangent, difference = _tangent_and_difference(sample, primals, tangents)
    assert tangent is not None, "the tangent was dropped"
    torch.testing.assert_close(tangent, difference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_affine_grid_and_fused_sampler_tangents(dims):
    size = [2, 3, 5, 6] if dims == 2 else [2, 3, 3, 4, 5]
    theta = torch.eye(dims, dims + 1, dtype=torch.float64).repeat(2, 1, 1) + 0.1 * _randn(2, dims, dims + 1, seed=1)
    theta_tangent = _randn(2, dims, dims + 1, seed=2)

    def grid(theta):
        return attnkernels.affine_grid(theta, size, align_corners=False)

    tangent, difference = _tangent_and_difference(grid, {"theta": theta}, {"theta": theta_tangent})
    assert tangent is not None, "the tangent was dropped"
    torch.testing.assert_close(tangent, difference, rtol=1e-6, atol=1e-7)

    def fused(input, theta):
        return attnkernels.affine_grid_sample(input, theta, align_corners=False)

    primals = {"input": _randn(*size, seed=3), "theta": theta}
    tangents = {"input": _randn(*size, seed=4), "theta": 0.1 * theta_tangent}
    tangent, difference = _tangent_and_difference(fused, primals, tangents)
    assert tangent is not None, "the tangent was dropped"
    torch.testing.assert_close(tangent, difference, rtol=1e-5, atol=1e-6)


def test_a_named_kernel_backend_refuses_dual_inputs_and_serves_plain_ones():
    if "cpu" not in attnkernels.available_backends():
        pytest.skip("no compiled CPU kernels in this build")
    x, grid = _randn(1, 2, 4, 4, seed=1), torch.zeros(1, 3, 3, 2, dtype=torch.float64)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            attnkernels.grid_sample(dual, grid, align_corners=False, backend="cpu")
        q = forward_ad.make_dual(_randn(1, 2, 3, 8), _randn(1, 2, 3, 8, seed=5))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            attnkernels.scaled_dot_product_attention(q, q.detach(), q.detach(), backend="cpu")
        # Inside a dual level, tensors without tangents still run on the kernels.
        out = attnkernels.grid_sample(x, grid, align_corners=False, backend="cpu")
        assert forward_ad.unpack_dual(out).tangent is None

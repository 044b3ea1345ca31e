"""The hand-written CUDA fused attention (backend="cuda", csrc/cuda/attention_*) on CUDA tensors.

Accuracy follows the FlashAttention rule: against a float64 computation, our error in
float16/bfloat16 is at most 2x the error of torch's own scaled_dot_product_attention in the same
dtype, plus a floor of one unit in the last place of the largest value. Every test needs a GPU and
an extension built with the CUDA sources (skipped without a GPU). The file is sized for a tight
GPU time budget (well under a minute on an H100/H200): small shapes, one long-sequence test.
The masked-row, NaN, layout, dropout-mask and empty-input checks, the same on every device, are
in tests/test_attention_devices.py.

ATTNKERNELS_CUDA_ATTENTION_DRY_RUN=1 runs the same checks on CPU tensors with backend="cpu" (no
GPU needed): a check of the tests' own logic, not of the CUDA kernels.
"""

from __future__ import annotations

import math
import os

import attention_cases
import pytest
import torch
import torch.nn.functional as F

import attnkernels
from attnkernels import _extension, reference
from attnkernels.reference.attention import kernel_dropout_mask

DRY_RUN = os.environ.get("ATTNKERNELS_CUDA_ATTENTION_DRY_RUN", "0") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
BACKEND = "cpu" if DRY_RUN else "cuda"

if not DRY_RUN:
    pytestmark = pytest.mark.cuda

LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not DRY_RUN and torch.cuda.is_available() and not _extension.has_kernel("attention", "CUDA"):
        pytest.fail("a GPU is present but attnkernels._C has no CUDA attention kernel: build with FORCE_CUDA=1 "
                    "(CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .)")


def randn(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def make_mask(kind, batch, heads, L, S, seed=1):
    """The shared masks (tests/attention_cases.py) on DEVICE: small broadcast shapes, never (B, H, L, S)
    unless the kind is float_full."""
    mask = attention_cases.make_mask(kind, (batch,), heads, L, S, seed=seed)
    return None if mask is None else mask.to(DEVICE)


# B, Hq, Hkv, L, S, E, Ev, mask kind, causal
CASES = {
    "basic": (2, 3, 3, 130, 130, 64, 64, None, False),
    "odd_lengths": (1, 2, 2, 77, 333, 64, 64, None, False),
    "head_dim_128": (1, 2, 2, 100, 200, 128, 128, None, False),
    "head_dim_16": (1, 2, 2, 50, 70, 16, 16, None, False),
    "head_dim_40": (1, 2, 2, 50, 70, 40, 40, None, False),
    "head_dim_80": (1, 2, 2, 50, 70, 80, 80, None, False),
    "head_dim_7": (1, 2, 2, 33, 45, 7, 7, None, False),
    "value_dim_smaller": (1, 2, 2, 65, 90, 64, 32, None, False),
    "value_dim_larger": (1, 2, 2, 65, 90, 96, 128, None, False),
    "causal_square": (1, 2, 2, 333, 333, 64, 64, None, True),
    "causal_L<S": (1, 2, 2, 70, 300, 64, 64, None, True),
    "causal_L>S": (1, 2, 2, 300, 70, 64, 64, None, True),
    "causal_128": (1, 2, 2, 200, 200, 128, 128, None, True),
    "length_1": (2, 2, 2, 1, 1, 64, 64, None, False),
    "one_query": (1, 2, 2, 1, 1000, 64, 64, None, False),
    "one_query_causal": (1, 2, 2, 1, 1000, 64, 64, None, True),
    "gqa": (2, 6, 2, 90, 110, 64, 64, None, False),
    "gqa_causal": (1, 8, 2, 150, 150, 128, 128, None, True),
    "bool_mask": (2, 2, 2, 90, 130, 64, 64, "bool", False),
    "bool_mask_heads": (2, 3, 3, 90, 130, 64, 64, "bool_heads", False),
    "float_mask": (2, 2, 2, 90, 130, 64, 64, "float", False),
    "float_mask_grad": (2, 2, 2, 70, 140, 64, 64, "float_full", False),
    "float_mask_grad_gqa": (1, 4, 2, 70, 140, 128, 128, "float_full", False),
    "band_mask": (1, 2, 2, 300, 600, 64, 64, "band", False),
}
# The 256 bucket: the backward runs two passes of 128 head-dim columns.
HEAD_DIM_256_CASES = {
    "head_dim_256": (1, 2, 2, 100, 150, 256, 256, None, False),
    "head_dim_200_causal": (1, 2, 2, 100, 150, 200, 200, None, True),
    "head_dim_256_mask_grad": (1, 2, 2, 70, 90, 256, 256, "float_full", False),
    "head_dim_256_gqa_bool": (1, 4, 2, 70, 90, 256, 256, "bool", False),
    "value_dim_256_key_dim_64": (1, 2, 2, 70, 90, 64, 256, None, True),
    "key_dim_200_value_dim_40": (1, 2, 2, 70, 90, 200, 40, None, False),
}


def dtype_floor(dtype, truth):
    """One unit in the last place of the largest value: the floor under the 2x rule."""
    return torch.finfo(dtype).eps * max(1.0, truth.abs().max().item())


def assert_flash_rule(ours, torchs, truth, dtype, what):
    truth = truth.double()
    our_error = (ours.double() - truth).abs().nan_to_num(math.inf).max().item()
    # torch's kernels may give NaN for fully masked rows, where ours must give the oracle's 0.
    torch_error = (torchs.double() - truth).abs().nan_to_num(0).max().item()
    assert our_error <= 2 * torch_error + dtype_floor(dtype, truth), (what, our_error, torch_error)


def run_case(case, dtype, with_grads):
    B, Hq, Hkv, L, S, E, Ev, mask_kind, causal = case
    q64, k64, v64 = randn(B, Hq, L, E, seed=0), randn(B, Hkv, S, E, seed=1), randn(B, Hkv, S, Ev, seed=2)
    mask = make_mask(mask_kind, B, Hq, L, S)
    # Every run gets the same low-precision inputs (and the float64 oracle their exact values).
    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    grad_out = randn(B, Hq, L, Ev, seed=3).to(dtype)
    gqa = Hq != Hkv
    mask_grad = with_grads and mask is not None and mask.is_floating_point() and not torch.isinf(mask).any()

    def run(fn, run_dtype):
        leaves = [t.detach().to(run_dtype).requires_grad_(with_grads) for t in (q, k, v)]
        m = None if mask is None else mask.detach().to(run_dtype if mask.is_floating_point() else torch.bool)
        if mask_grad:
            m.requires_grad_(True)
        out = fn(*leaves, m)
        if not with_grads:
            return [out]
        inputs = leaves + ([m] if mask_grad else [])
        return [out, *torch.autograd.grad(out, inputs, grad_out.to(run_dtype))]

    kwargs = {"is_causal": causal, "enable_gqa": gqa}
    ours = run(lambda q, k, v, m: attnkernels.scaled_dot_product_attention(q, k, v, m, backend=BACKEND, **kwargs),
               dtype)
    torchs = run(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, m, **kwargs), dtype)
    truth = run(lambda q, k, v, m: reference.scaled_dot_product_attention(q, k, v, m, **kwargs), torch.float64)
    for index, (mine, theirs, exact) in enumerate(zip(ours, torchs, truth, strict=True)):
        what = ["out", "grad_q", "grad_k", "grad_v", "grad_mask"][index]
        assert mine.dtype == dtype and mine.shape == exact.shape, what
        assert not mine.isnan().any(), f"NaN in {what}"
        assert_flash_rule(mine, theirs, exact, dtype, what)
    if mask is not None and mask.dtype == torch.bool and mask_kind == "bool":
        assert (ours[0][..., L // 2, :] == 0).all(), "a fully masked row gives 0"


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_by_the_flash_attention_rule(case, dtype):
    run_case(CASES[case], dtype, with_grads=True)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", list(HEAD_DIM_256_CASES))
def test_head_dims_above_128_by_the_flash_attention_rule(case, dtype):
    run_case(HEAD_DIM_256_CASES[case], dtype, with_grads=True)


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_scale(scale):
    q, k, v = (randn(1, 2, 50, 64, seed=s).bfloat16() for s in range(3))
    ours = attnkernels.scaled_dot_product_attention(q, k, v, scale=scale, backend=BACKEND)
    torchs = F.scaled_dot_product_attention(q, k, v, scale=scale)
    truth = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    assert_flash_rule(ours, torchs, truth, torch.bfloat16, "out")


def test_lse_and_gradient_through_lse():
    q, k, v = (randn(2, 2, 70, 64, seed=s) for s in range(3))
    mask = make_mask("float", 2, 2, 70, 70)
    low = [t.half().requires_grad_() for t in (q, k, v)]
    out, lse = attnkernels.attention_with_lse(*low, mask.float(), scale=0.3, backend=BACKEND)
    exact = [t.detach().half().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = reference.attention_with_lse(*exact, mask, scale=0.3)
    assert lse.dtype == torch.float32 and torch.isneginf(lse[..., -1]).all() and (out[..., -1, :] == 0).all()
    finite = torch.isfinite(lse64)
    torch.testing.assert_close(lse[finite].double(), lse64[finite], atol=2e-3, rtol=0)
    # A loss through lse only: its gradient flows through grad_lse in the backward kernel.
    weight = randn(2, 2, 70, seed=5)
    grads = torch.autograd.grad((lse.nan_to_num(0, 0, 0).double() * weight).sum() + out.double().sum(), low)
    grads64 = torch.autograd.grad((lse64.nan_to_num(0, 0, 0) * weight).sum() + out64.sum(), exact)
    for mine, theirs in zip(grads, grads64, strict=True):
        torch.testing.assert_close(mine.double(), theirs, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- dropout


def dropped_weights(p, seed, L=60, S=100, heads=2, dtype=torch.bfloat16, backend=BACKEND, device=DEVICE):
    """Attention weights after dropout: with value = identity, out = dropout(P) / (1 - p)."""
    q, k = randn(1, heads, L, 64, seed=0).to(device, dtype), randn(1, heads, S, 64, seed=1).to(device, dtype)
    identity = torch.eye(S, dtype=dtype, device=device).expand(1, heads, S, S)
    torch.manual_seed(seed)
    weights = attnkernels.scaled_dot_product_attention(q, k, identity, dropout_p=p, backend=backend)
    return weights, reference.scaled_dot_product_attention(q.double(), k.double(), identity.double())


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_uses_the_cpu_kernels_generator(p):
    seed, L, S = 7, 60, 100
    weights, probs = dropped_weights(p, seed, L, S)
    torch.manual_seed(seed)
    drawn = int(torch.randint(0, 2**62, (1,), dtype=torch.int64))
    keep = kernel_dropout_mask(drawn, (1, 2, L, S), p, DEVICE)
    assert torch.equal(weights != 0, keep), "the keep decisions are those of the CPU kernel's generator"
    torch.testing.assert_close(weights[keep].double(), probs[keep] / (1 - p), atol=2e-3, rtol=1e-2)
    if _extension.has_kernel("attention", "CPU"):
        cpu_weights, _ = dropped_weights(p, seed, L, S, dtype=torch.float32, backend="cpu", device="cpu")
        assert torch.equal((cpu_weights != 0).to(DEVICE), keep)


# ----------------------------------------------------------------------------- determinism, dispatch


def test_deterministic_mode_gives_identical_bits():
    q, k, v = (randn(2, 4, 300, 128, seed=s).bfloat16().requires_grad_() for s in range(3))
    grad_out = randn(2, 4, 300, 128, seed=3).bfloat16()

    def grads():
        out = attnkernels.scaled_dot_product_attention(q, k, v, is_causal=True, backend=BACKEND)
        return torch.autograd.grad(out, (q, k, v), grad_out)

    fast = grads()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b, f in zip(first, second, fast, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, f, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(DRY_RUN, reason="the dispatch to the cuda backend needs CUDA tensors")
def test_dispatch_prefers_triton_then_cuda_and_cuda_declines_with_reasons():
    q = randn(1, 2, 40, 64, seed=0)
    half = q.bfloat16()
    chosen = attnkernels.scaled_dot_product_attention(half, half, half)
    first = "triton" if "triton" in attnkernels.available_backends() else "cuda"
    assert torch.equal(chosen, attnkernels.scaled_dot_product_attention(half, half, half, backend=first))
    declined = {
        "float32": (q.float(), {}),
        "float64": (q, {}),
        "head dims up to 256": (randn(1, 2, 40, 264, seed=0).half().requires_grad_(), {}),
    }
    for words, (t, kwargs) in declined.items():
        with pytest.raises(RuntimeError, match="cannot serve these inputs") as error:
            attnkernels.scaled_dot_product_attention(t, t, t, backend="cuda", **kwargs)
        assert words in str(error.value), (words, str(error.value))
        # ... and the default dispatch still serves them, correctly.
        out = attnkernels.scaled_dot_product_attention(t, t, t)
        truth = reference.scaled_dot_product_attention(t.double(), t.double(), t.double())
        torch.testing.assert_close(out.double(), truth, atol=2e-2, rtol=2e-2)


def test_opcheck():
    op = torch.ops.attnkernels.attention
    q, k, v = randn(2, 4, 40, 64, seed=0).bfloat16(), randn(2, 2, 50, 64, seed=1).bfloat16(), randn(
        2, 2, 50, 48, seed=2).bfloat16()
    mask = randn(2, 4, 40, 50, seed=3).float()
    bool_mask = (torch.rand(40, 50, generator=torch.Generator().manual_seed(4)) > 0.3).to(DEVICE).expand(2, 4, 40, 50)
    seed = torch.tensor([12345], dtype=torch.int64)
    for args in [  # GQA and Ev != E throughout
        (q, k, v, None, 0.0, True, 0.125, None),
        (q, k, v, mask, 0.0, False, 0.125, None),
        (q, k, v, bool_mask, 0.0, False, 0.125, None),
        (q, k, v, None, 0.25, False, 0.125, seed),
    ]:
        args = tuple(a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
                     for a in args)
        torch.library.opcheck(op, args)
    out, lse = op(q, k, v, mask, 0.0, False, 0.125, None)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(torch.ops.attnkernels.attention_backward,
                          (grad_out, grad_lse, q, k, v, mask, out, lse, 0.0, False, 0.125, None,
                           [True, True, True, True]))


def test_torch_compile_fullgraph():
    q, k, v = (randn(2, 4, 70, 64, seed=s).bfloat16().requires_grad_() for s in range(3))
    mask = randn(70, 70, seed=3).float().requires_grad_()

    def attention(q, k, v, mask):
        out, lse = attnkernels.attention_with_lse(q, k, v, mask, backend=BACKEND)
        return out * 2 + lse.unsqueeze(-1).to(out.dtype)

    compiled = torch.compile(attention, fullgraph=True)
    expected = attention(q, k, v, mask)
    got = compiled(q, k, v, mask)
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)
    leaves = (q, k, v, mask)
    for mine, theirs in zip(torch.autograd.grad(got.float().sum(), leaves),
                            torch.autograd.grad(expected.float().sum(), leaves), strict=True):
        torch.testing.assert_close(mine.float(), theirs.float(), atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- long sequences


@pytest.mark.skipif(DRY_RUN, reason="16k x 16k on the CPU is too slow for a dry run")
@pytest.mark.parametrize("causal", [False, True])
def test_16k_sequence_without_a_quadratic_allocation(causal):
    B, H, L, E = 1, 2, 16384, 64
    q, k, v = (torch.randn(B, H, L, E, device=DEVICE, dtype=torch.bfloat16,
                           generator=torch.Generator(DEVICE).manual_seed(s)).requires_grad_() for s in range(3))
    grad_out = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = attnkernels.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=BACKEND)
    grad_q, grad_k, grad_v = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    one_score_matrix = B * H * L * L * 2  # bf16; 1 GiB
    assert peak < one_score_matrix / 8, f"peak {peak / 2**20:.0f} MiB: an L x S buffer was allocated"
    for t in (out, grad_q, grad_k, grad_v):
        assert torch.isfinite(t).all()
    # Rows spread over the sequence against float64, with their full (or causal) key range.
    rows = torch.tensor([0, 1, 4095, 8191, 12000, L - 1], device=DEVICE)
    scores = (q[:, :, rows].double() @ k.double().transpose(-1, -2)) / math.sqrt(E)
    if causal:
        scores = scores.masked_fill(torch.arange(L, device=DEVICE) > rows.unsqueeze(-1), -math.inf)
    truth = torch.softmax(scores, -1) @ v.double()
    assert (out[:, :, rows].double() - truth).abs().max() < 2e-2

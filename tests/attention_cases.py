"""Shared inputs, masks, cases and torch's math path for the attention tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attnkernels


def torch_math(q, k, v, **kwargs):
    """torch's own math path (float64 exact, NaN where torch gives NaN)."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def make_inputs(batch, q_heads, kv_heads, L, S, E, Ev, dtype=torch.float64, seed=0):
    """q (*batch, q_heads, L, E), k (*batch, kv_heads, S, E), v (*batch, kv_heads, S, Ev)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, q_heads, L, E, dtype=dtype, generator=generator)
    k = torch.randn(*batch, kv_heads, S, E, dtype=dtype, generator=generator)
    v = torch.randn(*batch, kv_heads, S, Ev, dtype=dtype, generator=generator)
    return q, k, v


def make_mask(kind, batch, heads, L, S, dtype=torch.float64, seed=1):
    """Masks of every kind and broadcast; each leaves at least one fully masked row where it can."""
    generator = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":
        mask = torch.rand(L, S, generator=generator) > 0.3
        mask[L // 2] = False  # a fully masked row
        return mask
    if kind == "bool_heads":
        return torch.rand(*batch, heads, 1, S, generator=generator) > 0.5
    if kind == "float":
        mask = torch.randn(L, S, dtype=dtype, generator=generator)
        mask[torch.rand(L, S, generator=generator) > 0.7] = -math.inf
        mask[-1] = -math.inf
        return mask
    if kind == "float_full":
        return torch.randn(*batch, heads, L, S, dtype=dtype, generator=generator)
    if kind == "float_row":  # (1, S): torch's default SDPA refuses masks of rank < 2
        return torch.randn(1, S, dtype=dtype, generator=generator)
    if kind == "band":  # query i sees keys [2i, 2i + 40): whole tiles are masked out and skipped
        rows = torch.arange(L).unsqueeze(-1)
        cols = torch.arange(S)
        return (cols >= 2 * rows) & (cols < 2 * rows + 40)
    raise ValueError(kind)


def output_gradient(shape, dtype, seed=3):
    """The fixed random output gradient of gradients(): drawn in float64 and rounded to dtype, so that every
    dtype gets the same one (torch draws float32 and float64 from different streams, which would compare
    low-precision gradients with a different float64 one)."""
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def gradients(out, inputs, seed=3):
    """Gradients of the inputs that require grad, for output_gradient(out.shape, out.dtype, seed)."""
    live = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, live, output_gradient(out.shape, out.dtype, seed))


# batch dims, Hq, Hkv, L, S, E, Ev, mask kind, causal
CASES = {
    "basic": ((2,), 3, 3, 17, 23, 16, 16, None, False),
    "rank3": ((), 2, 2, 9, 11, 8, 8, None, False),
    "rank5": ((2, 2), 2, 2, 5, 6, 4, 4, None, False),
    "causal_L<S": ((1,), 2, 2, 7, 113, 8, 8, None, True),
    "causal_L>S": ((1,), 2, 2, 113, 7, 8, 8, None, True),
    "causal_long": ((1,), 1, 1, 257, 257, 16, 16, None, True),
    "causal_blocks": ((1,), 2, 1, 600, 600, 16, 16, None, True),
    "value_dim": ((2,), 2, 2, 13, 19, 12, 5, None, False),
    "head_dim_1": ((1,), 2, 2, 7, 7, 1, 1, None, False),
    "head_dim_7": ((1,), 2, 2, 7, 9, 7, 7, None, False),
    "head_dim_257": ((1,), 1, 1, 7, 9, 257, 257, None, False),
    "length_1": ((2,), 2, 2, 1, 1, 8, 8, None, False),
    "blocks": ((1,), 1, 1, 300, 600, 8, 8, None, False),
    "band_mask": ((1,), 2, 2, 300, 600, 8, 8, "band", False),
    "gqa": ((2,), 6, 2, 11, 13, 8, 8, None, False),
    "gqa_causal": ((1,), 4, 1, 70, 140, 8, 8, None, True),
    "bool_mask": ((2,), 2, 2, 9, 13, 8, 8, "bool", False),
    "bool_mask_heads": ((2,), 3, 3, 9, 13, 8, 8, "bool_heads", False),
    "float_mask": ((2,), 2, 2, 9, 13, 8, 8, "float", False),
    "float_mask_full": ((2,), 2, 2, 70, 140, 8, 8, "float_full", False),
    "float_mask_row": ((2,), 2, 2, 9, 13, 8, 8, "float_row", False),
    "gqa_mask": ((1,), 4, 2, 9, 13, 8, 8, "float_full", False),
}


def keep_pattern_after_seed(seed: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """The dropout keep pattern of shape (B, H, L, S) that the compiled kernels use for a call made right after
    torch.manual_seed(seed): the kernel's seed is torch's next draw, its mask kernel_dropout_mask's."""
    from attnkernels.reference.attention import kernel_dropout_mask

    torch.manual_seed(seed)
    return kernel_dropout_mask(int(torch.randint(0, 2**62, (1,), dtype=torch.int64)), shape, p)


def cpu_dropout_on_identity(q: torch.Tensor, k: torch.Tensor, p: float, is_causal: bool = False):
    """The cpu kernel's attention of q (1, H, L, E) and k (1, H, S, E) on value = identity with dropout p, and the
    keep pattern kernel_dropout_mask draws from the same seed: returns (weights, keep), both (1, H, L, S). The
    output is the dropped probabilities, so weights != 0 must be keep (causal: within the visible triangle) and the
    kept weights P / (1 - p)."""
    heads, L, S = q.shape[1], q.shape[2], k.shape[2]
    identity = torch.eye(S, dtype=q.dtype).expand(1, heads, S, S)
    torch.manual_seed(4)
    weights = attnkernels.scaled_dot_product_attention(q, k, identity, dropout_p=p, is_causal=is_causal,
                                                       backend="cpu")
    keep = keep_pattern_after_seed(4, (1, heads, L, S), p)
    if is_causal:
        keep &= torch.ones(L, S, dtype=torch.bool).tril()
    return weights, keep

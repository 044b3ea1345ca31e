"""Modules built on the fused kernels: a spatial transformer, multi-head self-attention, and
recurrent soft attention over feature-map locations.

    stn = attnkernels.nn.SpatialTransformer(dims=3, in_channels=1, output_size=(8, 24, 24))
    attn = attnkernels.nn.MultiheadSelfAttention(embed_dim=64, num_heads=4, batch_first=True)
    soft = attnkernels.nn.SpatialSoftAttention(feature_channels=32, hidden_size=64)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import sampling
from .attention import scaled_dot_product_attention

TRANSFORMS = ("affine", "translation_scale")


# ----------------------------------------------------------------------------- spatial transformer


class SpatialTransformer(nn.Module):
    """Spatial transformer (Jaderberg et al. 2015) on the fused affine sampler, in 2-D or 3-D (video).

    A localisation network predicts the transform ``theta`` from the input; the fused
    ``attnkernels.affine_grid_sample`` samples the input at the transformed grid, at
    ``output_size``, without materialising the grid. The prediction starts at the identity
    (last layer zero, bias the identity), so an untrained transformer passes its input through
    (resampled to ``output_size``).

    dims: 2 for images (N, C, H, W), 3 for videos or volumes (N, C, D, H, W); in a video D is time.
    in_channels: C.
    output_size: (Ho, Wo) or (Do, Ho, Wo); None keeps the input's size.
    localization: a module mapping the input to features (N, localization_features); None builds a
        small default conv net. A linear head from its features to theta is added here, initialised
        to the identity transform.
    transform: "affine" (the full 2x3 / 3x4 matrix) or "translation_scale" (a per-axis scale and a
        translation, no rotation or shear: an attention crop, which also keeps the output upright).
    mode, padding_mode, align_corners: as for ``attnkernels.grid_sample``.
    backend: passed to the sampler (None picks the best).

    forward(x) -> the sampled output (N, C, *output_size); ``forward(x, return_theta=True)`` also
    returns theta (N, dims, dims + 1).
    """

    def __init__(self, dims: int, in_channels: int, output_size: Sequence[int] | None = None,
                 localization: nn.Module | None = None, localization_features: int | None = None,
                 transform: str = "affine", mode: str = "bilinear", padding_mode: str = "zeros",
                 align_corners: bool = False, backend: str | None = None):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"SpatialTransformer: expected `dims` to be 2 or 3, got {dims!r}")
        if transform not in TRANSFORMS:
            raise ValueError(f"SpatialTransformer: expected `transform` to be one of {TRANSFORMS}, got {transform!r}")
        if output_size is not None:
            output_size = tuple(int(s) for s in output_size)
            if len(output_size) != dims or min(output_size) <= 0:
                raise ValueError(f"SpatialTransformer: expected `output_size` of {dims} positive sizes, "
                                 f"got {output_size}")
        if (localization is None) != (localization_features is None):
            raise ValueError("SpatialTransformer: pass `localization` together with `localization_features` "
                             "(the size of its output features), or neither for the default network")
        self.dims = dims
        self.in_channels = in_channels
        self.output_size = output_size
        self.transform = transform
        self.mode = mode
        self.padding_mode = padding_mode
        self.align_corners = align_corners
        self.backend = backend
        if localization is None:
            localization, localization_features = self._default_localization(dims, in_channels), 32
        self.localization = localization
        # affine: the full matrix; translation_scale: per-axis scale then translation.
        num_params = dims * (dims + 1) if transform == "affine" else 2 * dims
        self.theta_head = nn.Linear(localization_features, num_params)
        nn.init.zeros_(self.theta_head.weight)
        with torch.no_grad():
            self.theta_head.bias.copy_(self._identity_params())

    @staticmethod
    def _default_localization(dims: int, channels: int) -> nn.Module:
        conv, pool = (nn.Conv2d, nn.AdaptiveAvgPool2d) if dims == 2 else (nn.Conv3d, nn.AdaptiveAvgPool3d)
        pooled = (4, 4) if dims == 2 else (2, 4, 4)
        return nn.Sequential(
            conv(channels, 8, kernel_size=3, padding=1), nn.ReLU(),
            conv(8, 16, kernel_size=3, padding=1, stride=2), nn.ReLU(),
            pool(pooled), nn.Flatten(),
            nn.Linear(16 * math.prod(pooled), 32), nn.ReLU(),
        )

    def _identity_params(self) -> torch.Tensor:
        if self.transform == "affine":
            return torch.eye(self.dims, self.dims + 1).flatten()
        return torch.cat([torch.ones(self.dims), torch.zeros(self.dims)])

    def params_to_theta(self, params: torch.Tensor) -> torch.Tensor:
        """params: (N, num_params) -> theta: (N, dims, dims + 1)."""
        n = params.shape[0]
        if self.transform == "affine":
            return params.view(n, self.dims, self.dims + 1)
        scale, translation = params[:, :self.dims], params[:, self.dims:]
        return torch.cat([torch.diag_embed(scale), translation.unsqueeze(-1)], dim=-1)

    def predict_theta(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, *spatial) -> theta: (N, dims, dims + 1), in x's dtype."""
        features = self.localization(x)
        if features.dim() != 2:
            raise RuntimeError(f"SpatialTransformer: expected the localization network to return (N, features), "
                               f"got sizes {list(features.shape)}")
        return self.params_to_theta(self.theta_head(features)).to(x.dtype)

    def forward(self, x: torch.Tensor, return_theta: bool = False):
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            layout = "(N, C, H, W)" if self.dims == 2 else "(N, C, D, H, W)"
            raise ValueError(f"SpatialTransformer: expected input {layout} with C = {self.in_channels}, "
                             f"got sizes {list(x.shape)}")
        theta = self.predict_theta(x)
        spatial = self.output_size if self.output_size is not None else tuple(x.shape[2:])
        out = sampling.affine_grid_sample(x, theta, (x.shape[0], x.shape[1], *spatial), mode=self.mode,
                                          padding_mode=self.padding_mode, align_corners=self.align_corners,
                                          backend=self.backend)
        return (out, theta) if return_theta else out

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, in_channels={self.in_channels}, output_size={self.output_size}, "
                f"transform={self.transform!r}, mode={self.mode!r}, padding_mode={self.padding_mode!r}, "
                f"align_corners={self.align_corners}")


# ----------------------------------------------------------------------------- multi-head self-attention


class MultiheadSelfAttention(nn.Module):
    """Multi-head self-attention on the fused attention op, with ``nn.MultiheadAttention``'s weight layout.

    Parameters are named and shaped as in ``nn.MultiheadAttention(embed_dim, num_heads, bias=bias)``:
    ``in_proj_weight`` (3E, E) holding the stacked q, k, v projections (one fused matmul),
    ``in_proj_bias`` (3E), ``out_proj.weight`` (E, E), ``out_proj.bias`` (E). So
    ``load_state_dict(mha.state_dict())`` works and the outputs match ``mha(x, x, x, need_weights=False)[0]``.
    With grouped-query attention (``num_kv_heads < num_heads``) the k and v blocks of ``in_proj_weight``
    shrink to ``num_kv_heads * head_dim`` rows each.

    x: (L, N, E), or (N, L, E) when ``batch_first``, or unbatched (L, E) -> the same shape.

    Masks follow ``nn.MultiheadAttention`` (not SDPA): ``attn_mask`` (L, S) or (N * num_heads, L, S),
    bool with True = *not allowed*, or float added to the scores; ``key_padding_mask`` (N, S), bool with
    True = *ignore this key*, or float added. ``is_causal=True`` applies the causal mask (on its own, or
    intersected with ``attn_mask``, which ``nn.MultiheadAttention`` treats as a hint that the mask is causal).
    Dropout on the attention weights applies in training mode only. Unlike ``nn.MultiheadAttention``
    the module returns the output alone: the fused kernel never forms the attention weights.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, num_kv_heads: int | None = None, device=None, dtype=None,
                 backend: str | None = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"MultiheadSelfAttention: expected `embed_dim` ({embed_dim}) to be a positive multiple "
                             f"of `num_heads` ({num_heads})")
        if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"MultiheadSelfAttention: expected `num_kv_heads` ({num_kv_heads}) to divide "
                             f"`num_heads` ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiheadSelfAttention: expected `dropout` in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.backend = backend
        kv_dim = num_kv_heads * self.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation.
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def _merged_mask(self, attn_mask, key_padding_mask, batch: int, length: int, dtype) -> torch.Tensor | None:
        """The two nn.MultiheadAttention-style masks as one SDPA mask (True = attend, or additive),
        broadcastable to (N, num_heads, L, L)."""
        masks = []
        if attn_mask is not None:
            if tuple(attn_mask.shape) == (length, length):
                attn_mask = attn_mask.view(1, 1, length, length)
            elif tuple(attn_mask.shape) == (batch * self.num_heads, length, length):
                attn_mask = attn_mask.view(batch, self.num_heads, length, length)
            else:
                raise ValueError(f"MultiheadSelfAttention: expected `attn_mask` of shape ({length}, {length}) or "
                                 f"({batch * self.num_heads}, {length}, {length}), got {list(attn_mask.shape)}")
            masks.append(attn_mask)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (batch, length):
                raise ValueError(f"MultiheadSelfAttention: expected `key_padding_mask` of shape ({batch}, {length}), "
                                 f"got {list(key_padding_mask.shape)}")
            masks.append(key_padding_mask.view(batch, 1, 1, length))
        for m in masks:
            if m.dtype != torch.bool and not m.is_floating_point():
                raise ValueError(f"MultiheadSelfAttention: expected bool or floating masks, got {m.dtype}")
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            allowed = ~masks[0]
            for m in masks[1:]:
                allowed = allowed & ~m
            return allowed
        total = None
        for m in masks:
            additive = (torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
                        if m.dtype == torch.bool else m.to(dtype))
            total = additive if total is None else total + additive
        return total

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        unbatched = x.dim() == 2
        if x.dim() not in (2, 3) or x.shape[-1] != self.embed_dim:
            raise ValueError(f"MultiheadSelfAttention: expected `x` of shape (L, N, {self.embed_dim}), "
                             f"(N, L, {self.embed_dim}) with batch_first, or (L, {self.embed_dim}); "
                             f"got {list(x.shape)}")
        if unbatched:
            x = x.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            x = x.transpose(0, 1)
        batch, length, _ = x.shape
        mask = self._merged_mask(attn_mask, key_padding_mask, batch, length, x.dtype)

        kv_dim = self.num_kv_heads * self.head_dim
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.split([self.embed_dim, kv_dim, kv_dim], dim=-1)
        # (N, L, H * D) -> (N, H, L, D)
        q = q.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)

        causal_only = is_causal and mask is None
        if is_causal and mask is not None:
            causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            mask = mask & causal if mask.dtype == torch.bool else torch.where(causal, mask, float("-inf"))
        dropout_p = self.dropout if self.training else 0.0
        gqa = self.num_kv_heads != self.num_heads
        out = scaled_dot_product_attention(q, k, v, mask, dropout_p, causal_only, enable_gqa=gqa, backend=self.backend)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if unbatched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}")


# ----------------------------------------------------------------------------- recurrent soft attention


class SpatialSoftAttention(nn.Module):
    """Soft attention over the locations of a feature map, frame by frame, driven by a recurrent state.

    The "visual attention for action recognition" model (Sharma, Kiros and Salakhutdinov, 2015):
    at frame t a distribution over the H x W locations is computed from the previous recurrent state,
    the frame's feature vectors are averaged under it (soft attention: every location contributes),
    and the average drives the LSTM or GRU. Sharma et al. score location i by a weight vector per
    location; here the score is additive (Bahdanau / Show-Attend-Tell),
    ``v · tanh(W_f f_i + W_h h_{t-1})``, which works for any map size. The initial state comes from
    the mean feature of the first frame, as in the paper.

    features: (N, T, C, H, W) -> (attended (N, T, C), attention maps (N, T, H, W) summing to 1 over
    each frame's locations, hidden states (N, T, hidden_size)).
    """

    def __init__(self, feature_channels: int, hidden_size: int, cell: str = "lstm",
                 attention_size: int | None = None):
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"SpatialSoftAttention: expected `cell` to be 'lstm' or 'gru', got {cell!r}")
        attention_size = hidden_size if attention_size is None else attention_size
        self.feature_channels = feature_channels
        self.hidden_size = hidden_size
        self.cell_type = cell
        self.feature_proj = nn.Linear(feature_channels, attention_size)
        self.state_proj = nn.Linear(hidden_size, attention_size, bias=False)
        self.score = nn.Linear(attention_size, 1, bias=False)
        self.cell = (nn.LSTMCell if cell == "lstm" else nn.GRUCell)(feature_channels, hidden_size)
        self.init_hidden = nn.Linear(feature_channels, hidden_size)
        self.init_cell = nn.Linear(feature_channels, hidden_size) if cell == "lstm" else None

    def forward(self, features: torch.Tensor):
        if features.dim() != 5 or features.shape[2] != self.feature_channels:
            raise ValueError(f"SpatialSoftAttention: expected `features` of shape (N, T, {self.feature_channels}, "
                             f"H, W), got {list(features.shape)}")
        n, frames, c, h, w = features.shape
        if frames == 0:  # no frames: empty results (the initial state needs a first frame)
            return (features.new_zeros((n, 0, c)), features.new_zeros((n, 0, h, w)),
                    features.new_zeros((n, 0, self.hidden_size)))
        locations = features.flatten(3).transpose(2, 3)              # (N, T, H*W, C)
        projected = self.feature_proj(locations)                     # (N, T, H*W, A): all frames at once
        first_mean = locations[:, 0].mean(dim=1)
        hidden = torch.tanh(self.init_hidden(first_mean))
        cell_state = torch.tanh(self.init_cell(first_mean)) if self.init_cell is not None else None
        attended, maps, states = [], [], []
        for t in range(frames):
            scores = self.score(torch.tanh(projected[:, t] + self.state_proj(hidden).unsqueeze(1))).squeeze(-1)
            weights = torch.softmax(scores, dim=-1)                  # (N, H*W)
            context = torch.einsum("nl,nlc->nc", weights, locations[:, t])
            if cell_state is None:
                hidden = self.cell(context, hidden)
            else:
                hidden, cell_state = self.cell(context, (hidden, cell_state))
            attended.append(context)
            maps.append(weights.view(n, h, w))
            states.append(hidden)
        return torch.stack(attended, 1), torch.stack(maps, 1), torch.stack(states, 1)

    def extra_repr(self) -> str:
        return f"feature_channels={self.feature_channels}, hidden_size={self.hidden_size}, cell={self.cell_type!r}"


__all__ = ["MultiheadSelfAttention", "SpatialSoftAttention", "SpatialTransformer"]

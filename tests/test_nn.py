"""attnkernels.nn: SpatialTransformer, MultiheadSelfAttention, SpatialSoftAttention.

Forward and backward of each module, the identity initialisation of the spatial transformer,
MultiheadSelfAttention against nn.MultiheadAttention with loaded weights (outputs and gradients,
float64), masks, causal, GQA and dropout, and bad arguments.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnkernels.nn import MultiheadSelfAttention, SpatialSoftAttention, SpatialTransformer

f64 = torch.float64


# ----------------------------------------------------------------------------- SpatialTransformer


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("transform", ["affine", "translation_scale"])
def test_spatial_transformer_starts_at_the_identity(dims, transform):
    torch.manual_seed(0)
    stn = SpatialTransformer(dims, in_channels=2, transform=transform).double()
    x = torch.randn(3, 2, *([5, 6, 7][-dims:]), dtype=f64)
    out, theta = stn(x, return_theta=True)
    identity = torch.eye(dims, dims + 1, dtype=f64).expand(3, dims, dims + 1)
    torch.testing.assert_close(theta, identity)
    # align_corners=False identity sampling lands on the pixel centres: the input comes back.
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", [2, 3])
def test_spatial_transformer_matches_torch_sampling_and_backpropagates(dims):
    torch.manual_seed(0)
    size = (4, 9, 8)[-dims:]
    stn = SpatialTransformer(dims, in_channels=3, output_size=(3, 5, 6)[-dims:], padding_mode="border").double()
    nn.init.normal_(stn.theta_head.weight, std=0.1)  # move away from the identity
    x = torch.randn(2, 3, *size, dtype=f64, requires_grad=True)
    out, theta = stn(x, return_theta=True)
    assert out.shape == (2, 3, *(3, 5, 6)[-dims:])
    grid = F.affine_grid(theta, list(out.shape), align_corners=False)
    expected = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    params = [x, *stn.parameters()]
    got_grads = torch.autograd.grad(out.square().sum(), params, retain_graph=True)  # theta is shared
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)
    assert got_grads[-1].abs().sum() > 0  # theta_head's bias receives a gradient


def test_spatial_transformer_gradcheck():
    torch.manual_seed(0)
    stn = SpatialTransformer(2, in_channels=1, output_size=(3, 4), transform="translation_scale").double()
    nn.init.normal_(stn.theta_head.weight, std=0.1)
    x = torch.randn(2, 1, 5, 5, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: stn(inp), (x,))


def test_translation_scale_has_no_rotation_or_shear():
    torch.manual_seed(0)
    stn = SpatialTransformer(3, in_channels=1, transform="translation_scale")
    nn.init.normal_(stn.theta_head.weight, std=0.5)
    theta = stn.predict_theta(torch.randn(4, 1, 4, 8, 8))
    off_diagonal = theta[:, :, :3] * (1 - torch.eye(3))
    assert torch.count_nonzero(off_diagonal) == 0
    assert stn.theta_head.out_features == 6


def test_spatial_transformer_with_a_user_localization_network():
    loc = nn.Sequential(nn.Flatten(), nn.Linear(1 * 6 * 6, 10), nn.Tanh())
    stn = SpatialTransformer(2, in_channels=1, output_size=(4, 4), localization=loc, localization_features=10)
    x = torch.randn(5, 1, 6, 6, requires_grad=True)
    out = stn(x)
    out.sum().backward()
    assert out.shape == (5, 1, 4, 4)
    assert loc[1].weight.grad is not None and x.grad is not None


def test_spatial_transformer_bad_arguments():
    with pytest.raises(ValueError, match="dims"):
        SpatialTransformer(4, 1)
    with pytest.raises(ValueError, match="transform"):
        SpatialTransformer(2, 1, transform="rotation")
    with pytest.raises(ValueError, match="output_size"):
        SpatialTransformer(2, 1, output_size=(4, 4, 4))
    with pytest.raises(ValueError, match="localization_features"):
        SpatialTransformer(2, 1, localization=nn.Flatten())
    stn = SpatialTransformer(2, 3)
    with pytest.raises(ValueError, match="C = 3"):
        stn(torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match="H, W"):
        stn(torch.randn(1, 3, 5, 5, 5))
    bad_loc = SpatialTransformer(2, 1, localization=nn.Identity(), localization_features=4)
    with pytest.raises(RuntimeError, match="localization network"):
        bad_loc(torch.randn(1, 1, 2, 2))


# ----------------------------------------------------------------------------- MultiheadSelfAttention


def _pair(batch_first: bool, embed=24, heads=4, bias=True):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(embed, heads, bias=bias, batch_first=batch_first, dtype=f64)
    if bias:
        nn.init.normal_(mha.in_proj_bias)
        nn.init.normal_(mha.out_proj.bias)
    ours = MultiheadSelfAttention(embed, heads, bias=bias, batch_first=batch_first, dtype=f64)
    ours.load_state_dict(mha.state_dict())
    return mha, ours


def test_parameter_names_and_shapes_match_multihead_attention():
    mha = nn.MultiheadAttention(32, 8)
    ours = MultiheadSelfAttention(32, 8)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in mha.state_dict().items()}


def _masks(batch, length, heads):
    g = torch.Generator().manual_seed(3)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[0, -2:] = True
    return {
        "none": {},
        "bool attn_mask": {"attn_mask": torch.rand(length, length, generator=g) < 0.3},
        "float attn_mask": {"attn_mask": torch.randn(length, length, generator=g, dtype=f64)},
        "per-head float": {"attn_mask": torch.randn(batch * heads, length, length, generator=g, dtype=f64)},
        "key_padding_mask": {"key_padding_mask": padding},
        "float mask + padding": {"attn_mask": torch.randn(length, length, generator=g, dtype=f64),
                                 "key_padding_mask": padding},
        "bool mask + padding": {"attn_mask": torch.rand(length, length, generator=g) < 0.3,
                                "key_padding_mask": padding},
    }


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # float mask + bool padding
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", list(_masks(2, 7, 4)))
def test_matches_multihead_attention_outputs_and_gradients(batch_first, mask_kind):
    mha, ours = _pair(batch_first)
    batch, length = 2, 7
    masks = _masks(batch, length, 4)[mask_kind]
    shape = (batch, length, 24) if batch_first else (length, batch, 24)
    x = torch.randn(shape, dtype=f64, requires_grad=True)
    expected = mha(x, x, x, need_weights=False, **masks)[0]
    got = ours(x, **masks)
    # A fully masked row: torch's math gives NaN or 0 depending on its path; compare the rest.
    valid = ~torch.isnan(expected)
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-10, atol=1e-12)
    if valid.all():
        weights = torch.randn_like(expected)
        got_grads = torch.autograd.grad((got * weights).sum(), [x, *ours.parameters()])
        expected_grads = torch.autograd.grad((expected * weights).sum(), [x, *mha.parameters()])
        for g, e in zip(got_grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


def test_unbatched_input_and_no_bias():
    mha, ours = _pair(batch_first=False, bias=False)
    x = torch.randn(6, 24, dtype=f64)
    torch.testing.assert_close(ours(x), mha(x, x, x, need_weights=False)[0], rtol=1e-10, atol=1e-12)
    padding = torch.tensor([False, False, False, False, True, True])
    torch.testing.assert_close(ours(x, key_padding_mask=padding),
                               mha(x, x, x, need_weights=False, key_padding_mask=padding)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("length", [1, 5])
def test_causal_matches_multihead_attention_with_its_causal_mask(length):
    mha, ours = _pair(batch_first=True)
    x = torch.randn(3, length, 24, dtype=f64)
    causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=f64)
    expected = mha(x, x, x, need_weights=False, attn_mask=causal)[0]
    torch.testing.assert_close(ours(x, is_causal=True), expected, rtol=1e-10, atol=1e-12)
    # is_causal together with a mask: the mask intersected with the causal one (here: the same).
    torch.testing.assert_close(ours(x, attn_mask=causal, is_causal=True), expected, rtol=1e-10, atol=1e-12)
    padding = torch.zeros(3, length, dtype=torch.bool)
    padding[:, 0] = False
    torch.testing.assert_close(ours(x, key_padding_mask=padding, is_causal=True),
                               mha(x, x, x, need_weights=False, attn_mask=causal.isinf(),
                                   key_padding_mask=padding)[0], rtol=1e-10, atol=1e-12)


def test_grouped_query_attention_equals_repeated_kv_heads():
    """GQA with 2 KV heads for 4 query heads equals full MHA whose k, v weights repeat each KV head twice."""
    torch.manual_seed(0)
    embed, heads, kv_heads = 16, 4, 2
    head_dim = embed // heads
    ours = MultiheadSelfAttention(embed, heads, num_kv_heads=kv_heads, batch_first=True, dtype=f64)
    nn.init.normal_(ours.in_proj_bias)
    assert ours.in_proj_weight.shape == (embed + 2 * kv_heads * head_dim, embed)
    wq, wk, wv = ours.in_proj_weight.split([embed, kv_heads * head_dim, kv_heads * head_dim])
    bq, bk, bv = ours.in_proj_bias.split([embed, kv_heads * head_dim, kv_heads * head_dim])

    def repeat(t):  # (kv_heads * head_dim, ...) -> (heads * head_dim, ...), KV head h // 2 for query head h
        return t.unflatten(0, (kv_heads, head_dim)).repeat_interleave(heads // kv_heads, 0).flatten(0, 1)

    full = nn.MultiheadAttention(embed, heads, batch_first=True, dtype=f64)
    with torch.no_grad():
        full.in_proj_weight.copy_(torch.cat([wq, repeat(wk), repeat(wv)]))
        full.in_proj_bias.copy_(torch.cat([bq, repeat(bk), repeat(bv)]))
        full.out_proj.load_state_dict(ours.out_proj.state_dict())
    x = torch.randn(2, 5, embed, dtype=f64, requires_grad=True)
    torch.testing.assert_close(ours(x, is_causal=True),
                               full(x, x, x, need_weights=False,
                                    attn_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=f64))[0],
                               rtol=1e-10, atol=1e-12)
    ours(x).sum().backward()
    assert ours.in_proj_weight.grad is not None and x.grad is not None


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    attn = MultiheadSelfAttention(16, 2, dropout=0.5, batch_first=True)
    x = torch.randn(2, 9, 16)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x), rtol=0, atol=0)
    attn.train()
    torch.manual_seed(1)
    first = attn(x)
    torch.manual_seed(1)
    assert torch.equal(first, attn(x))        # the same seed, the same dropout
    assert not torch.equal(first, attn(x))    # a new draw
    first.sum().backward()
    assert attn.in_proj_weight.grad is not None


def test_multihead_self_attention_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        MultiheadSelfAttention(10, 3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiheadSelfAttention(12, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="dropout"):
        MultiheadSelfAttention(12, 4, dropout=1.0)
    attn = MultiheadSelfAttention(12, 4)
    with pytest.raises(ValueError, match="x"):
        attn(torch.randn(2, 3, 10))
    with pytest.raises(ValueError, match="attn_mask"):
        attn(torch.randn(5, 2, 12), attn_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(torch.randn(5, 2, 12), key_padding_mask=torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool or floating"):
        attn(torch.randn(5, 2, 12), attn_mask=torch.zeros(5, 5, dtype=torch.int64))


# ----------------------------------------------------------------------------- SpatialSoftAttention


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_spatial_soft_attention_forward_and_backward(cell):
    torch.manual_seed(0)
    module = SpatialSoftAttention(feature_channels=6, hidden_size=10, cell=cell)
    features = torch.randn(3, 4, 6, 5, 7, requires_grad=True)
    attended, maps, states = module(features)
    assert attended.shape == (3, 4, 6) and maps.shape == (3, 4, 5, 7) and states.shape == (3, 4, 10)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(3, 4))
    assert (maps >= 0).all()
    # Soft attention: the attended feature is the map-weighted average of the frame's feature vectors.
    torch.testing.assert_close(attended, torch.einsum("nthw,ntchw->ntc", maps, features))
    (attended.sum() + states.sum()).backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()
    assert all(p.grad is not None for p in module.parameters())


def test_spatial_soft_attention_is_driven_by_the_recurrent_state():
    """Frame t's map depends on earlier frames (through the state), so identical frames get different maps."""
    torch.manual_seed(0)
    module = SpatialSoftAttention(4, 8).double()
    frame = torch.randn(1, 1, 4, 3, 3, dtype=f64)
    maps = module(frame.expand(1, 3, 4, 3, 3))[1]
    assert not torch.allclose(maps[0, 1], maps[0, 2])


def test_spatial_soft_attention_gradcheck():
    torch.manual_seed(0)
    module = SpatialSoftAttention(3, 4, cell="gru").double()
    features = torch.randn(2, 2, 3, 2, 2, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: module(f)[0], (features,))


def test_spatial_soft_attention_bad_arguments():
    with pytest.raises(ValueError, match="cell"):
        SpatialSoftAttention(4, 8, cell="rnn")
    with pytest.raises(ValueError, match="features"):
        SpatialSoftAttention(4, 8)(torch.randn(2, 3, 5, 2, 2))


def test_spatial_soft_attention_with_zero_frames():
    attended, maps, states = SpatialSoftAttention(4, 8)(torch.randn(2, 0, 4, 3, 5))
    assert attended.shape == (2, 0, 4) and maps.shape == (2, 0, 3, 5) and states.shape == (2, 0, 8)

"""attnkernels.patch_torch / unpatch_torch / patched: exact swap and restore, unmodified torch models
routed through attnkernels (checked with spies), fallbacks with one warning, autocast dtypes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnkernels
from attnkernels import patching

NAMES = patching.PATCHED_NAMES


@pytest.fixture(autouse=True)
def _clean_state():
    """Each test starts and ends unpatched, with fresh once-per-reason warnings."""
    attnkernels.unpatch_torch()
    patching._warned_reasons.clear()
    yield
    attnkernels.unpatch_torch()
    patching._warned_reasons.clear()


class Spy:
    """Counts calls of a module attribute and forwards them to the real function."""

    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        real = getattr(module, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)


@pytest.fixture
def sampling_spies(monkeypatch):
    return {name: Spy(monkeypatch, attnkernels.sampling, name) for name in ("grid_sample", "affine_grid")}


@pytest.fixture
def attention_spy(monkeypatch):
    return Spy(monkeypatch, attnkernels.attention, "scaled_dot_product_attention")


# ----------------------------------------------------------------------------- swap and restore


def test_patch_swaps_and_unpatch_restores_the_exact_objects():
    originals = {name: getattr(F, name) for name in NAMES}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    attnkernels.patch_torch()
    assert attnkernels.patching.is_patched()
    for name in NAMES:
        assert getattr(F, name) is not originals[name]
        assert getattr(F, name) is getattr(patching, name)
    assert torch.backends.mha.get_fastpath_enabled() is False
    attnkernels.patch_torch()  # idempotent: the originals are kept, not the wrappers
    attnkernels.unpatch_torch()
    for name in NAMES:
        assert getattr(F, name) is originals[name]
    assert torch.nn.functional.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert torch.backends.mha.get_fastpath_enabled() is fastpath
    attnkernels.unpatch_torch()  # a no-op when not patched
    for name in NAMES:
        assert getattr(F, name) is originals[name]


def test_unpatch_restores_a_disabled_fastpath_setting():
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with attnkernels.patched():
            pass
        assert torch.backends.mha.get_fastpath_enabled() is False
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_context_manager_restores_on_exception_and_when_nested():
    originals = {name: getattr(F, name) for name in NAMES}
    with pytest.raises(KeyError):
        with attnkernels.patched():
            assert F.grid_sample is patching.grid_sample
            raise KeyError("boom")
    assert all(getattr(F, name) is originals[name] for name in NAMES)

    with attnkernels.patched():
        with attnkernels.patched():
            pass
        assert F.grid_sample is patching.grid_sample  # the inner block leaves the outer patch in place
    assert all(getattr(F, name) is originals[name] for name in NAMES)

    attnkernels.patch_torch()
    with attnkernels.patched():
        pass
    assert F.affine_grid is patching.affine_grid  # explicitly patched before the block: stays patched


def test_patched_works_as_a_decorator():
    @attnkernels.patched()
    def inside():
        return F.grid_sample is patching.grid_sample

    assert inside()
    assert F.grid_sample is not patching.grid_sample


# ----------------------------------------------------------------------------- routing through attnkernels


class TorchWrittenSTN(nn.Module):
    """A spatial transformer written against torch.nn.functional, as users write it."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Linear(3 * 8 * 8, 6, dtype=torch.float64)
        nn.init.normal_(self.loc.weight, std=0.05)
        with torch.no_grad():
            self.loc.bias.copy_(torch.tensor([1.0, 0.1, 0.0, -0.1, 0.9, 0.05]))

    def forward(self, x):
        theta = self.loc(x.flatten(1)).view(-1, 2, 3)
        grid = F.affine_grid(theta, [x.shape[0], x.shape[1], 6, 7], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_an_stn_written_against_torch_runs_on_attnkernels_and_matches(sampling_spies):
    torch.manual_seed(0)
    model = TorchWrittenSTN()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *model.parameters()])
    assert sampling_spies["grid_sample"].calls == 0
    with attnkernels.patched():
        got = model(x)
        got_grads = torch.autograd.grad(got.square().sum(), [x, *model.parameters()])
    assert sampling_spies["grid_sample"].calls == 1 and sampling_spies["affine_grid"].calls == 1
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_the_patched_functions_keep_torch_errors_and_warnings():
    x = torch.randn(1, 1, 4, 4)
    with attnkernels.patched():
        with pytest.warns(UserWarning, match="align_corners"):
            F.grid_sample(x, torch.zeros(1, 2, 2, 2))
        with pytest.raises((RuntimeError, ValueError), match="mode"):
            F.grid_sample(x, torch.zeros(1, 2, 2, 2), mode="cubic", align_corners=False)
        with pytest.raises((RuntimeError, ValueError), match="theta"):
            F.affine_grid(torch.zeros(1, 3, 3), [1, 1, 4, 4], align_corners=False)


def _encoder_layer(dropout: float) -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    # batch_first, even head count, relu: every condition of torch's inference fast path holds.
    return nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=dropout, batch_first=True)


def test_patched_transformer_encoder_layer_matches_in_eval_mode(attention_spy):
    layer = _encoder_layer(0.1).eval()
    x = torch.randn(3, 10, 32)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[1, 7:] = True
    with torch.no_grad():
        expected = layer(x, src_key_padding_mask=padding)
        expected_causal = layer(x, src_mask=nn.Transformer.generate_square_subsequent_mask(10), is_causal=True)
        with attnkernels.patched():
            got = layer(x, src_key_padding_mask=padding)
            got_causal = layer(x, src_mask=nn.Transformer.generate_square_subsequent_mask(10), is_causal=True)
    assert attention_spy.calls == 2  # the fast path is off while patched, so SDPA really ran ours
    torch.testing.assert_close(got[~padding], expected[~padding], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_causal, expected_causal, rtol=1e-5, atol=1e-5)


def test_patched_multihead_attention_routes_through_ours_without_weights(attention_spy):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 16, dtype=torch.float64)
    expected = mha(x, x, x, need_weights=False)[0]
    with attnkernels.patched():
        got = mha(x, x, x, need_weights=False)[0]
        mha(x, x, x)  # need_weights=True: torch computes the weights with bmm, never through SDPA
    assert attention_spy.calls == 1
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_patched_transformer_encoder_layer_trains(attention_spy):
    layer = _encoder_layer(0.1).train()
    head = nn.Linear(32, 1)
    optimizer = torch.optim.Adam([*layer.parameters(), *head.parameters()], lr=3e-3)
    torch.manual_seed(1)
    x = torch.randn(16, 6, 32)
    target = x[:, :, :4].sum((1, 2)).unsqueeze(1)
    with attnkernels.patched():
        first = layer(x)
        assert not torch.equal(first, layer(x))  # dropout is live in training mode
        losses = []
        for _ in range(40):
            loss = F.mse_loss(head(layer(x).mean(1)), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert attention_spy.calls == 42
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------- fallbacks


def test_unsupported_inputs_fall_back_to_torch_with_one_warning():
    x = torch.randn(1, 2, 5, 5, device="meta")
    grid = torch.randn(1, 3, 3, 2, device="meta")
    with attnkernels.patched():
        with pytest.warns(UserWarning, match="falls back to torch's own op because a tensor argument is on meta"):
            out = F.grid_sample(x, grid, align_corners=False)
        assert out.shape == (1, 2, 3, 3) and out.device.type == "meta"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the same reason warns only once
            F.grid_sample(x, grid, align_corners=False)
        with pytest.warns(UserWarning, match="affine_grid falls back"):  # another op: its own warning
            F.affine_grid(torch.zeros(1, 2, 3, device="meta"), [1, 1, 4, 4], align_corners=False)


class LoggingTensor(torch.Tensor):
    """A subclass with __torch_function__: ours cannot see through it, torch's op dispatches it."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclasses_fall_back_to_torch():
    x = torch.randn(1, 1, 4, 4).as_subclass(LoggingTensor)
    grid = torch.rand(1, 2, 2, 2) * 2 - 1
    expected = F.grid_sample(x.as_subclass(torch.Tensor), grid, align_corners=True)
    LoggingTensor.seen.clear()
    with attnkernels.patched():
        with pytest.warns(UserWarning, match="subclass overriding __torch_function__"):
            out = F.grid_sample(x, grid, align_corners=True)
    assert "grid_sample" in LoggingTensor.seen
    torch.testing.assert_close(out.as_subclass(torch.Tensor), expected)


def test_nested_tensors_fall_back_for_attention():
    q = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 5, 8)], layout=torch.jagged)
    q = q.transpose(1, 2)  # (N, H, j, E), what torch's SDPA takes for nested inputs
    with attnkernels.patched():
        with pytest.warns(UserWarning, match="layout"):
            out = F.scaled_dot_product_attention(q, q, q)
    assert out.is_nested


# ----------------------------------------------------------------------------- autocast


def test_autocast_gives_torch_dtypes_for_sampling():
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    theta = torch.eye(2, 3).expand(2, 2, 3).contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grid = F.affine_grid(theta, [2, 3, 4, 4], align_corners=False)
        expected = F.grid_sample(x, grid, align_corners=False)
        with attnkernels.patched():
            got_grid = F.affine_grid(theta, [2, 3, 4, 4], align_corners=False)
            got = F.grid_sample(x, got_grid, align_corners=False)
    assert got_grid.dtype == grid.dtype and got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_autocast_gives_torch_dtype_for_attention():
    q = torch.randn(2, 2, 5, 8)
    mask = torch.randn(5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        with attnkernels.patched():
            got = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- torch.compile


def test_compiled_models_run_our_ops_while_patched():
    """torch.compile(fullgraph=True) of code written against F puts attnkernels ops in the graph."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    def model(x, theta, q):
        grid = F.affine_grid(theta, [2, 3, 6, 6], align_corners=False)
        sampled = F.grid_sample(x, grid, align_corners=False)
        return sampled.square().sum() + F.scaled_dot_product_attention(q, q, q, is_causal=True).square().sum()

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    theta = (torch.eye(2, 3, dtype=torch.float64) + 0.1 * torch.randn(2, 2, 3, dtype=torch.float64)).requires_grad_()
    q = torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    expected = model(x, theta, q)
    expected_grads = torch.autograd.grad(expected, [x, theta, q])
    torch._dynamo.reset()
    recorder = AotEagerAndRecordGraphs()
    with attnkernels.patched(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback inside the traced graph
        warnings.filterwarnings("ignore", message=".*boxed arguments.*")  # the recording backend's own notice
        got = torch.compile(model, fullgraph=True, backend=recorder)(x, theta, q)
        got_grads = torch.autograd.grad(got, [x, theta, q])
    torch._dynamo.reset()
    graph = recorder.fw_graphs[0].code
    for op in ("attnkernels.affine_grid", "attnkernels.grid_sample", "attnkernels.attention"):
        assert op in graph, op
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)

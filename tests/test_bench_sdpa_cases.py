"""The sdpa_* benchmark ops (attnkernels/bench/cases.py): FlashAttention's shapes, FLOPs and baselines."""

import torch

from attnkernels.bench import cases


def test_sdpa_ops_cover_head_dims_causal_and_both_torch_baselines():
    names = {name for name in cases.OPS if name.startswith("sdpa")}
    assert names == {f"{baseline}_hdim{d}{suffix}" for baseline in ("sdpa", "sdpa_cudnn") for d in (64, 128)
                     for suffix in ("", "_causal")}
    for d in (64, 128):
        spec = cases.OPS[f"sdpa_hdim{d}"]
        assert spec.default_sizes["cuda"] == (1024, 2048, 4096, 8192, 16384)
        for size in spec.default_sizes["cuda"]:
            shape = spec.shape(size, "cuda")
            assert shape["B"] * shape["L"] == 16384 and shape["H"] * shape["E"] == 2048 and shape["E"] == d
    shape = cases.OPS["sdpa_hdim128_causal"].shape(4096, "cuda")
    forward = 4.0 * shape["B"] * shape["H"] * 4096 * 4096 * 128 / 2
    assert cases.OPS["sdpa_cudnn_hdim128_causal"].work(shape, torch.bfloat16, False) == forward
    assert cases.OPS["sdpa_hdim128_causal"].work(shape, torch.bfloat16, True) == 3.5 * forward


def test_cudnn_baseline_falls_back_where_cudnn_cannot_run():
    # On CPU tensors (and float32) the cuDNN baseline is torch's default SDPA: the check still has a reference.
    spec = cases.OPS["sdpa_cudnn_hdim64_causal"]
    inputs = spec.make_inputs(spec.shape(128, "cpu"), torch.float32, torch.device("cpu"),
                              torch.Generator().manual_seed(0))
    expected = torch.nn.functional.scaled_dot_product_attention(inputs["query"], inputs["key"], inputs["value"],
                                                                is_causal=True)
    torch.testing.assert_close(spec.torch_impl(inputs), expected)

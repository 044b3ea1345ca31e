"""Every misuse of the attention functions and ops raises naming the argument: never a crash, never a
wrong result."""

from __future__ import annotations

import pytest
import torch
from attention_cases import make_inputs

import attnkernels
from attnkernels import _extension

needs_cpu_kernel = pytest.mark.skipif(not _extension.has_extension(), reason="the compiled extension is not built")

_Q, _K, _V = make_inputs((2,), 4, 2, 5, 6, 8, 8, dtype=torch.float32)
BAD_INPUTS = {
    "query rank 1": ((_Q[0, 0, 0], _K[0, 0], _V[0, 0]), {}, RuntimeError, "`query`"),
    "unequal ranks": ((_Q, _K[0], _V[0]), {}, RuntimeError, "key"),
    "head dims differ": ((_Q, _K[..., :7], _V), {}, RuntimeError, "head dim"),
    "value length": ((_Q, _K, _V[..., :5, :]), {}, RuntimeError, "value"),
    "batch does not broadcast": ((_Q, torch.cat([_K, _K[:1]]), torch.cat([_V, _V[:1]])), {"enable_gqa": True},
                                 RuntimeError, "batch"),
    "dtype mismatch": ((_Q, _K.double(), _V), {}, RuntimeError, "key"),
    "integer query": ((_Q.int(), _K.int(), _V.int()), {}, RuntimeError, "query"),
    "heads without gqa": ((_Q, _K, _V), {}, RuntimeError, "enable_gqa"),
    "heads do not divide": ((_Q[:, :3], _K, _V), {"enable_gqa": True}, RuntimeError, "divide"),
    "value heads do not divide": ((_Q, _K, _V[:, :1].expand(2, 3, 6, 8)), {"enable_gqa": True}, RuntimeError,
                                  "`value` heads"),
    "zero key heads": ((_Q, _K[:, :0], _V[:, :0]), {"enable_gqa": True}, RuntimeError, "`key` heads"),
    "gqa without heads": ((_Q[0, 0], _K[0, 0], _V[0, 0]), {"enable_gqa": True}, RuntimeError, "heads"),
    "is_causal a string": ((_Q, _K, _V), {"is_causal": "False", "enable_gqa": True}, TypeError, "`is_causal`"),
    "is_causal an int": ((_Q, _K, _V), {"is_causal": 1, "enable_gqa": True}, TypeError, "`is_causal`"),
    "enable_gqa an int": ((_Q, _K, _V), {"enable_gqa": 1}, TypeError, "`enable_gqa`"),
    "mask of rank 1": ((_Q, _K, _V, torch.zeros(6)), {"enable_gqa": True}, RuntimeError, "`attn_mask`"),
    "mask of rank 0": ((_Q, _K, _V, torch.tensor(0.0)), {"enable_gqa": True}, RuntimeError, "`attn_mask`"),
    "scale a string": ((_Q, _K, _V), {"scale": "0.5", "enable_gqa": True}, TypeError, "`scale`"),
    "dropout a 1-d tensor": ((_Q, _K, _V), {"dropout_p": torch.zeros(1), "enable_gqa": True}, TypeError,
                             "`dropout_p`"),
    "mask with causal": ((_Q, _K, _V, torch.zeros(5, 6)), {"is_causal": True, "enable_gqa": True}, RuntimeError,
                         "is_causal"),
    "mask does not broadcast": ((_Q, _K, _V, torch.zeros(4, 6)), {"enable_gqa": True}, RuntimeError, "attn_mask"),
    "mask rank too high": ((_Q, _K, _V, torch.zeros(1, 2, 4, 5, 6)), {"enable_gqa": True}, RuntimeError,
                           "attn_mask"),
    "mask dtype": ((_Q, _K, _V, torch.zeros(5, 6, dtype=torch.int64)), {"enable_gqa": True}, RuntimeError,
                   "attn_mask"),
    "float64 mask on float32": ((_Q, _K, _V, torch.zeros(5, 6, dtype=torch.float64)), {"enable_gqa": True},
                                RuntimeError, "attn_mask"),
    "dropout above 1": ((_Q, _K, _V), {"dropout_p": 1.5, "enable_gqa": True}, ValueError, "dropout_p"),
    "dropout negative": ((_Q, _K, _V), {"dropout_p": -0.1, "enable_gqa": True}, ValueError, "dropout_p"),
    "unknown backend": ((_Q, _K, _V), {"enable_gqa": True, "backend": "gpu"}, ValueError, "backend"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_naming_the_argument(case):
    args, kwargs, error, words = BAD_INPUTS[case]
    with pytest.raises(error, match=words):
        attnkernels.scaled_dot_product_attention(*args, **kwargs)


@needs_cpu_kernel
def test_the_op_checks_its_arguments_too():
    with pytest.raises(RuntimeError, match="is_causal"):
        torch.ops.attnkernels.attention(_Q, _K, _V, torch.zeros(2, 4, 5, 6), 0.0, True, 1.0, None)
    with pytest.raises(RuntimeError, match="dropout_p"):
        torch.ops.attnkernels.attention(_Q, _K, _V, None, 1.5, False, 1.0, None)
    with pytest.raises(RuntimeError, match="head dim"):
        torch.ops.attnkernels.attention(_Q, _K[..., :3], _V, None, 0.0, False, 1.0, None)


@needs_cpu_kernel
@pytest.mark.parametrize("argument", ["key", "value", "attn_mask"])
def test_the_op_rejects_a_tensor_on_another_device(argument):
    """A meta tensor among CPU tensors dispatches to the fake kernel, which must refuse it, not return garbage."""
    tensors = {"query": _Q, "key": _K, "value": _V, "attn_mask": torch.zeros(2, 4, 5, 6)}
    tensors[argument] = tensors[argument].to("meta")
    with pytest.raises(RuntimeError, match=f"`{argument}` on the device"):
        torch.ops.attnkernels.attention(*tensors.values(), 0.0, False, 1.0, None)


@needs_cpu_kernel
@pytest.mark.parametrize("argument", ["grad_out", "key", "out", "lse"])
def test_the_backward_op_rejects_a_tensor_on_another_device(argument):
    out, lse = torch.ops.attnkernels.attention(_Q, _K, _V, None, 0.0, False, 1.0, None)
    tensors = {"grad_out": torch.ones_like(out), "grad_lse": None, "query": _Q, "key": _K, "value": _V,
               "attn_mask": None, "out": out, "lse": lse}
    tensors[argument] = tensors[argument].to("meta")
    with pytest.raises(RuntimeError, match=f"`{argument}` on the device"):
        torch.ops.attnkernels.attention_backward(*tensors.values(), 0.0, False, 1.0, None, [True, True, True, False])




def _prepared_plain_call_cases():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    v6 = torch.randn(2, 3, 5, 6)
    plain = [
        ((q, k, v, None, 0.0, False, None, False), True),
        ((q, k, v6, None, 0.25, True, 0.5, False), True),
        ((q.transpose(1, 2).contiguous().transpose(1, 2), k, v, None, 1.0, False, None, False), True),
        ((q, k, v, torch.ones(5, 5, dtype=torch.bool), 0.0, False, None, False), False),  # a mask
        ((q, k[:, :1], v[:, :1], None, 0.0, False, None, True), False),  # grouped heads
        ((q, k[:1], v[:1], None, 0.0, False, None, False), False),  # batch that broadcasts
        ((q[0], k[0], v[0], None, 0.0, False, None, False), False),  # 3-D
        ((q, k, v, None, 0, False, None, False), False),  # int dropout_p, made a float by the full checks
        ((q, k, v, None, 0.0, False, 2, False), False),  # int scale
        ((torch.nn.Parameter(q), k, v, None, 0.0, False, None, False), False),  # a subclass
        ((q, k.double(), v, None, 0.0, False, None, False), False),  # mixed dtypes: the full checks raise
        ((q, k[..., :4], v, None, 0.0, False, None, False), False),  # head dims differ: they raise
        ((q, k, v, None, 1.5, False, None, False), False),  # dropout_p out of range: they raise
        ((q.int(), k.int(), v.int(), None, 0.0, False, None, False), False),  # integer inputs: they raise
    ]
    return plain


@pytest.mark.parametrize("index", range(len(_prepared_plain_call_cases())))
def test_plain_call_shortcut_gives_what_the_full_checks_give(index, monkeypatch):
    """attention's argument preparation takes a shortcut for plain calls (4-D tensors of one batch and head
    count, no mask, no GQA, float options); it declines everything else, and where it accepts, the full
    checks return the same arguments."""
    from attnkernels import attention

    args, accepted = _prepared_plain_call_cases()[index]
    shortcut = attention._prepared_plain_call(*args)
    assert (shortcut is not None) == accepted
    monkeypatch.setattr(attention, "_prepared_plain_call", lambda *a: None)
    try:
        full = attention._prepare("scaled_dot_product_attention", *args)
    except (RuntimeError, TypeError, ValueError):
        assert not accepted
        return
    if accepted:
        assert len(full) == len(shortcut)
        for a, b in zip(full, shortcut, strict=True):
            assert a is b or a == b

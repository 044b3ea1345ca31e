"""Every misuse raises RuntimeError or ValueError naming the argument: never a crash, never a wrong result."""

from __future__ import annotations

import pytest
import torch
from backends import ON_CPU, device_backends
from sampling_cases import make_grid, make_input

import attnkernels
from attnkernels import _extension

X2, G2 = make_input(2, dtype=torch.float32), make_grid(2, dtype=torch.float32)
X3, G3 = make_input(3, dtype=torch.float32), make_grid(3, dtype=torch.float32)
THETA2 = torch.eye(2, 3).expand(2, 2, 3)

GRID_SAMPLE_MISUSES = [
    ("3-D input", dict(input=X2[0], grid=G2), RuntimeError, "`input`"),
    ("6-D input", dict(input=X3.unsqueeze(0), grid=G3), RuntimeError, "`input`"),
    ("grid rank differs", dict(input=X2, grid=G3), RuntimeError, "`grid`"),
    ("grid last dimension 3 for 4-D", dict(input=X2, grid=torch.zeros(2, 4, 5, 3)), RuntimeError, "last dimension"),
    ("grid last dimension 2 for 5-D", dict(input=X3, grid=G3[..., :2]), RuntimeError, "last dimension"),
    ("batch mismatch", dict(input=X2, grid=G2[:1]), RuntimeError, "batch"),
    ("dtype mismatch", dict(input=X2, grid=G2.double()), RuntimeError, "dtype"),
    ("integer input", dict(input=X2.long(), grid=G2.long()), RuntimeError, "`input`"),
    ("integer grid", dict(input=X2, grid=G2.int()), RuntimeError, "`grid`"),
    ("device mismatch", dict(input=X2, grid=G2.to("meta")), RuntimeError, "device"),
    ("empty spatial input", dict(input=torch.zeros(2, 3, 0, 4), grid=G2), RuntimeError, "non-empty"),
    ("unknown mode", dict(input=X2, grid=G2, mode="linear"), ValueError, "`mode`"),
    ("unknown padding", dict(input=X2, grid=G2, padding_mode="constant"), ValueError, "`padding_mode`"),
    ("unknown backend", dict(input=X2, grid=G2, backend="mps"), ValueError, "`backend`"),
    ("not a tensor", dict(input=X2.tolist(), grid=G2), TypeError, "`input`"),
    ("align_corners a string", dict(input=X2, grid=G2, align_corners="False"), TypeError, "`align_corners`"),
    ("align_corners an int", dict(input=X2, grid=G2, align_corners=1), TypeError, "`align_corners`"),
    ("output larger than memory", dict(input=X2, grid=G2[:, :1, :1].expand(2, 2**24, 2**24, 2)), RuntimeError,
     "`grid`.*memory"),
]


AFFINE_MISUSES = [
    ("size of length 3", dict(theta=THETA2, size=[2, 3, 4]), ValueError, "`size`"),
    ("theta 3x4 for a 2-D size", dict(theta=torch.eye(3, 4).expand(2, 3, 4), size=[2, 3, 4, 5]), ValueError,
     "`theta`"),
    ("theta 2x3 for a 3-D size", dict(theta=THETA2, size=[2, 3, 4, 5, 6]), ValueError, "`theta`"),
    ("theta batch mismatch", dict(theta=THETA2, size=[3, 3, 4, 5]), ValueError, "batch"),
    ("zero size", dict(theta=THETA2, size=[2, 3, 0, 5]), ValueError, "positive"),
    ("integer theta", dict(theta=THETA2.int(), size=[2, 3, 4, 5]), RuntimeError, "`theta`"),
    ("float size", dict(theta=THETA2, size=[2, 3, 4.9, 5]), TypeError, "`size`"),
    ("zero batch", dict(theta=THETA2[:0], size=[0, 3, 4, 5]), ValueError, "positive sizes in `size`"),
    ("zero channels", dict(theta=THETA2, size=[2, 0, 4, 5]), ValueError, "positive sizes in `size`"),
    ("negative channels", dict(theta=THETA2, size=[2, -1, 4, 5]), ValueError, "positive sizes in `size`"),
    ("align_corners a string", dict(theta=THETA2, size=[2, 3, 4, 5], align_corners="False"), TypeError,
     "`align_corners`"),
    # torch refuses this at once (its allocation fails); the reference must not run out of memory first
    ("grid larger than memory", dict(theta=THETA2, size=[2, 1, 2**31, 2]), RuntimeError, "`size`.*memory"),
]


FUSED_MISUSES = [
    ("size channels differ", dict(input=X2, theta=THETA2, size=[2, 4, 5, 5]), ValueError, "`size`"),
    ("size rank differs", dict(input=X2, theta=THETA2, size=[2, 3, 4, 5, 6]), ValueError, "`theta`|`size`"),
    ("theta dtype differs", dict(input=X2, theta=THETA2.double()), RuntimeError, "dtype"),
    ("theta device differs", dict(input=X2, theta=THETA2.to("meta")), RuntimeError, "device"),
    ("unknown mode", dict(input=X2, theta=THETA2, mode="area"), ValueError, "`mode`"),
    ("integer input", dict(input=X2.int(), theta=THETA2), RuntimeError, "`input`"),
    ("float size", dict(input=X2, theta=THETA2, size=[2, 3, 4.0, 5]), TypeError, "`size`"),
    ("align_corners a string", dict(input=X2, theta=THETA2, align_corners="False"), TypeError, "`align_corners`"),
    ("output larger than memory", dict(input=X2, theta=THETA2, size=[2, 3, 2**24, 2**24]), RuntimeError,
     "`size`.*memory"),
]


MISUSES = [
    *((attnkernels.grid_sample, m) for m in GRID_SAMPLE_MISUSES),
    *((attnkernels.affine_grid, m) for m in AFFINE_MISUSES),
    *((attnkernels.affine_grid_sample, m) for m in FUSED_MISUSES),
]


@pytest.mark.parametrize(("device", "backend"), device_backends(*ON_CPU))
@pytest.mark.parametrize(("op", "misuse"), MISUSES, ids=lambda m: m.__name__ if callable(m) else m[0])
def test_misuse_raises_naming_the_argument(device, backend, op, misuse):
    _, kwargs, error, words = misuse
    with pytest.raises(error, match=words):
        op(**{"align_corners": False, "backend": backend, **kwargs})


def test_backend_that_cannot_serve_says_why():
    with pytest.raises(RuntimeError, match="'cuda' backend cannot serve these inputs: .*"):
        attnkernels.grid_sample(X2, G2, align_corners=False, backend="cuda")
    if "triton" not in attnkernels.available_backends():
        with pytest.raises(RuntimeError, match="'triton' backend cannot serve these inputs: .+"):
            attnkernels.grid_sample(X2, G2, align_corners=False, backend="triton")


@pytest.mark.skipif(not _extension.has_extension(), reason="the extension is not built")
def test_direct_op_calls_check_their_arguments():
    """torch.ops.attnkernels.* called directly, past the Python checks, fail cleanly too."""
    ops = torch.ops.attnkernels
    cases = [
        (lambda: ops.grid_sample(X2, G3, 0, 0, False), "`grid`"),
        (lambda: ops.grid_sample(X2, G2, 7, 0, False), "`mode`"),
        (lambda: ops.grid_sample(X2, G2, 0, -1, False), "`padding_mode`"),
        (lambda: ops.grid_sample(X2, G2.double(), 0, 0, False), "dtype"),
        (lambda: ops.grid_sample(X2.int(), G2.int(), 0, 0, False), "floating point"),
        (lambda: ops.grid_sample_backward(torch.zeros(1, 1, 1, 1), X2, G2, 0, 0, False, [True, True]),
         "`grad_output`"),
        (lambda: ops.affine_grid(THETA2, [2, 3, 4], False), "`size`"),
        (lambda: ops.affine_grid(THETA2, [2, 3, -4, 5], False), "positive"),
        (lambda: ops.affine_grid_sample(X2, THETA2, [2, 5, 4, 4], 0, 0, False), "`size`"),
        (lambda: ops.affine_grid_backward(torch.zeros(2, 3, 3, 2), [2, 3, 4, 4], False), "`grad_grid`"),
    ]
    for call, words in cases:
        with pytest.raises(RuntimeError, match=words):
            call()


@pytest.mark.skipif(not _extension.has_extension(), reason="the extension is not built")
def test_direct_op_calls_reject_a_tensor_on_another_device():
    """A meta tensor among CPU tensors goes to the fake kernel, which must refuse it, not return garbage."""
    ops = torch.ops.attnkernels
    meta = torch.device("meta")
    out = ops.grid_sample(X2, G2, 0, 0, False)
    fused = ops.affine_grid_sample(X2, THETA2.contiguous(), list(X2.shape), 0, 0, False)
    cases = [
        (lambda: ops.grid_sample(X2, G2.to(meta), 0, 0, False), "`grid`"),
        (lambda: ops.grid_sample_backward(out.to(meta), X2, G2, 0, 0, False, [True, True]), "`grad_output`"),
        (lambda: ops.affine_grid_sample(X2, THETA2.to(meta), list(X2.shape), 0, 0, False), "`theta`"),
        (lambda: ops.affine_grid_sample_backward(fused.to(meta), X2, THETA2.contiguous(), list(X2.shape), 0, 0,
                                                 False, [True, True]), "`grad_output`"),
    ]
    for call, name in cases:
        with pytest.raises(RuntimeError, match=f"{name} on the device"):
            call()

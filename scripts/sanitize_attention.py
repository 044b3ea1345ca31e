"""compute-sanitizer workload for the CUDA attention kernels: small shapes, every feature.

Run under `compute-sanitizer --tool memcheck|racecheck` by scripts/gpu_session.sh (stage
sanitize-attention). Partial tiles (L, S not multiples of 64), head dims 8..256 (padded buckets;
the two-pass backward at 256),
Ev != E, GQA, causal with L < S and L > S, bool / float / broadcast masks, mask gradient, dropout,
grad through lse, the deterministic backward. With the argument "quick" (racecheck, slower):
bf16 only and fewer shapes.
"""

import sys

import torch

import attnkernels  # noqa: F401

ops = torch.ops.attnkernels
device = "cuda"
quick = sys.argv[1:] == ["quick"]
dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)
# B, Hq, Hkv, L, S, E, Ev
shapes = [(1, 2, 1, 37, 70, 64, 64), (2, 2, 2, 65, 33, 128, 120), (1, 1, 1, 1, 5, 8, 8)]
if not quick:
    shapes += [(1, 4, 2, 130, 129, 40, 72), (1, 1, 1, 20, 100, 256, 200)]
for dtype in dtypes:
    for B, Hq, Hkv, L, S, E, Ev in shapes:
        q = torch.randn(B, Hq, L, E, device=device, dtype=dtype)
        k = torch.randn(B, Hkv, S, E, device=device, dtype=dtype)
        v = torch.randn(B, Hkv, S, Ev, device=device, dtype=dtype)
        bool_mask = (torch.rand(L, S, device=device) > 0.3).expand(B, Hq, L, S)
        float_mask = torch.randn(B, Hq, L, S, device=device)
        seed = torch.tensor([1234], dtype=torch.int64)
        for mask, p, causal in ((None, 0.0, False), (None, 0.0, True), (bool_mask, 0.0, False),
                                (float_mask, 0.0, False), (None, 0.3, True)):
            out, lse = ops.attention(q, k, v, mask, p, causal, 0.2, seed if p > 0 else None)
            want_mask = mask is not None and mask.is_floating_point()
            for deterministic in (False, True):
                torch.use_deterministic_algorithms(deterministic)
                ops.attention_backward(torch.randn_like(out), torch.randn_like(lse), q, k, v, mask, out, lse, p,
                                       causal, 0.2, seed if p > 0 else None, [True, True, True, want_mask])
                torch.use_deterministic_algorithms(False)
torch.cuda.synchronize()
print("sanitizer workload done")

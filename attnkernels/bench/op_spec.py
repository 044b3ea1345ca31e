"""What a benchmark op is (``OpSpec``) and the helpers its input builders share.

An op says how to build inputs of a given size, how to run torch's own op and ours on a backend,
and how much work one call does (bytes moved for the memory-bound samplers, FLOPs for attention).
The ops themselves are in ``sampling_ops.py`` and ``attention_ops.py``; ``cases.py`` turns them
into measured cases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import attnkernels

Inputs = dict[str, torch.Tensor]
Shape = dict[str, int]


@dataclass(frozen=True)
class OpSpec:
    """How to benchmark one op. ``ours(inputs, backend)`` runs attnkernels on a backend."""

    name: str
    public_function: str  # the attnkernels function this op needs; the op is skipped without it
    size_meaning: str  # what the --sizes number means for this op (plot x axis)
    work_unit: str  # "B" (bytes moved) or "FLOP"
    shape: Callable[[int, str], Shape]  # (size, device type) -> shape parameters
    make_inputs: Callable[[Shape, torch.dtype, torch.device, torch.Generator], Inputs]
    output_shape: Callable[[Shape], tuple[int, ...]]
    torch_impl: Callable[[Inputs], torch.Tensor]
    ours: Callable[[Inputs, str], torch.Tensor]
    differentiable_inputs: tuple[str, ...]
    work: Callable[[Shape, torch.dtype, bool], float]  # (shape, dtype, with backward) -> bytes or FLOPs
    label: Callable[[Shape], str]
    default_sizes: dict[str, tuple[int, ...]]  # device type -> sizes
    quick_sizes: dict[str, tuple[int, ...]]  # an empty tuple leaves the op out of --quick runs
    passes: tuple[str, ...] = ("fwd", "fwd+bwd", "bwd")  # the passes worth measuring for this op
    # Run our backward under torch.use_deterministic_algorithms(True) (torch's own stays as it is:
    # its CUDA sampler backward has no deterministic version).
    deterministic_backward: bool = False
    # Why torch's op cannot be run on this (shape, dtype, device), or None: a known torch bug that
    # crashes the process. Ours is then checked against the wider-dtype reference alone.
    torch_fails: Callable[[Shape, torch.dtype, torch.device], str | None] | None = None

    def available(self) -> bool:
        return hasattr(attnkernels, self.public_function)

    def run(self, inputs: Inputs, backend: str) -> torch.Tensor:
        """One call of torch's op (backend "torch") or of ours."""
        if backend == "torch":
            return self.torch_impl(inputs)
        return self.ours(inputs, backend)


def randn(shape: Sequence[int], dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Standard normal values drawn on ``device`` (GPU inputs are gigabytes), seeded from the CPU ``generator``."""
    seed = int(torch.randint(1 << 62, (1,), generator=generator))
    on_device = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=on_device, device=device, dtype=torch.float32).to(dtype)

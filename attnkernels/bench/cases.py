"""The benchmark cases: the one definition shared by ``python -m attnkernels.bench``
and the pytest-benchmark suites in ``bench/``.

An *op* (``OPS``) says how to build inputs of a given size, how to run torch's
own op and ours on a backend, and how much work one call does (bytes moved for
the memory-bound samplers, FLOPs for attention). A *case* is an op at one size,
dtype, device and pass (``fwd`` or ``fwd+bwd``). ``PreparedCase`` holds a case's
inputs (several copies, so the timed calls do not all hit a warm cache), checks a
backend's result against torch before it is timed, and hands out the callable
to time.

Byte counts (the floor of memory traffic; the same count for every backend, so
the rate is comparable across them):
    sampling forward:      input read once + grid read + output written
    sampling fwd+bwd:      forward + grad_output, input and grid read again,
                           grad_input and grad_grid written (3·input + 3·grid + 2·output)
    affine_grid_sample:    as above with theta in place of the grid (fusion removes the grid)
FLOP counts (FlashAttention's convention):
    attention forward:     4·B·H·L·S·E, half when causal;  fwd+bwd: 3.5x forward
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import attnkernels

PASSES = ("fwd", "fwd+bwd")

Inputs = dict[str, torch.Tensor]
Shape = dict[str, int]


# ----------------------------------------------------------------------------- the ops


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
    quick_sizes: dict[str, tuple[int, ...]]

    def available(self) -> bool:
        return hasattr(attnkernels, self.public_function)

    def run(self, inputs: Inputs, backend: str) -> torch.Tensor:
        """One call of torch's op (backend "torch") or of ours."""
        if backend == "torch":
            return self.torch_impl(inputs)
        return self.ours(inputs, backend)


def _randn(shape: Sequence[int], dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Standard normal values drawn on ``device`` (GPU inputs are gigabytes), seeded from the CPU ``generator``."""
    seed = int(torch.randint(1 << 62, (1,), generator=generator))
    on_device = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=on_device, device=device, dtype=torch.float32).to(dtype)


def _near_identity_theta(batch: int, dims: int, generator: torch.Generator) -> torch.Tensor:
    """Random affine maps close to the identity (an STN's typical output); some points land outside."""
    eye = torch.eye(dims, dims + 1).expand(batch, dims, dims + 1)
    return eye + 0.15 * torch.randn(batch, dims, dims + 1, generator=generator)


def _spatial(shape: Shape, dims: int) -> tuple[int, ...]:
    return tuple(shape[axis] for axis in "DHW"[3 - dims:])


def _sampling_shape(batch: dict[str, int], channels: dict[str, int], dims: int) -> Callable[[int, str], Shape]:
    def shape(size: int, device_type: str) -> Shape:
        sides = {"D": size, "H": size, "W": size} if dims == 3 else {"H": size, "W": size}
        return {"N": batch[device_type], "C": channels[device_type], **sides}
    return shape


def _sampling_label(dims: int) -> Callable[[Shape], str]:
    return lambda s: f"N={s['N']} C={s['C']} {'x'.join(str(v) for v in _spatial(s, dims))}"


def _sampling_bytes(dims: int, fused: bool) -> Callable[[Shape, torch.dtype, bool], float]:
    def work(shape: Shape, dtype: torch.dtype, backward: bool) -> float:
        element = torch.empty((), dtype=dtype).element_size()
        points = shape["N"] * math.prod(_spatial(shape, dims))  # output size == input size here
        image = points * shape["C"] * element
        coordinates = shape["N"] * dims * (dims + 1) * element if fused else points * dims * element
        if backward:
            return 3 * image + 3 * coordinates + 2 * image
        return image + coordinates + image
    return work


def _grid_inputs(dims: int) -> Callable[[Shape, torch.dtype, torch.device, torch.Generator], Inputs]:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> Inputs:
        size = (shape["N"], shape["C"], *_spatial(shape, dims))
        theta = _near_identity_theta(shape["N"], dims, generator)
        grid = F.affine_grid(theta.to(device=device, dtype=torch.float64), size, align_corners=False)
        return {"input": _randn(size, dtype, device, generator), "grid": grid.to(dtype)}
    return make


def _theta_inputs(dims: int) -> Callable[[Shape, torch.dtype, torch.device, torch.Generator], Inputs]:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> Inputs:
        size = (shape["N"], shape["C"], *_spatial(shape, dims))
        theta = _near_identity_theta(shape["N"], dims, generator)
        return {"input": _randn(size, dtype, device, generator), "theta": theta.to(device=device, dtype=dtype)}
    return make


def _sampling_ops() -> list[OpSpec]:
    ops = []
    # CPU sizes keep a whole CPU run to a few minutes on 2 cores; GPU sizes fill an H100's bandwidth.
    for dims, batch, channels, cpu_sizes, gpu_sizes in (
        (2, {"cpu": 1, "cuda": 32}, {"cpu": 32, "cuda": 64}, (64, 128, 256), (128, 256, 512)),
        (3, {"cpu": 2, "cuda": 4}, {"cpu": 8, "cuda": 32}, (16, 32, 48), (32, 64, 128)),
    ):
        common = dict(
            size_meaning="side of the input and output (" + ("D = H = W" if dims == 3 else "H = W") + ")",
            work_unit="B",
            shape=_sampling_shape(batch, channels, dims),
            output_shape=lambda s, dims=dims: (s["N"], s["C"], *_spatial(s, dims)),
            label=_sampling_label(dims),
            default_sizes={"cpu": cpu_sizes, "cuda": gpu_sizes},
            quick_sizes={"cpu": (cpu_sizes[0] // 2,), "cuda": (gpu_sizes[0],)},
        )
        ops.append(OpSpec(
            name=f"grid_sample_{dims}d",
            public_function="grid_sample",
            make_inputs=_grid_inputs(dims),
            torch_impl=lambda x: F.grid_sample(x["input"], x["grid"], align_corners=False),
            ours=lambda x, backend: attnkernels.grid_sample(x["input"], x["grid"], align_corners=False,
                                                            backend=backend),
            differentiable_inputs=("input", "grid"),
            work=_sampling_bytes(dims, fused=False),
            **common,
        ))
        ops.append(OpSpec(
            name=f"affine_grid_sample_{dims}d",
            public_function="affine_grid_sample",
            make_inputs=_theta_inputs(dims),
            # torch has no fused sampler: its equivalent is affine_grid followed by grid_sample.
            torch_impl=lambda x: F.grid_sample(
                x["input"], F.affine_grid(x["theta"], list(x["input"].shape), align_corners=False),
                align_corners=False),
            ours=lambda x, backend: attnkernels.affine_grid_sample(x["input"], x["theta"], align_corners=False,
                                                                   backend=backend),
            differentiable_inputs=("input", "theta"),
            work=_sampling_bytes(dims, fused=True),
            **common,
        ))
    return ops


def _video_ops() -> list[OpSpec]:
    """The video-volume cases of the sampling targets: D = 16 frames of H = W = size.

    grid_sample_video: one volume, C = 16 (CPU; torch's 3-D kernel runs a single volume on one
    core). affine_grid_sample_video: a batch of 4 RGB clips, fused against torch's affine_grid +
    grid_sample.
    """
    def video_shape(batch: dict[str, int], channels: dict[str, int]) -> Callable[[int, str], Shape]:
        return lambda size, device_type: {"N": batch[device_type], "C": channels[device_type], "D": 16,
                                          "H": size, "W": size}

    common = dict(
        size_meaning="height = width of 16-frame video volumes",
        work_unit="B",
        output_shape=lambda s: (s["N"], s["C"], *_spatial(s, 3)),
        label=_sampling_label(3),
        default_sizes={"cpu": (56, 112), "cuda": (112, 224)},
        quick_sizes={"cpu": (28,), "cuda": (112,)},
    )
    grid_op, fused_op = (op for op in _sampling_ops() if op.name in ("grid_sample_3d", "affine_grid_sample_3d"))
    return [
        dataclasses.replace(grid_op, name="grid_sample_video", shape=video_shape({"cpu": 1, "cuda": 8},
                                                                                 {"cpu": 16, "cuda": 32}), **common),
        dataclasses.replace(fused_op, name="affine_grid_sample_video", shape=video_shape({"cpu": 4, "cuda": 16},
                                                                                         {"cpu": 3, "cuda": 3}),
                            **common),
    ]


def _rgb_ops() -> list[OpSpec]:
    """grid_sample_rgb: a batch of 4 RGB images (C = 3), the spatial transformer's usual input, where
    torch's 2-D kernel (vectorised over points) is strongest."""
    grid_op = next(op for op in _sampling_ops() if op.name == "grid_sample_2d")
    return [dataclasses.replace(
        grid_op, name="grid_sample_rgb", shape=_sampling_shape({"cpu": 4, "cuda": 64}, {"cpu": 3, "cuda": 3}, 2),
        size_meaning="side of RGB images (H = W)", default_sizes={"cpu": (112, 224), "cuda": (224, 512)},
        quick_sizes={"cpu": (56,), "cuda": (224,)})]


# Attention: a fixed number of tokens (batch x sequence) per device, so every size does the same
# number of rows and the FLOPs grow linearly with the sequence length.
_ATTENTION_TOKENS = {"cpu": 2048, "cuda": 16384}
_ATTENTION_HEADS = {"cpu": 8, "cuda": 16}
_ATTENTION_HEAD_DIM = {"cpu": 64, "cuda": 128}


def _attention_shape(size: int, device_type: str) -> Shape:
    return {"B": max(1, _ATTENTION_TOKENS[device_type] // size), "H": _ATTENTION_HEADS[device_type],
            "L": size, "S": size, "E": _ATTENTION_HEAD_DIM[device_type]}


def _attention_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> Inputs:
    q_shape = (shape["B"], shape["H"], shape["L"], shape["E"])
    kv_shape = (shape["B"], shape["H"], shape["S"], shape["E"])
    return {"query": _randn(q_shape, dtype, device, generator), "key": _randn(kv_shape, dtype, device, generator),
            "value": _randn(kv_shape, dtype, device, generator)}


def _attention_flops(causal: bool) -> Callable[[Shape, torch.dtype, bool], float]:
    def work(shape: Shape, dtype: torch.dtype, backward: bool) -> float:
        forward = 4.0 * shape["B"] * shape["H"] * shape["L"] * shape["S"] * shape["E"] * (0.5 if causal else 1.0)
        return forward * 3.5 if backward else forward
    return work


def _attention_ops() -> list[OpSpec]:
    ops = []
    for causal in (False, True):
        ops.append(OpSpec(
            name="attention_causal" if causal else "attention",
            public_function="scaled_dot_product_attention",
            size_meaning="sequence length (L = S; batch x L fixed)",
            work_unit="FLOP",
            shape=_attention_shape,
            make_inputs=_attention_inputs,
            output_shape=lambda s: (s["B"], s["H"], s["L"], s["E"]),
            torch_impl=lambda x, causal=causal: F.scaled_dot_product_attention(
                x["query"], x["key"], x["value"], is_causal=causal),
            ours=lambda x, backend, causal=causal: attnkernels.scaled_dot_product_attention(
                x["query"], x["key"], x["value"], is_causal=causal, backend=backend),
            differentiable_inputs=("query", "key", "value"),
            work=_attention_flops(causal),
            label=lambda s: f"B={s['B']} H={s['H']} L={s['L']} E={s['E']}",
            default_sizes={"cpu": (256, 512, 1024), "cuda": (512, 1024, 2048, 4096, 8192)},
            quick_sizes={"cpu": (128,), "cuda": (1024,)},
        ))
    return ops


# FlashAttention's benchmark shapes for the CUDA kernels: 16k tokens (batch x L), model width
# 2048 (heads = 2048 / E), head dims 64 and 128, L = 1k ... 16k; against torch's default SDPA
# (sdpa_*) and its cuDNN backend (sdpa_cudnn_*: cuDNN takes float16/bfloat16 CUDA tensors only,
# other cases fall back to the default, which also computes the wider-precision check).
def _sdpa_shape(head_dim: int) -> Callable[[int, str], Shape]:
    def shape(size: int, device_type: str) -> Shape:
        tokens, width = (16384, 2048) if device_type == "cuda" else (1024, 256)
        return {"B": max(1, tokens // size), "H": width // head_dim, "L": size, "S": size, "E": head_dim}
    return shape


def _torch_sdpa(causal: bool, cudnn: bool) -> Callable[[Inputs], torch.Tensor]:
    def run(x: Inputs) -> torch.Tensor:
        q, k, v = x["query"], x["key"], x["value"]
        if cudnn and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _sdpa_ops() -> list[OpSpec]:
    ops = []
    for baseline in ("sdpa", "sdpa_cudnn"):
        for head_dim in (64, 128):
            for causal in (False, True):
                ops.append(OpSpec(
                    name=f"{baseline}_hdim{head_dim}" + ("_causal" if causal else ""),
                    public_function="scaled_dot_product_attention",
                    size_meaning="sequence length (L = S; batch x L = 16k)",
                    work_unit="FLOP",
                    shape=_sdpa_shape(head_dim),
                    make_inputs=_attention_inputs,
                    output_shape=lambda s: (s["B"], s["H"], s["L"], s["E"]),
                    torch_impl=_torch_sdpa(causal, cudnn=baseline == "sdpa_cudnn"),
                    ours=lambda x, backend, causal=causal: attnkernels.scaled_dot_product_attention(
                        x["query"], x["key"], x["value"], is_causal=causal, backend=backend),
                    differentiable_inputs=("query", "key", "value"),
                    work=_attention_flops(causal),
                    label=lambda s: f"B={s['B']} H={s['H']} L={s['L']} E={s['E']}",
                    default_sizes={"cpu": (128, 256), "cuda": (1024, 2048, 4096, 8192, 16384)},
                    quick_sizes={"cpu": (128,), "cuda": (2048,)},
                ))
    return ops


OPS: dict[str, OpSpec] = {op.name: op for op in (*_sampling_ops(), *_video_ops(), *_rgb_ops(), *_attention_ops(),
                                                 *_sdpa_ops())}


def usable_backends(device: torch.device) -> list[str]:
    """The attnkernels backends that can run on ``device``'s tensors in this process."""
    # The cuda backend takes CUDA tensors only, the cpu backend CPU tensors only.
    other = "cuda" if device.type == "cpu" else "cpu"
    return [b for b in attnkernels.available_backends() if b != other]


def default_backends(device: torch.device) -> list[str]:
    """The backends measured unless asked otherwise (torch is always measured besides)."""
    # On CPU tensors Triton runs only under its interpreter (TRITON_INTERPRET=1), a test vehicle
    # far slower than anything else: measured only when asked for by name.
    return [b for b in usable_backends(device) if not (device.type == "cpu" and b == "triton")]


def default_dtypes(device_type: str) -> tuple[torch.dtype, ...]:
    if device_type == "cuda":
        return (torch.bfloat16, torch.float32)
    return (torch.float32,)


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One op at one size, dtype, device and pass."""

    op: str
    direction: str  # "fwd" or "fwd+bwd"
    size: int
    dtype: torch.dtype
    device: torch.device

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]

    @property
    def backward(self) -> bool:
        return self.direction == "fwd+bwd"

    @property
    def shape(self) -> Shape:
        return self.spec.shape(self.size, self.device.type)

    @property
    def label(self) -> str:
        return self.spec.label(self.shape)

    @property
    def work(self) -> float:
        return self.spec.work(self.shape, self.dtype, self.backward)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def id(self) -> str:
        return f"{self.op}-{self.direction}-{self.size}-{self.dtype_name}"


def build_cases(ops: Sequence[str], device: torch.device, dtypes: Sequence[torch.dtype],
                sizes: Sequence[int] | None = None, quick: bool = False,
                passes: Sequence[str] = PASSES) -> list[Case]:
    """Every (op, dtype, size, pass) combination; sizes default to the op's sizes for the device."""
    cases = []
    for name in ops:
        spec = OPS[name]
        op_sizes = sizes or (spec.quick_sizes if quick else spec.default_sizes)[device.type]
        for dtype in dtypes:
            for size in op_sizes:
                for direction in passes:
                    cases.append(Case(name, direction, int(size), dtype, device))
    return cases


def available_ops() -> list[str]:
    return [name for name, spec in OPS.items() if spec.available()]


# ----------------------------------------------------------------------------- checking a result


class Unsupported(Exception):
    """The backend (or torch) cannot run these inputs: reported, not an error of the benchmark."""


@dataclass
class Check:
    ok: bool
    max_error: float
    allowed: float
    detail: str


# The check is FlashAttention's rule: our error against a wider-precision computation may be at
# most twice torch's own error in the same dtype (three times for gradients), plus a few units in
# the last place of the result's magnitude for when torch happens to be exact. float64 has no
# wider dtype, so it is compared with torch directly, at a thousand units in the last place.
_FORWARD_FACTOR, _GRADIENT_FACTOR = 2.0, 3.0


def _wider(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max())  # NaN propagates: a NaN result fails


def _is_unsupported(error: Exception) -> bool:
    text = str(error)
    return ("cannot serve" in text or "not implemented for" in text or "no backend can serve" in text
            or isinstance(error, NotImplementedError))


@dataclass
class _Expected:
    reference: list[torch.Tensor]  # output (and gradients) in the wider dtype
    torch_error: list[float]  # torch's own error against ``reference``, per tensor
    scale: list[float]  # max |reference| per tensor
    # Where the wider computation did not fit in memory, ``reference`` covers the first batch
    # element only, and the rest is compared with torch's result in the case's dtype.
    first_batch_only: bool = False
    torch_result: list[torch.Tensor] | None = None


@dataclass
class PreparedCase:
    """A case's inputs, several copies, and what a correct result looks like."""

    case: Case
    copies: int = 2
    inputs: list[Inputs] = field(init=False)
    grad_outputs: list[torch.Tensor] = field(init=False)
    _expected: _Expected | None = field(init=False, default=None)
    _expected_failure: BaseException | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.inputs, self.grad_outputs = [], []
        self.extend_to(self.copies)

    def extend_to(self, copies: int) -> None:
        """Make ``copies`` copies of the inputs in all (each drawn from its own seed)."""
        spec, case = self.case.spec, self.case
        for copy in range(len(self.inputs), copies):
            generator = torch.Generator().manual_seed(1000 * copy + case.size)
            inputs = spec.make_inputs(case.shape, case.dtype, case.device, generator)
            if case.backward:
                for name in spec.differentiable_inputs:
                    inputs[name].requires_grad_(True)
                self.grad_outputs.append(_randn(spec.output_shape(case.shape), case.dtype, case.device, generator))
            self.inputs.append(inputs)
        self.copies = len(self.inputs)

    def input_bytes(self) -> int:
        """Bytes of one copy of the inputs (what the timed call reads)."""
        tensors = list(self.inputs[0].values()) + self.grad_outputs[:1]
        return sum(t.numel() * t.element_size() for t in tensors)

    def call(self, backend: str, copy: int = 0) -> list[torch.Tensor]:
        """One forward (and backward) call: [output] or [output, *gradients of the differentiable inputs]."""
        spec, inputs = self.case.spec, self.inputs[copy]
        if not self.case.backward:
            with torch.no_grad():
                return [spec.run(inputs, backend)]
        output = spec.run(inputs, backend)
        wrt = [inputs[name] for name in spec.differentiable_inputs]
        return [output.detach(), *torch.autograd.grad(output, wrt, self.grad_outputs[copy])]

    def timed_callable(self, backend: str) -> Callable[[], object]:
        """A no-argument function for the timer: one call, rotating through the input copies."""
        order: Iterator[int] = iter(range(1 << 62))

        def run() -> object:
            return self.call(backend, next(order) % self.copies)
        return run

    def _wider_call(self, batch: int | None = None) -> list[torch.Tensor]:
        """torch's op on the first copy in the wider dtype (on its first ``batch`` elements)."""
        wider = _wider(self.case.dtype)
        spec = self.case.spec
        inputs = {k: v.detach()[:batch].to(wider).requires_grad_(v.requires_grad) for k, v in self.inputs[0].items()}
        if not self.case.backward:
            with torch.no_grad():
                return [spec.torch_impl(inputs)]
        output = spec.torch_impl(inputs)
        wrt = [inputs[name] for name in spec.differentiable_inputs]
        return [output.detach(), *torch.autograd.grad(output, wrt, self.grad_outputs[0][:batch].to(wider))]

    def expected(self) -> _Expected:
        """torch's result in the wider dtype, and torch's own error in the case's dtype (computed once).

        Raises Unsupported when torch cannot run the case, OutOfMemoryError when it does not fit."""
        if self._expected_failure is not None:
            raise self._expected_failure
        if self._expected is None:
            try:
                self._expected = self._compute_expected()
            except torch.OutOfMemoryError as error:
                self._expected_failure = error.with_traceback(None)
                raise
            except Exception as error:  # torch itself cannot run the case: nothing to compare with
                self._expected_failure = Unsupported(f"torch: {first_line(error)}")
                raise self._expected_failure from error
        return self._expected

    def _compute_expected(self) -> _Expected:
        torch_result = self.call("torch")
        try:
            reference, first_only = self._wider_call(), False
        except torch.OutOfMemoryError:
            _empty_cache(self.case.device)
            reference, first_only = self._wider_call(batch=1), True
        compared = [t[:1] for t in torch_result] if first_only else torch_result
        return _Expected(
            reference=reference,
            torch_error=[_max_abs_difference(t, r) for t, r in zip(compared, reference, strict=True)],
            scale=[float(r.abs().max()) if r.numel() else 0.0 for r in reference],
            first_batch_only=first_only,
            torch_result=torch_result if first_only else None,
        )

    def check(self, backend: str) -> Check:
        """Run ``backend`` once on the first copy and compare with torch. Raises Unsupported."""
        expected = self.expected()
        try:
            got = self.call(backend)
        except Exception as error:
            if _is_unsupported(error):
                raise Unsupported(first_line(error)) from error
            raise
        dtype = self.case.dtype
        ulps = 1000.0 if dtype == torch.float64 else 4.0
        eps = torch.finfo(dtype).eps
        names = ["output", *(f"grad_{n}" for n in self.case.spec.differentiable_inputs)]
        closest = Check(True, 0.0, 1.0, "")  # the tensor nearest its bound, reported when all pass
        for index, (name, tensor) in enumerate(zip(names, got, strict=False)):
            factor = _FORWARD_FACTOR if index == 0 else _GRADIENT_FACTOR
            allowed = factor * expected.torch_error[index] + ulps * eps * max(expected.scale[index], 1.0)
            if expected.first_batch_only:
                # The first element against the wider reference; all of it against torch, within
                # the same bound plus torch's own error (the triangle inequality).
                error = _max_abs_difference(tensor[:1], expected.reference[index])
                whole = _max_abs_difference(tensor, expected.torch_result[index])
                if not whole <= allowed + expected.torch_error[index]:
                    return Check(False, whole, allowed + expected.torch_error[index],
                                 f"{name}: max difference from torch {whole:.3g}, allowed "
                                 f"{allowed + expected.torch_error[index]:.3g}")
            else:
                error = _max_abs_difference(tensor, expected.reference[index])
            detail = (f"{name}: max error {error:.3g}, allowed {allowed:.3g} "
                      f"(torch's own error {expected.torch_error[index]:.3g})")
            if not error <= allowed:  # also catches NaN
                return Check(False, error, allowed, detail)
            if error / allowed >= closest.max_error / closest.allowed:
                closest = Check(True, error, allowed, detail)
        return closest


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def with_implementation(op: str, ours: Callable[[Inputs, str], torch.Tensor]) -> OpSpec:
    """A copy of OPS[op] running ``ours`` instead (tests use it to inject a wrong kernel)."""
    return dataclasses.replace(OPS[op], ours=ours)

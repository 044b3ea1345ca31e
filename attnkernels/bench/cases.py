"""The benchmark cases: the one definition shared by ``python -m attnkernels.bench``,
the pytest-benchmark suites in ``bench/`` and the GPU check's table.

An *op* (``OPS``: ``sampling_ops.py``, ``attention_ops.py``) says how to build inputs of a given size,
how to run torch's own op and ours on a backend, and how much work one call does. A *case* is an op
at one size, dtype, device and pass (``fwd``, ``fwd+bwd``, or ``bwd``: the backward alone, timed from
a forward done beforehand). ``PreparedCase`` holds a case's
inputs (several copies, so the timed calls do not all hit a warm cache), checks a backend's result
against torch before it is timed, and hands out the callable to time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

import attnkernels

from .attention_ops import attention_ops
from .op_spec import Inputs, OpSpec, Shape, randn
from .sampling_ops import sampling_ops

__all__ = ["DEFAULT_PASSES", "OPS", "PASSES", "Case", "Inputs", "OpSpec", "PreparedCase", "Shape", "Unsupported",
           "available_ops", "build_cases", "default_backends", "default_dtypes", "first_line", "usable_backends",
           "with_implementation"]

DEFAULT_PASSES = ("fwd", "fwd+bwd")
PASSES = (*DEFAULT_PASSES, "bwd")

OPS: dict[str, OpSpec] = {op.name: op for op in (*sampling_ops(), *attention_ops())}


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
    direction: str  # "fwd", "fwd+bwd" or "bwd"
    size: int
    dtype: torch.dtype
    device: torch.device

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]

    @property
    def backward(self) -> bool:
        """Whether the case computes gradients (checked as output and gradients, fwd+bwd or bwd)."""
        return self.direction != "fwd"

    @property
    def shape(self) -> Shape:
        return self.spec.shape(self.size, self.device.type)

    @property
    def label(self) -> str:
        return self.spec.label(self.shape)

    @property
    def work(self) -> float:
        if self.direction == "bwd":  # what the backward adds to the forward
            return self.spec.work(self.shape, self.dtype, True) - self.spec.work(self.shape, self.dtype, False)
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
                for direction in (p for p in passes if p in spec.passes):
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


def _error_against(result: torch.Tensor, reference: torch.Tensor) -> float:
    """max |result - reference|, where a reference entry too large for the result's dtype must come out
    as that dtype's infinity (any correct result does: a float16 sum over many points can pass 65504)."""
    if result.shape == reference.shape and result.numel():
        rounded = reference.to(result.dtype)
        overflowed = torch.isinf(rounded) & torch.isfinite(reference) & (result == rounded)
        if bool(overflowed.any()):
            result = torch.where(overflowed, 0, result.double())
            reference = torch.where(overflowed, 0, reference.double())
    return _max_abs_difference(result, reference)


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
    torch_fails: str | None = None  # why torch itself was not run (OpSpec.torch_fails)


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
                self.grad_outputs.append(randn(spec.output_shape(case.shape), case.dtype, case.device, generator))
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
        with _deterministic_algorithms(spec.deterministic_backward and backend != "torch"):
            gradients = torch.autograd.grad(output, wrt, self.grad_outputs[copy])
        return [output.detach(), *gradients]

    def timed_callable(self, backend: str) -> Callable[[], object]:
        """A no-argument function for the timer: one call, rotating through the input copies."""
        order: Iterator[int] = iter(range(1 << 62))
        if self.case.direction == "bwd":
            return self._timed_backward(backend, order)

        def run() -> object:
            return self.call(backend, next(order) % self.copies)
        return run

    def _timed_backward(self, backend: str, order: Iterator[int]) -> Callable[[], object]:
        """The backward alone: each copy's forward is run once here, its graph kept for the timed calls."""
        spec = self.case.spec
        graphs = []
        for copy, inputs in enumerate(self.inputs):
            output = spec.run(inputs, backend)
            graphs.append((output, [inputs[name] for name in spec.differentiable_inputs], self.grad_outputs[copy]))

        def run() -> object:
            output, wrt, grad_output = graphs[next(order) % len(graphs)]
            with _deterministic_algorithms(spec.deterministic_backward and backend != "torch"):
                return torch.autograd.grad(output, wrt, grad_output, retain_graph=True)
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
        spec, case = self.case.spec, self.case
        torch_fails = spec.torch_fails(case.shape, case.dtype, case.device) if spec.torch_fails else None
        if torch_fails is not None:
            reference = self._wider_call()
            return _Expected(reference=reference, torch_error=[math.nan] * len(reference),
                             scale=[float(r.abs().max()) if r.numel() else 0.0 for r in reference],
                             torch_fails=torch_fails)
        torch_result = self.call("torch")
        try:
            reference, first_only = self._wider_call(), False
        except torch.OutOfMemoryError:
            _empty_cache(self.case.device)
            reference, first_only = self._wider_call(batch=1), True
        compared = [t[:1] for t in torch_result] if first_only else torch_result
        return _Expected(
            reference=reference,
            torch_error=[_error_against(t, r) for t, r in zip(compared, reference, strict=True)],
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
            if expected.torch_fails is not None:  # no torch error to scale: the rounding bound alone, widened
                allowed = factor * ulps * eps * max(expected.scale[index], 1.0)
            else:
                allowed = factor * expected.torch_error[index] + ulps * eps * max(expected.scale[index], 1.0)
            if expected.first_batch_only:
                # The first element against the wider reference; all of it against torch, within
                # the same bound plus torch's own error (the triangle inequality).
                error = _error_against(tensor[:1], expected.reference[index])
                whole = _max_abs_difference(tensor, expected.torch_result[index])
                if not whole <= allowed + expected.torch_error[index]:
                    return Check(False, whole, allowed + expected.torch_error[index],
                                 f"{name}: max difference from torch {whole:.3g}, allowed "
                                 f"{allowed + expected.torch_error[index]:.3g}")
            else:
                error = _error_against(tensor, expected.reference[index])
            detail = (f"{name}: max error {error:.3g}, allowed {allowed:.3g} "
                      f"(torch's own error {expected.torch_error[index]:.3g})")
            if not error <= allowed:  # also catches NaN
                return Check(False, error, allowed, detail)
            if error / allowed >= closest.max_error / closest.allowed:
                closest = Check(True, error, allowed, detail)
        return closest


@contextlib.contextmanager
def _deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms(True) inside the block when ``enabled``; else nothing changes."""
    if not enabled or torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False, warn_only=warn_only)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def with_implementation(op: str, ours: Callable[[Inputs, str], torch.Tensor]) -> OpSpec:
    """A copy of OPS[op] running ``ours`` instead (tests use it to inject a wrong kernel)."""
    return dataclasses.replace(OPS[op], ours=ours)

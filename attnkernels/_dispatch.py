"""Backend selection: the one place that decides which implementation runs.

Each op has one table of ``Backend`` declarations, one per backend, each stating what it serves
(devices through its name, dtypes, dims, modes, head dims, features) and the callable that runs
it, declared next to its kernels. ``not_supported_reasons`` turns a declaration and a ``Request``
(what one call asks) into None or the sentence saying why not (the xformers pattern);
``select`` tries the backends in order of preference, or checks the one the caller asked for and
raises with its reason.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as forward_ad

from . import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")


# Read once at import (torch.compile traces plain constants without graph breaks).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _wrap_triton_takes_interpreted_kernels() -> bool:
    """Whether this torch's wrap_triton accepts the interpreter's kernels (torch 2.11's accepts only
    compiled ones, so there the triton backend serves CUDA tensors alone)."""
    import triton
    from torch.library import wrap_triton

    @triton.jit
    def probe(x):
        pass

    try:
        wrap_triton(probe)
    except RuntimeError:
        return False
    return True


# TRITON_INTERPRET=1 runs Triton kernels on CPU tensors: how CI tests them.
_TRITON_INTERPRETER = (os.environ.get("TRITON_INTERPRET", "0") == "1" and _TRITON_INSTALLED
                       and _wrap_triton_takes_interpreted_kernels())


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def triton_interpreter() -> bool:
    return _TRITON_INTERPRETER


def triton_module():
    """attnkernels.triton, or None where Triton (or that module) is not available.

    A plain import rather than importlib, so that torch.compile traces through it.
    """
    if not _TRITON_INSTALLED:
        return None
    try:
        from attnkernels import triton as module
    except ImportError:
        return None
    return module


def why_not_device(tensor: torch.Tensor, backend: str, op: str) -> str | None:
    """Common rules for the compiled (attnkernels::<op>) and Triton backends."""
    if backend == "cpu":
        if not _extension.has_extension():
            return _extension.why_no_extension()
        if not _extension.has_kernel(op, "CPU"):
            return f"the extension has no CPU kernel for {op}"
        if not tensor.is_cpu:  # is_cpu, not device.type: a device object costs ~0.3 us a call
            return f"the inputs are on {tensor.device}, and the cpu backend runs on CPU tensors only"
        return None
    if backend == "cuda":
        if not _extension.has_kernel(op, "CUDA"):
            return (f"the extension was built without a CUDA kernel for {op} "
                    "(see the README: building with CUDA)")
        if not tensor.is_cuda:
            return f"the inputs are on {tensor.device}, and the cuda backend runs on CUDA tensors only"
        return None
    if backend == "triton":
        if not triton_installed():
            return "Triton is not installed"
        if tensor.is_cuda:
            return None
        if tensor.is_cpu and triton_interpreter():
            return None
        if tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            return (f"the inputs are on {tensor.device}; TRITON_INTERPRET=1 is set, but torch "
                    f"{torch.__version__}'s wrap_triton does not take interpreted kernels (torch 2.14 does)")
        return (f"the inputs are on {tensor.device}; the triton backend runs on CUDA tensors, "
                "or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1)")
    return None


class Request(NamedTuple):
    """What one (validated) call asks of a backend.

    op: the kernel op (attnkernels::<op>) whose registration decides the cpu and cuda backends;
    tensor: the input that decides device and dtype; dims: spatial dims (2 or 3) of a sampler;
    mode: its interpolation name; head_dims: (E, Ev) of attention; features: what the call uses
    beyond the plain op (attention: "mask", "dropout", "causal", "gqa"); tensors: the call's
    tensors by name, for a backend's ``extra_reasons``.

    A named tuple: one is built on every call, and a frozen dataclass takes twice as long to build.
    """

    op: str
    tensor: torch.Tensor
    dims: int | None = None
    mode: str | None = None
    head_dims: tuple[int, int] | None = None
    features: frozenset[str] = frozenset()
    tensors: Mapping[str, torch.Tensor | None] = types.MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend of one op: what it serves and the callable that runs it.

    A field left None places no limit. ``extra_reasons(request)`` states what the fields cannot
    (a limit on one device only, a kernel's launch limits). ``gradient`` is attention's backward
    kernel, for callers that run it on their own (``attnkernels.distributed``).
    """

    name: str
    run: Callable
    label: str = ""
    dtypes: tuple[torch.dtype, ...] | None = None
    dims: tuple[int, ...] | None = None
    modes: tuple[str, ...] | None = None
    max_head_dim: int | None = None
    features: frozenset[str] | None = None
    extra_reasons: Callable[[Request], str | None] | None = None
    gradient: Callable | None = None


def _label(backend: Backend) -> str:
    return backend.label or f"the {backend.name} backend"


def _listed(words: Sequence[str], last: str = "or") -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def _carries_tangent(request: Request) -> bool:
    """Whether a forward-mode AD tangent (a dual tensor) rides on any of the call's tensors."""
    if forward_ad._current_level < 0:  # no dual level is open: the common case, one global read
        return False
    tensors = (request.tensor, *request.tensors.values())
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def not_supported_reasons(backend: Backend, request: Request) -> str | None:
    """None when ``backend`` can serve ``request``, else the sentence saying why not."""
    if backend.name != "reference" and _carries_tangent(request):
        # The kernels' ops have no forward derivative, and would drop the tangent without a word;
        # the reference is plain torch code, which propagates it.
        return f"{_label(backend)} has no forward-mode AD (dual tensors): the reference backend serves it"
    reason = why_not_device(request.tensor, backend.name, request.op)
    if reason is not None:
        return reason
    if backend.dtypes is not None and request.tensor.dtype not in backend.dtypes:
        return (f"{_label(backend)} takes {_listed([str(d).removeprefix('torch.') for d in backend.dtypes])} "
                f"inputs, not {request.tensor.dtype}")
    if backend.modes is not None and request.mode is not None and request.mode not in backend.modes:
        return f"{_label(backend)} has no {request.mode!r} mode"
    if backend.dims is not None and request.dims is not None and request.dims not in backend.dims:
        return f"{_label(backend)} takes {_listed([f'{d + 2}-D' for d in backend.dims])} inputs"
    if backend.max_head_dim is not None and request.head_dims is not None:
        head_dim, value_dim = request.head_dims
        if max(head_dim, value_dim) > backend.max_head_dim:
            return (f"{_label(backend)} takes head dims up to {backend.max_head_dim}, "
                    f"got E = {head_dim} and Ev = {value_dim}")
    if backend.features is not None and not request.features <= backend.features:
        return f"{_label(backend)} does not serve {_listed(sorted(request.features - backend.features), 'and')}"
    if backend.extra_reasons is not None:
        return backend.extra_reasons(request)
    return None


def unavailable(name: str, reason: str) -> Backend:
    """The table entry of a backend whose module could not be imported: it serves nothing, saying why."""
    def refuse(*args, **kwargs):
        raise RuntimeError(reason)

    return Backend(name, run=refuse, extra_reasons=lambda request: reason)


def preference(tensor: torch.Tensor, cuda_order: Sequence[str] = ("cuda", "triton")) -> tuple[str, ...]:
    """Backends to try for ``backend=None``, best first, for the tensor's device.

    On CPU tensors the Triton interpreter is never chosen automatically: it is
    a test vehicle, far slower than the C++ kernels. Under torch.func transforms
    (grad, jacrev, vmap, ...) the reference serves: the compiled and Triton ops'
    autograd (torch.library.register_autograd) does not support them, and the
    reference is plain differentiable torch code.
    """
    if torch._C._are_functorch_transforms_active():
        return ("reference",)
    if tensor.is_cuda:
        return (*cuda_order, "reference")
    return ("cpu", "reference")


# Each op's table, built on first use by ``backend_table``.
_TABLES: dict[str, tuple[Backend, ...]] = {}


def backend_table(op: str, build: Callable[[], Sequence[Backend]]) -> tuple[Backend, ...]:
    """``op``'s table of backends, built by ``build()`` on the first call and kept: it depends on the
    process only. Built on first use rather than at import, since building it imports
    attnkernels.triton (and Triton)."""
    table = _TABLES.get(op)
    if table is None:
        table = _TABLES[op] = tuple(build())
    return table


def _entry(table: Sequence[Backend], name: str) -> Backend | None:
    for backend in table:
        if backend.name == name:
            return backend
    return None


def select(op: str, requested: str | None, table: Sequence[Backend], request: Request) -> Backend:
    """The declaration of the backend that runs ``op`` for ``request``: ``requested`` if it can serve
    it, else the first of ``preference`` that can (raises saying why each cannot).

    A backend's reasons are worked out only when it is tried, so the common call, served by the
    first backend tried, asks one backend only.
    """
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"attnkernels.{op}: `backend` must be one of {', '.join(BACKENDS)} or None, "
                             f"got {requested!r}")
        backend = _entry(table, requested)
        reason = (f"{op} has no {requested} implementation" if backend is None
                  else not_supported_reasons(backend, request))
        if reason is not None:
            raise RuntimeError(f"attnkernels.{op}: the {requested!r} backend cannot serve these inputs: {reason}")
        return backend
    cuda_order = (tuple(backend.name for backend in table if backend.name in ("cuda", "triton"))
                  if request.tensor.is_cuda else ())  # only CUDA tensors try them
    reasons = []
    for name in preference(request.tensor, cuda_order):
        backend = _entry(table, name)
        reason = f"no {name} implementation" if backend is None else not_supported_reasons(backend, request)
        if reason is None:
            return backend
        reasons.append(f"{name}: {reason}")
    raise RuntimeError(f"attnkernels.{op}: no backend can serve these inputs ({'; '.join(reasons)})")


_BELOW_AUTOGRAD = torch._C._AutoDispatchBelowADInplaceOrView


# Eager autograd of the compiled ops: OpOverload -> a torch.autograd.Function that runs the op below
# autograd and applies the setup_context and backward registered for it (register_autograd).
_EAGER_AUTOGRAD: dict[object, type[torch.autograd.Function]] = {}


def register_autograd(overload, backward: Callable, setup_context: Callable) -> None:
    """``torch.library.register_autograd(overload, backward, setup_context=setup_context)``, and the same
    rule as an autograd.Function that ``call_op`` applies in eager mode.

    torch.library's autograd wrapper costs ~20 us a call in Python (it rebuilds the schema's argument
    list to fill in defaults and redispatches), more than a small grid_sample's kernel; the Function
    runs the one backward formula without it. Traced calls (torch.compile) and direct calls of
    torch.ops.attnkernels.* keep the registered autograd, which opcheck checks.
    """
    torch.library.register_autograd(overload, backward, setup_context=setup_context)
    if not isinstance(overload, torch._ops.OpOverload):
        return

    # forward(ctx, *args), which calls setup_context itself: a Function that defines setup_context
    # has apply bind its arguments to forward's signature (inspect.signature) on every call.
    def forward(ctx, *args):
        with _BELOW_AUTOGRAD():
            output = overload(*args)
        setup_context(ctx, args, output)
        return output

    name = f"Eager_{overload.name().replace('::', '_').replace('.', '_')}"
    _EAGER_AUTOGRAD[overload] = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})


def call_op(overload, args: Sequence, differentiable: Sequence[torch.Tensor | None]):
    """``overload(*args)`` of a compiled op (its autograd registered through ``register_autograd``).

    When autograd records nothing (grad mode off, or none of ``differentiable`` requires grad) the
    call goes below autograd, skipping torch.library's Python autograd wrapper, which would only
    redispatch: about 4 us a call, a tenth of a small grid_sample or a decoding step. When it records,
    the op's eager autograd.Function records it. Traced (torch.compile) calls keep the plain call.
    """
    if torch.compiler.is_compiling():
        return overload(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        function = _EAGER_AUTOGRAD.get(overload)
        return overload(*args) if function is None else function.apply(*args)
    with _BELOW_AUTOGRAD():
        return overload(*args)


def available_backends() -> list[str]:
    """The backends usable in this process, in order of preference.

    ``cuda`` when the extension has CUDA kernels and a GPU is visible;
    ``triton`` when Triton is installed and there is a GPU or TRITON_INTERPRET=1;
    ``cpu`` when the extension is built; ``reference`` always.
    """
    found = []
    gpu = torch.cuda.is_available()
    if gpu and _extension.has_cuda_kernels():
        found.append("cuda")
    if triton_installed() and (gpu or triton_interpreter()):
        found.append("triton")
    if _extension.has_extension():
        found.append("cpu")
    found.append("reference")
    return found

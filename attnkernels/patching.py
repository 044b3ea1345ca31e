"""Drop-in patching: run unmodified torch models on attnkernels.

    import attnkernels
    with attnkernels.patched():
        out = model(x)          # F.grid_sample, F.affine_grid and F.scaled_dot_product_attention are ours

``patch_torch()`` replaces three attributes of ``torch.nn.functional``:
``grid_sample``, ``affine_grid`` and ``scaled_dot_product_attention``.
``unpatch_torch()`` puts back the very objects it found.

What is and is not reached:

- Code that looks the function up at call time (``F.grid_sample(...)``,
  ``torch.nn.functional.scaled_dot_product_attention(...)``) runs ours. A name
  bound before patching (``from torch.nn.functional import grid_sample``) keeps
  torch's function.
- ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer`` reach
  ``scaled_dot_product_attention`` through the module global of
  ``torch.nn.functional`` in ``F.multi_head_attention_forward`` when they do not
  return attention weights (``need_weights=False``; the encoder layer always
  asks so). In inference they would instead take torch's fused C++ "fast path"
  (``torch._native_multi_head_attention`` / ``_transformer_encoder_layer_fwd``),
  which never calls SDPA, so patching also turns that fast path off
  (``torch.backends.mha.set_fastpath_enabled(False)``) and restores its previous
  setting on unpatch. ``nn.MultiheadAttention`` with ``need_weights=True`` (its
  default) computes the weights with ``bmm`` + softmax, never through SDPA.

Inputs ours does not take (tensor subclasses with ``__torch_function__``,
devices other than CPU and CUDA, nested or sparse tensors) go to torch's own
op, with one warning per reason. Under ``torch.autocast`` the wrappers apply
torch's autocast policy for these ops themselves (grid_sample in float32,
SDPA and affine_grid in the autocast dtype) and run ours with autocast
off, so results have the dtypes torch would give.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from . import attention as _attention
from . import sampling as _sampling

PATCHED_NAMES = ("grid_sample", "affine_grid", "scaled_dot_product_attention")

_lock = threading.Lock()
# The objects found in torch.nn.functional when patching, and the MHA fast-path setting.
_originals: dict[str, Callable] | None = None
_original_fastpath: bool | None = None
_warned_reasons: set[tuple[str, str]] = set()

_OUR_DEVICES = ("cpu", "cuda")
_TRACING_TENSORS = (FakeTensor, FunctionalTensor)
# Floating dtypes autocast casts (float64 is never cast).
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def is_patched() -> bool:
    """Whether ``torch.nn.functional`` currently runs attnkernels."""
    return _originals is not None


def _original(name: str) -> Callable:
    # Called only by the wrappers, which exist in F only while patched; if a
    # caller kept a reference to a wrapper after unpatching, F holds the original.
    return _originals[name] if _originals is not None else getattr(F, name)


def _warn_fallback(op: str, reason: str) -> None:
    key = (op, reason)
    if key in _warned_reasons:
        return
    _warned_reasons.add(key)
    warnings.warn(f"attnkernels.patch_torch: torch.nn.functional.{op} falls back to torch's own op because {reason} "
                  "(warned once)", UserWarning, stacklevel=4)


def _why_not_ours(tensors: tuple) -> str | None:
    """None when attnkernels can take these tensor arguments, else the reason it cannot."""
    present = tuple(t for t in tensors if isinstance(t, torch.Tensor))
    for t in present:  # before the subclass check: jagged nested tensors are a subclass too
        if t.layout != torch.strided or t.is_nested:
            return f"a tensor argument has layout {'nested' if t.is_nested else t.layout}, not strided"
    # torch.compile traces with fake and functional tensors, which our ops support (register_fake).
    others = tuple(t for t in present if not isinstance(t, _TRACING_TENSORS))
    if torch.overrides.has_torch_function(others):
        return "a tensor argument is a subclass overriding __torch_function__"
    for t in present:
        if t.device.type not in _OUR_DEVICES:
            return f"a tensor argument is on {t.device.type}, and attnkernels runs on CPU and CUDA"
    return None


def _autocast_device(tensors: tuple) -> str | None:
    """The device type whose autocast is on for these tensors, or None."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            kind = t.device.type
            return kind if torch.is_autocast_enabled(kind) else None
    return None


def _cast(t, dtype: torch.dtype):
    if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_ELIGIBLE and t.dtype != dtype:
        return t.to(dtype)
    return t


# ----------------------------------------------------------------------------- the wrappers


def grid_sample(input: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: bool | None = None) -> torch.Tensor:
    """``torch.nn.functional.grid_sample`` run by ``attnkernels.grid_sample``."""
    reason = _why_not_ours((input, grid))
    if reason is not None:
        _warn_fallback("grid_sample", reason)
        return _original("grid_sample")(input, grid, mode, padding_mode, align_corners)
    autocast = _autocast_device((input, grid))
    if autocast is not None:
        # torch's autocast policy runs grid_sampler in float32.
        with torch.autocast(autocast, enabled=False):
            return _sampling.grid_sample(_cast(input, torch.float32), _cast(grid, torch.float32), mode,
                                         padding_mode, align_corners)
    return _sampling.grid_sample(input, grid, mode, padding_mode, align_corners)


def affine_grid(theta: torch.Tensor, size: list[int], align_corners: bool | None = None) -> torch.Tensor:
    """``torch.nn.functional.affine_grid`` run by ``attnkernels.affine_grid``."""
    reason = _why_not_ours((theta,))
    if reason is not None:
        _warn_fallback("affine_grid", reason)
        return _original("affine_grid")(theta, size, align_corners)
    autocast = _autocast_device((theta,))
    if autocast is not None:
        # torch's affine_grid is a matmul inside, which autocast runs in the autocast dtype.
        with torch.autocast(autocast, enabled=False):
            return _sampling.affine_grid(_cast(theta, torch.get_autocast_dtype(autocast)), size, align_corners)
    return _sampling.affine_grid(theta, size, align_corners)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` run by ``attnkernels.scaled_dot_product_attention``."""
    reason = _why_not_ours((query, key, value, attn_mask))
    if reason is not None:
        _warn_fallback("scaled_dot_product_attention", reason)
        return _original("scaled_dot_product_attention")(query, key, value, attn_mask, dropout_p, is_causal,
                                                         scale=scale, enable_gqa=enable_gqa)
    autocast = _autocast_device((query, key, value))
    if autocast is not None:
        # torch's autocast policy runs SDPA in the autocast dtype (a float mask included).
        low = torch.get_autocast_dtype(autocast)
        with torch.autocast(autocast, enabled=False):
            return _attention.scaled_dot_product_attention(
                _cast(query, low), _cast(key, low), _cast(value, low), _cast(attn_mask, low), dropout_p,
                is_causal, scale=scale, enable_gqa=enable_gqa)
    return _attention.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                                   enable_gqa=enable_gqa)


_WRAPPERS = {
    "grid_sample": grid_sample,
    "affine_grid": affine_grid,
    "scaled_dot_product_attention": scaled_dot_product_attention,
}
for _name, _wrapper in _WRAPPERS.items():
    # help(F.grid_sample) while patched shows torch's documentation, which ours follows.
    _wrapper.__doc__ = f"attnkernels drop-in (see attnkernels.patching).\n\n{getattr(F, _name).__doc__ or ''}"
del _name, _wrapper


# ----------------------------------------------------------------------------- patch / unpatch


def patch_torch() -> None:
    """Make ``torch.nn.functional.grid_sample``, ``affine_grid`` and ``scaled_dot_product_attention`` ours.

    Idempotent: patching twice keeps the true originals. Also turns off the
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` inference fast
    path, which would bypass SDPA (restored by ``unpatch_torch``).
    """
    global _originals, _original_fastpath
    with _lock:
        if _originals is not None:
            return
        _originals = {name: getattr(F, name) for name in PATCHED_NAMES}
        _original_fastpath = torch.backends.mha.get_fastpath_enabled()
        for name in PATCHED_NAMES:
            setattr(F, name, _WRAPPERS[name])
        torch.backends.mha.set_fastpath_enabled(False)


def unpatch_torch() -> None:
    """Put back the exact objects ``patch_torch`` replaced (a no-op when not patched)."""
    global _originals, _original_fastpath
    with _lock:
        if _originals is None:
            return
        for name, original in _originals.items():
            setattr(F, name, original)
        torch.backends.mha.set_fastpath_enabled(_original_fastpath)
        _originals = None
        _original_fastpath = None


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """Run the ``with`` block with torch patched; afterwards restore the state found on entry.

    Nested or inside an explicit ``patch_torch()``, leaving the block keeps torch patched.
    Also usable as a decorator (``@attnkernels.patched()``).
    """
    was_patched = is_patched()
    patch_torch()
    try:
        yield
    finally:
        if not was_patched:
            unpatch_torch()


__all__ = ["PATCHED_NAMES", "is_patched", "patch_torch", "patched", "unpatch_torch"]

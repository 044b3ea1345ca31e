"""Compile the Triton kernels for an H100 (sm_90) without a GPU: ``python -m attnkernels.triton._compile_check``.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, but not Triton's compiler, which
is stricter (no plain Python globals in kernels, layout and MMA constraints). Triton ships ptxas,
so the whole pipeline down to a cubin runs on a machine without a GPU: this checks that the
kernels compile for the configurations a GPU would pick. Run it without TRITON_INTERPRET.

    python -m attnkernels.triton._compile_check            # a representative set (about a minute)
    python -m attnkernels.triton._compile_check --all      # every flag combination and dtype
    python -m attnkernels.triton._compile_check --configs  # plus every attention autotune config
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import sys
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
# The most shared memory one block may have on sm_90 (227 KiB): Triton only finds out at the first launch.
MAX_SHARED_BYTES = 232448
_ACC_POINTERS = {tl.float32: "*fp32", tl.float64: "*fp64"}


def _signature(fn, pointers: dict[str, str], constants: dict, floats=()) -> dict[str, str]:
    return {name: "constexpr" if name in constants else pointers.get(name, "fp32" if name in floats else "i32")
            for name in fn.arg_names}


def compile_kernel(fn, pointers, constants, floats=(), num_warps=4, num_stages=3):
    """Compile one specialisation to a cubin; returns its shared memory in bytes."""
    source = ASTSource(fn, _signature(fn, pointers, constants, floats), constexprs=constants)
    kernel = triton.compile(source, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    return kernel.metadata.shared


def attention_cases(everything: bool):
    """(kernel name, pointers, constants, warps, stages) for the forward and both backward kernels."""
    dtypes = ("fp16", "bf16", "fp32") if everything else ("bf16",)
    flags = [(False, False, True, False), (True, True, False, True), (True, False, False, False)]
    for dtype, (has_mask, mask_bool, causal, dropout) in itertools.product(dtypes, flags):
        precision = "ieee" if dtype == "fp32" else "tf32"
        acc = _ACC_POINTERS[tl.float32]
        mask = "*i1" if mask_bool else "*" + dtype
        common = dict(HAS_MASK=has_mask, MASK_BOOL=mask_bool, IS_CAUSAL=causal, HAS_DROPOUT=dropout,
                      PRECISION=precision, DOT_FP32=False, ACC=tl.float32, BLOCK_E=128, BLOCK_EV=128)
        inputs = {"Q": "*" + dtype, "K": "*" + dtype, "V": "*" + dtype, "Mask": mask, "Seed": "*i64", "Params": acc}
        big = dtype != "fp32"
        yield ("_forward_kernel", {**inputs, "Out": "*" + dtype, "Lse": acc},
               dict(common, BLOCK_M=128 if big else 64, BLOCK_N=64 if big else 32), 8 if big else 4, 3)
        grads = {**inputs, "GradOut": "*" + dtype, "Lse": acc, "Delta": acc}
        backward = dict(common, BLOCK_M=64 if big else 32, BLOCK_N=64 if big else 32)
        yield ("_backward_kv_kernel", {**grads, "GradK": acc, "GradV": acc}, backward, 8 if big else 4, 2)
        yield ("_backward_q_kernel", {**grads, "GradQ": acc, "GradMask": acc},
               dict(backward, MASK_GRAD=has_mask and not mask_bool), 8 if big else 4, 2)
        if dtype == "bf16" and has_mask:
            # L = S = 1, one head, unit strides: every int argument specialised to a constexpr 1.
            yield ("_forward_kernel", {**inputs, "Out": "*" + dtype, "Lse": acc},
                   dict(common, BLOCK_M=64, BLOCK_N=64, SIZE_ONE=True), 4, 2)
            yield ("_backward_kv_kernel", {**grads, "GradK": acc, "GradV": acc}, dict(backward, SIZE_ONE=True), 4, 2)
            yield ("_backward_q_kernel", {**grads, "GradQ": acc, "GradMask": acc},
                   dict(backward, MASK_GRAD=not mask_bool, SIZE_ONE=True), 4, 2)
    # The double backward's dropout mask (the kernels' Philox draw), with lengths of 1 too.
    yield ("_dropout_keep_kernel", {"Seed": "*i64", "Keep": "*u8"}, dict(BLOCK_M=32, BLOCK_N=32), 4, 1)
    yield ("_dropout_keep_kernel", {"Seed": "*i64", "Keep": "*u8"}, dict(BLOCK_M=32, BLOCK_N=32, SIZE_ONE=True), 4, 1)


def autotune_config_cases():
    """Every GPU autotune config the pruner keeps for bf16 at head dims 64 and 128 (no mask, not causal):
    the configs a GPU run may pick, each compiled once."""
    attention = importlib.import_module("attnkernels.triton.attention")
    import torch

    for kind, name, pruner in (("forward", "_forward_kernel", "forward"), ("backward", "_backward_kv_kernel", "kv"),
                               ("backward", "_backward_q_kernel", "q")):
        for head_dim in (64, 128):
            args = {"Q": torch.empty(0, dtype=torch.bfloat16), "BLOCK_E": head_dim, "BLOCK_EV": head_dim,
                    "L_BUCKET": 4096, "S_BUCKET": 4096}
            kept = attention._pruner(pruner)(attention._configs(kind, interpreter=False), args)
            for config in kept:
                common = dict(HAS_MASK=False, MASK_BOOL=False, IS_CAUSAL=False, HAS_DROPOUT=False, PRECISION="tf32",
                              DOT_FP32=False, ACC=tl.float32, BLOCK_E=head_dim, BLOCK_EV=head_dim, **config.kwargs)
                if name == "_backward_q_kernel":
                    common["MASK_GRAD"] = False
                inputs = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Mask": "*bf16", "Seed": "*i64", "Params": "*fp32"}
                if name == "_forward_kernel":
                    pointers = {**inputs, "Out": "*bf16", "Lse": "*fp32"}
                else:
                    grads = {**inputs, "GradOut": "*bf16", "Lse": "*fp32", "Delta": "*fp32"}
                    pointers = ({**grads, "GradK": "*fp32", "GradV": "*fp32"} if name == "_backward_kv_kernel"
                                else {**grads, "GradQ": "*fp32", "GradMask": "*fp32"})
                yield name, pointers, common, config.num_warps, config.num_stages


def with_every_int_one(fn, pointers: dict[str, str], constants: dict, floats=()) -> dict:
    """``constants`` plus every int argument equal to 1, as Triton's JIT specialises it on a GPU: an int
    argument equal to 1 becomes a constexpr (a size-1 axis, a unit stride), which breaks tensor-only
    operations on it (``.to()``) that the interpreter accepts."""
    ints = [name for name in fn.arg_names if name not in constants and name not in pointers and name not in floats]
    return {**constants, **dict.fromkeys(ints, 1)}


def sampling_cases(everything: bool):
    modes = (0, 1, 2) if everything else (0,)
    for dims, mode, affine in itertools.product((2, 3), modes, (False, True)):
        if dims == 3 and mode == 2:
            continue  # tricubic: interpreter only (see why_not)
        constants = dict(MODE=mode, PADDING=2, ALIGN_CORNERS=False, DIMS=dims, AFFINE=affine, ACC=tl.float32,
                         BLOCK_P=64, BLOCK_C=64, WIDE=affine)  # int64 offsets in some cases
        yield ("sample_forward_kernel", {"input_ptr": "*bf16", "coords_ptr": "*bf16", "out_ptr": "*bf16"},
               constants, 4, 3)
        yield ("sample_backward_kernel",
               {"grad_out_ptr": "*bf16", "input_ptr": "*bf16", "coords_ptr": "*bf16", "grad_input_ptr": "*fp32",
                "grad_coords_ptr": "*fp32" if affine else "*bf16"},
               dict(constants, NEED_INPUT=True, NEED_COORDS=True), 4, 3)
    # Every size and stride equal to 1 (Triton makes them constexprs), with the paddings that clip.
    for dims, padding, affine, align in itertools.product((2, 3), (1, 2), (False, True), (False, True)):
        if not everything and (dims, align) != (2, False) and (dims, padding, affine, align) != (3, 2, True, True):
            continue
        constants = dict(MODE=0, PADDING=padding, ALIGN_CORNERS=align, DIMS=dims, AFFINE=affine, ACC=tl.float32,
                         BLOCK_P=64, BLOCK_C=16, WIDE=False, SIZE_ONE=True)
        yield ("sample_forward_kernel", {"input_ptr": "*fp32", "coords_ptr": "*fp32", "out_ptr": "*fp32"},
               constants, 4, 3)
        yield ("sample_backward_kernel",
               {"grad_out_ptr": "*fp32", "input_ptr": "*fp32", "coords_ptr": "*fp32", "grad_input_ptr": "*fp32",
                "grad_coords_ptr": "*fp32"},
               dict(constants, NEED_INPUT=True, NEED_COORDS=True), 4, 3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="compile the Triton kernels for sm_90 without a GPU")
    parser.add_argument("--all", action="store_true", help="every dtype, flag combination and sampling mode")
    parser.add_argument("--configs", action="store_true",
                        help="also every attention autotune config the pruner keeps (bf16, head dims 64 and 128)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler", file=sys.stderr)
        return 2
    attention = importlib.import_module("attnkernels.triton.attention")
    sampler = importlib.import_module("attnkernels.triton._sampler")
    kernels = {
        "_forward_kernel": attention._forward_kernel.fn,  # the autotuner wraps the JIT function
        "_backward_kv_kernel": attention._backward_kv_kernel.fn,
        "_backward_q_kernel": attention._backward_q_kernel.fn,
        "_dropout_keep_kernel": attention._dropout_keep_kernel,
        "sample_forward_kernel": sampler.sample_forward_kernel,
        "sample_backward_kernel": sampler.sample_backward_kernel,
    }
    cases = [*attention_cases(args.all), *sampling_cases(args.all)]
    if args.configs:
        cases += list(autotune_config_cases())
    for name, pointers, constants, warps, stages in cases:
        start = time.perf_counter()
        size_one = constants.pop("SIZE_ONE", False)
        if size_one:
            constants = with_every_int_one(kernels[name], pointers, constants, floats=("dropout_p",))
        shared = compile_kernel(kernels[name], pointers, constants, floats=("dropout_p",), num_warps=warps,
                                num_stages=stages)
        flags = {k: v for k, v in constants.items() if k in ("HAS_MASK", "MASK_BOOL", "IS_CAUSAL", "HAS_DROPOUT",
                                                             "MODE", "PADDING", "DIMS", "AFFINE", "WIDE")}
        if size_one:
            flags["every int"] = 1
        if shared > MAX_SHARED_BYTES:
            print(f"{name} {constants}: needs {shared} B of shared memory, more than sm_90's {MAX_SHARED_BYTES}")
            return 1
        if "BLOCK_M" in constants:
            flags["tile"] = (constants["BLOCK_M"], constants["BLOCK_N"], warps, stages)
        print(f"{name} {pointers.get('Q', pointers.get('input_ptr'))} {flags}: ok, {shared} B shared, "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

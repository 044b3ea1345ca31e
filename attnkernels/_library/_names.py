"""The short name of a registered op (``grid_sample`` for attnkernels::grid_sample), for error messages."""

from __future__ import annotations


def op_name(op) -> str:
    """op: a torch OpOverload (the C++ ops) or a torch.library CustomOpDef (the Triton ops)."""
    qualified = op._qualname if hasattr(op, "_qualname") else op._schema.name
    return qualified.split("::", 1)[-1]

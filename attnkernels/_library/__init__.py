"""Fake (meta) kernels and autograd for the C++ operators, registered through torch.library.

Imported only when the extension is loaded: the schemas live in csrc/ops.cpp.
"""

from . import attention, sampling  # noqa: F401

"""Fake (meta) kernels and autograd, registered through torch.library once per op family.

``sampling`` and ``attention`` hold the rules (fake kernel, autograd, double backward) as
functions of a (forward op, backward op) pair; each backend with kernels calls them for its ops:
``compiled`` for the C++ ops (CPU and CUDA kernels, schemas in csrc/ops.cpp), the modules of
``attnkernels.triton`` for the Triton ops. Importing this package registers nothing.
"""

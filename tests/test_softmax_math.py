"""The softmax passes of the CPU attention kernels (csrc/cpu/attention_math.h: the vector exp with its row sum, and
the row maximum), unit-tested in C++ (tests/cpp/softmax_exp_test.cpp) against double precision, built with the
default, avx2 and avx512 variants' flags: a few units in the last place at most, -inf to exactly 0, NaN kept."""

from __future__ import annotations

import pytest
from cpp_unit import VARIANT_FLAGS, build_and_run, needs_gxx

FLAGS = {"default": [], **VARIANT_FLAGS}


@needs_gxx
@pytest.mark.parametrize("variant", sorted(FLAGS))
def test_softmax_exp_cpp_unit_test(tmp_path, variant):
    build_and_run("softmax_exp_test.cpp", tmp_path, FLAGS[variant])

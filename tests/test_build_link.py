"""The built extension uses the process's shared C++ library, never a static copy of its own.

A GCC installed with libstdc++.a but no libstdc++.so (the GPU machine's CXX=/opt/gcc/bin/g++) linked
its static copy into _C; with Ubuntu's -Bsymbolic-functions the extension then formatted numbers with
its own copy of the locale machinery, and the first error message holding an integer crashed (SIGSEGV).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

import attnkernels  # noqa: F401  (loads the extension where it was built)
from attnkernels import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libstdc++ linking is Linux's")


def _setup_module():
    spec = importlib.util.spec_from_file_location("attnkernels_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


def _fake_compiler(tmp_path, shared: bool):
    """A compiler that answers -print-file-name like a GCC with (or without) libstdc++.so."""
    static = tmp_path / "libstdc++.a"
    static.write_bytes(b"!<arch>\n")
    answers = {"libstdc++.a": str(static), "libstdc++.so": "libstdc++.so"}  # a bare name: not found
    if shared:
        answers["libstdc++.so"] = str(tmp_path / "libstdc++.so")
        (tmp_path / "libstdc++.so").write_bytes(b"")
    script = tmp_path / "g++"
    script.write_text("#!/bin/sh\ncase \"$1\" in\n" + "".join(
        f"  -print-file-name={name}) echo '{path}';;\n" for name, path in answers.items()) + "esac\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return [str(script)]


@linux_only
def test_a_compiler_with_only_the_static_library_links_the_loaded_shared_one(tmp_path):
    setup = _setup_module()
    loaded = setup._loaded_libstdcxx()
    assert loaded is not None and os.path.exists(loaded), "torch runs with a shared libstdc++"
    assert setup._shared_libstdcxx_args(_fake_compiler(tmp_path, shared=False)) == [loaded]


@linux_only
def test_a_compiler_with_the_shared_library_links_as_usual(tmp_path):
    setup = _setup_module()
    assert setup._shared_libstdcxx_args(_fake_compiler(tmp_path, shared=True)) == []
    assert setup._shared_libstdcxx_args(["/nonexistent/g++"]) == []


@linux_only
@pytest.mark.skipif(not _extension.has_extension(), reason="the extension is not built")
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_the_extension_defines_none_of_the_cpp_librarys_own_symbols():
    library = _extension._C.__file__
    symbols = subprocess.run(["nm", "-D", "--defined-only", library], capture_output=True, text=True,
                             check=True).stdout
    # std::locale::classic(), std::ios_base::Init::Init(): defined only in the C++ library itself.
    own = [name for name in ("_ZNSt6locale7classicEv", "_ZNSt8ios_base4InitC1Ev") if name in symbols]
    assert not own, f"{library} carries a static copy of libstdc++ ({own})"


@pytest.mark.skipif(not _extension.has_extension(), reason="the extension is not built")
def test_an_error_message_with_an_integer_reaches_python():
    x = torch.zeros((1, 1, 2, 2))
    grid = torch.zeros((1, 2, 2, 2))
    with pytest.raises(RuntimeError, match="got 5"):
        torch.ops.attnkernels.grid_sample(x, grid, 5, 0, False)

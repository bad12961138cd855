"""Build of the CPU custom calls (``resattn_jax/ops/cpu/csrc``) as part of ``pip install``.

Everything else about the package is in ``pyproject.toml``. The extension is a plain shared library
that :mod:`resattn_jax.ops.cpu.custom_calls` opens with ``ctypes`` and registers with XLA; it is
compiled against the XLA FFI headers that ship inside jaxlib. It is optional: without a C++
compiler the install still succeeds (with a warning) and the library uses XLA's own products.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "resattn_jax/ops/cpu/csrc"


class BuildNative(build_ext):
    """``build_ext`` with jaxlib's FFI headers on the include path (found at build time)."""

    def build_extensions(self):
        import jaxlib  # noqa: PLC0415 - a build requirement, not a run-time import of setup.py

        include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
        if not os.path.isfile(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
            raise RuntimeError(f"jaxlib at {os.path.dirname(include)} ships no XLA FFI headers")
        for extension in self.extensions:
            extension.include_dirs.append(include)
        super().build_extensions()


setup(
    ext_modules=[Extension(
        "resattn_jax.ops.cpu._native",
        sources=[f"{CSRC}/cpu_blas.cc", f"{CSRC}/bn_sums.cc"],
        depends=[f"{CSRC}/parallel_for.h"],
        # The flags the custom calls were measured with (docs/benchmarks.md): Python's own CFLAGS,
        # which setuptools puts first, add -fwrapv (signed overflow defined, fewer loop
        # optimisations) and -g; these switch both off again.
        extra_compile_args=["-O3", "-std=c++17", "-w", "-fno-wrapv", "-g0"],
        libraries=["dl"],
        language="c++",
        optional=True,
    )],
    cmdclass={"build_ext": BuildNative},
)

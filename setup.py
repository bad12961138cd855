"""Build of the CPU custom calls (``resattn_jax/ops/cpu/csrc``) as part of ``pip install``.

Everything else about the package is in ``pyproject.toml``. The extension is a plain shared library
that :mod:`resattn_jax.ops.cpu.custom_calls` opens with ``ctypes`` and registers with XLA; it is
compiled against the XLA FFI headers that ship inside jaxlib. It is optional: without a C++
compiler the install still succeeds (with a warning) and the library uses XLA's own products.

Next to each built library goes its build record, ``<library file name>.sha256``: the JSON object
``{"sha256": "<hex digest of the library>", "size": <bytes>}``, which
:func:`resattn_jax.ops.cpu.custom_calls.verify_native` checks before the library is opened (a
truncated or damaged library is then skipped instead of crashing the process with SIGBUS). The
record, and the copy of the library into the source tree of an editable install, are written to a
temporary file in the same directory, fsynced and renamed into place (then the directory is
fsynced), so that a crash or a full disk leaves the old file or the new one, never part of one.
"""

import hashlib
import json
import os
import shutil
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "resattn_jax/ops/cpu/csrc"
RECORD_SUFFIX = ".sha256"  # the build record of a library: <library file name>.sha256


def _atomic_write(path: str, write, mode: int = 0o644) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, rename it to ``path``
    and fsync the directory: ``path`` is then the old file or the complete new one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # (mkstemp makes it 0o600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_record(library: str) -> None:
    """Write ``<library>.sha256``: ``{"sha256": hex digest, "size": bytes}`` of ``library``."""
    digest, size = hashlib.sha256(), 0
    with open(library, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    record = json.dumps({"sha256": digest.hexdigest(), "size": size}).encode() + b"\n"
    _atomic_write(library + RECORD_SUFFIX, lambda f: f.write(record))


class BuildNative(build_ext):
    """``build_ext`` with jaxlib's FFI headers on the include path (found at build time), which
    writes each built library's build record next to it, and copies the libraries of an editable
    install into the source tree atomically, each with its record."""

    def build_extensions(self):
        import jaxlib  # noqa: PLC0415 - a build requirement, not a run-time import of setup.py

        include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
        if not os.path.isfile(os.path.join(include, "xla", "ffi", "api", "ffi.h")):
            raise RuntimeError(f"jaxlib at {os.path.dirname(include)} ships no XLA FFI headers")
        for extension in self.extensions:
            extension.include_dirs.append(include)
        super().build_extensions()
        # (build_ext.run builds into build_lib even for an editable install; copy_extensions_to_source
        # below then copies the libraries into the source tree.)
        for extension in self.extensions:
            library = self.get_ext_fullpath(extension.name)
            if os.path.isfile(library):  # an optional extension that failed to build has none
                _write_record(library)

    def copy_extensions_to_source(self):
        # setuptools' own copy writes over the library in place, which truncates the file that running
        # processes have mapped (SIGBUS there) and leaves a partial file if interrupted.
        for extension in self.extensions:
            built = os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(extension.name)))
            if not os.path.isfile(built) and extension.optional:
                continue
            target = self.get_ext_fullpath(extension.name)  # self.inplace is set again here
            with open(built, "rb") as source:
                _atomic_write(target, lambda f: shutil.copyfileobj(source, f, 1 << 20),
                              mode=os.stat(source.fileno()).st_mode & 0o777)
            _write_record(target)


setup(
    ext_modules=[Extension(
        "resattn_jax.ops.cpu._native",
        sources=[f"{CSRC}/cpu_blas.cc", f"{CSRC}/bn_sums.cc", f"{CSRC}/wgrad.cc", f"{CSRC}/resample.cc", f"{CSRC}/conv1x1.cc", f"{CSRC}/conv3x3.cc"],
        depends=[f"{CSRC}/parallel_for.h", f"{CSRC}/wgrad.h", f"{CSRC}/wgrad_kernels.inc"],
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

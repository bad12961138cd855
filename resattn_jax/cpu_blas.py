"""CPU custom calls (XLA FFI, float32): matrix products through OpenBLAS, and batch norm's sums.

XLA:CPU runs two kinds of products of this network at half the speed the CPU allows
(docs/benchmarks.md): the weight gradient of a 1x1 convolution, ``x^T dy`` contracted over the
batch and spatial axes (``[N*H*W, C_in]^T [N*H*W, C_out]``, 95-160 GFLOP/s against OpenBLAS's
160-250 on the same 2 cores), and the 16 or 36 batched small products of a Winograd convolution.
:func:`matmul_tn` and :func:`batched_matmul` compute them with single-threaded OpenBLAS ``sgemm``
calls spread over XLA's own intra-op threads (``csrc/cpu_blas.cc``), so they add no threads.
:func:`bn_sums` and :func:`bn_grad_sums` (``csrc/bn_sums.cc``) give batch norm its two
per-channel sums in one pass over the activation each, where XLA's reduction kernels read it
once per sum (train step 1.10x on Attention-56).

The custom calls exist only on CPU and in float32: callers pick them through
``lax.platform_dependent`` (or from code that already runs only on CPU), so GPU and TPU programs
never contain them. The C++ source is compiled on first use with the system's C++ compiler
(``$CXX`` or ``c++``) against the FFI headers of the installed jaxlib, into
``$RESATTN_JAX_CACHE`` (default ``~/.cache/resattn_jax``); the BLAS is the ``scipy-openblas64``
package. Where either is missing, :func:`available` is ``False`` (with one warning saying why) and
every caller uses XLA's own product instead. ``RESATTN_JAX_CPU_BLAS=0`` (or
``RESATTN_JAX_XLA_DEFAULTS=1``) turns the custom calls off; :func:`disabled` does it for one
trace, e.g. for portable exports.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

__all__ = ["available", "disabled", "dispatch", "matmul_tn", "batched_matmul", "sum_like", "bn_sums", "bn_grad_sums",
           "bn_sums_xla", "bn_grad_sums_xla"]

_SOURCES = Path(__file__).with_name("csrc")
_TARGETS = {"resattn_matmul_tn": "ResattnMatmulTn", "resattn_batched_matmul": "ResattnBatchedMatmul",
            "resattn_bn_sums": "ResattnBnSums", "resattn_bn_grad_sums": "ResattnBnGradSums"}
_state = threading.local()


def _cache_dir() -> Path:
    return Path(os.environ.get("RESATTN_JAX_CACHE", Path.home() / ".cache" / "resattn_jax"))


def _openblas() -> tuple[str, str, str]:
    """``(library path, sgemm symbol, set-threads symbol)`` of the scipy-openblas64 package."""
    import scipy_openblas64  # noqa: PLC0415 - optional until first use

    name = scipy_openblas64.get_library()  # e.g. 'scipy_openblas64_'
    path = Path(scipy_openblas64.get_lib_dir()) / f"lib{name}.so"
    if not path.exists():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    return str(path), "scipy_cblas_sgemm64_", "scipy_openblas_set_num_threads64_"


def _compile() -> Path:
    """The compiled custom calls, built once per source, jaxlib and compiler into the cache."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    sources = sorted(_SOURCES.glob("*.cc"))
    digest = hashlib.sha256(jax.lib.__version__.encode() + compiler.encode())
    for path in sorted(_SOURCES.glob("*.[ch]*")):
        digest.update(path.name.encode() + path.read_bytes())
    key = digest.hexdigest()[:16]
    target = _cache_dir() / f"cpu_blas-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
               *map(str, sources), "-o", str(built), "-ldl"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(built, target)  # atomic: concurrent first uses never load a half-written file
    return target


def _switched_off() -> bool:
    return os.environ.get("RESATTN_JAX_CPU_BLAS") == "0" or os.environ.get("RESATTN_JAX_XLA_DEFAULTS") == "1"


@functools.cache
def _load() -> bool:
    if _switched_off():
        return False
    try:
        blas_path, sgemm_symbol, threads_symbol = _openblas()
        library = ctypes.CDLL(str(_compile()))
        status = library.resattn_cpu_blas_load(blas_path.encode(), sgemm_symbol.encode())
        if status != 0:
            raise RuntimeError(f"could not load {sgemm_symbol} from {blas_path} (status {status})")
        # One thread per call: the custom calls spread their work over XLA's threads themselves.
        getattr(ctypes.CDLL(blas_path), threads_symbol)(1)
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means "use XLA's products"
        warnings.warn(f"resattn_jax: OpenBLAS custom calls unavailable, using XLA's CPU products ({e})",
                      RuntimeWarning, stacklevel=3)
        return False
    return True


def available() -> bool:
    """Whether the custom calls can be used for what is traced now (built, loaded, not switched off)."""
    return not getattr(_state, "disabled", False) and _load()


def dispatch(native, xla, *operands):
    """``native(*operands)`` on CPU where the custom calls can run (float32 operands, built, not
    switched off), else ``xla(*operands)``; the backend is resolved by ``lax.platform_dependent``
    when the program is lowered, so other backends compile ``xla`` only."""
    if any(x.dtype != jnp.float32 for x in operands) or not available():
        return xla(*operands)
    return jax.lax.platform_dependent(*operands, cpu=native, default=xla)


@contextlib.contextmanager
def disabled():
    """Trace with XLA's own products only (this thread), e.g. for programs exported elsewhere.

    It changes what is traced inside the block; a function that ``jax.jit`` already traced with the
    same arguments keeps its program, so export fresh functions (as :mod:`resattn_jax.export` does).
    """
    previous = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = previous


def _varying_axes(*operands) -> tuple[str, ...]:
    """Mesh axes along which any operand varies (inside ``shard_map``), for the custom call's result."""
    axes = set()
    for x in operands:
        aval = jax.typeof(x)
        mat = getattr(aval, "mat", None)
        axes |= set(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())
    return tuple(sorted(axes))


def sum_like(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """``cotangent`` summed (``psum``) over the ``shard_map`` axes it varies along and ``primal`` does
    not: the cotangent of a replicated input in a custom VJP (what autodiff does implicitly)."""
    axes = tuple(sorted(set(_varying_axes(cotangent)) - set(_varying_axes(primal))))
    return jax.lax.psum(cotangent, axes) if axes else cotangent


def _call(target: str, shape: tuple[int, ...], *operands, **attributes) -> jax.Array:
    # Under jax.vmap (e.g. a vmapped per-device step) each mapped slice is its own call.
    out = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")(
        *operands, **attributes)
    axes = _varying_axes(*operands)
    return jax.lax.pcast(out, axes, to="varying") if axes else out


# The custom calls are differentiable in reverse mode (to any order): their VJPs are XLA products.
@jax.custom_vjp
def matmul_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a^T b``: ``[M, K] x [M, N] -> [K, N]`` float32, on CPU only (no platform check here)."""
    return _call("resattn_matmul_tn", (a.shape[1], b.shape[1]), a, b)


def _matmul_tn_bwd(residuals, g):
    a, b = residuals                     # d(a^T b) = da^T b + a^T db, g: [K, N]
    return sum_like(b @ g.T, a), sum_like(a @ g, b)


matmul_tn.defvjp(lambda a, b: (matmul_tn(a, b), (a, b)), _matmul_tn_bwd)


@jax.custom_vjp
def batched_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a[i] @ b[i]``: ``[B, T, K] x [B, K, N] -> [B, T, N]`` float32, on CPU only (no platform check here)."""
    return _call("resattn_batched_matmul", (a.shape[0], a.shape[1], b.shape[2]), a, b)


def _batched_matmul_bwd(residuals, g):
    a, b = residuals                     # g: [B, T, N]
    return sum_like(jnp.einsum("btn,bkn->btk", g, b), a), sum_like(jnp.einsum("btk,btn->bkn", a, g), b)


batched_matmul.defvjp(lambda a, b: (batched_matmul(a, b), (a, b)), _batched_matmul_bwd)


# Batch norm's per-channel sums in one pass each (csrc/bn_sums.cc); reverse-mode derivatives are
# those of the XLA formulations, which any backend can use instead.
def bn_sums_xla(x: jax.Array) -> jax.Array:
    """:func:`bn_sums` in XLA."""
    return jnp.stack([jnp.sum(x, 0), jnp.sum(jnp.square(x), 0)])


def bn_grad_sums_xla(dy, x, mean, mul, bias, relu: bool) -> jax.Array:
    """:func:`bn_grad_sums` in XLA."""
    centred = x - mean
    if relu:
        # sign(relu(z)) is the ReLU's derivative (0 or 1) as arithmetic, which XLA's reduction
        # kernels fuse.
        dy = dy * jnp.sign(jnp.maximum(centred * mul + bias, 0.0))
    return jnp.stack([jnp.sum(dy, 0), jnp.sum(dy * centred, 0)])


@jax.custom_vjp
def bn_sums(x: jax.Array) -> jax.Array:
    """``[sum(x), sum(x^2)]`` over rows: ``[M, C] -> [2, C]`` float32, on CPU only."""
    return _call("resattn_bn_sums", (2, x.shape[1]), x)


bn_sums.defvjp(lambda x: (bn_sums(x), x), lambda x, g: jax.vjp(bn_sums_xla, x)[1](g))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def bn_grad_sums(dy, x, mean, mul, bias, relu: bool) -> jax.Array:
    """``[sum(dz), sum(dz * (x - mean))]`` over rows with ``dz = dy * [(x - mean) * mul + bias > 0]``
    (``relu``) or ``dy``: ``dy, x [M, C]``, ``mean, mul, bias [C]`` -> ``[2, C]`` float32, on CPU only."""
    return _call("resattn_bn_grad_sums", (2, x.shape[1]), dy, x, mean, mul, bias, relu=bool(relu))


def _bn_grad_sums_bwd(relu, primals, g):
    return jax.vjp(lambda *p: bn_grad_sums_xla(*p, relu), *primals)[1](g)


bn_grad_sums.defvjp(lambda dy, x, mean, mul, bias, relu: (bn_grad_sums(dy, x, mean, mul, bias, relu),
                                                          (dy, x, mean, mul, bias)), _bn_grad_sums_bwd)

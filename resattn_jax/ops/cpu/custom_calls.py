"""CPU custom calls (XLA FFI, float32): matrix products through OpenBLAS, and batch norm's sums.

XLA:CPU runs some products of this network at a fraction of the speed the CPU allows
(docs/benchmarks.md): the weight gradients of 1x1 and 3x3 convolutions, contracted over the batch
and spatial axes (``[N*H*W, C_in]^T [N*H*W, C_out]``: 40-220 GFLOP/s in XLA, 106-318 in OpenBLAS,
which packs both operands on every call), and the 16 or 36 batched small products of a Winograd
convolution. :func:`matmul_tn` (1x1) and :func:`wgrad3x3` compute the weight gradients with this
package's register-blocked kernels (``csrc/wgrad.cc``, no packing or transposed copies; OpenBLAS
for :func:`matmul_tn` where ``C_out`` is not a multiple of 8), :func:`batched_matmul` with
single-threaded OpenBLAS ``sgemm`` calls; all spread their work over XLA's own intra-op threads
(``csrc/cpu_blas.cc``), so they add no threads. :func:`max_pool_grad`, :func:`upsample` and
:func:`upsample_grad` (``csrc/resample.cc``) are the soft mask's resampling, where XLA:CPU
recomputes fused producers at every shifted read or gathers through transposed copies.
:func:`bn_sums` and :func:`bn_grad_sums` (``csrc/bn_sums.cc``) give batch norm its two
per-channel sums in one pass over the activation each, where XLA's reduction kernels read it
once per sum (train step 1.10x on Attention-56).

The C++ is compiled when the package is installed (``setup.py``: the extension
``resattn_jax.ops.cpu._native``, built against the FFI headers of the installed jaxlib); nothing
is compiled or written at run time. The build writes a record next to the library,
``<library file name>.sha256`` (JSON: ``{"sha256": hex digest, "size": bytes}``), and
:func:`verify_native` checks the library against it (size, then SHA-256) before it is opened: a
truncated or damaged library would otherwise crash the process (SIGBUS) when it is mapped. The BLAS
is the ``scipy-openblas64`` package, opened on first use. Where the library is missing or fails its
check, or the BLAS is missing, :func:`load` returns ``False`` (with one warning saying why) and
:mod:`resattn_jax.ops.backend`, the only caller, uses XLA's own products instead. The custom calls
exist only on CPU and in float32, and nothing here checks the platform: the backend module
decides when to call them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from resattn_jax.ops.varying import sum_like, varying_axes

__all__ = ["TARGETS", "load", "native_library", "verify_native", "matmul_tn", "batched_matmul", "bn_sums",
           "bn_grad_sums", "bn_sums_xla", "bn_grad_sums_xla", "wgrad3x3", "wgrad3x3_xla", "WGRAD_MULTIPLE", "max_pool_grad", "upsample", "upsample_grad",
           "conv1x1", "conv1x1_xla", "conv1x1_grad", "conv1x1_grad_xla",
           "conv3x3", "conv3x3_xla", "CONV3X3_MULTIPLE"]

_TARGETS = {"resattn_matmul_tn": "ResattnMatmulTn", "resattn_batched_matmul": "ResattnBatchedMatmul",
            "resattn_bn_sums": "ResattnBnSums", "resattn_bn_grad_sums": "ResattnBnGradSums",
            "resattn_wgrad3x3": "ResattnWgrad3x3", "resattn_max_pool_grad": "ResattnMaxPoolGrad",
            "resattn_upsample": "ResattnUpsample", "resattn_upsample_grad": "ResattnUpsampleGrad",
            "resattn_conv1x1": "ResattnConv1x1", "resattn_conv1x1_grad": "ResattnConv1x1Grad",
            "resattn_conv3x3": "ResattnConv3x3"}
#: The custom-call targets this module registers (tests look for them in lowered programs).
TARGETS = tuple(_TARGETS)


def _openblas() -> tuple[str, str, str]:
    """``(library path, sgemm symbol, set-threads symbol)`` of the scipy-openblas64 package."""
    import scipy_openblas64  # noqa: PLC0415 - optional until first use

    name = scipy_openblas64.get_library()  # e.g. 'scipy_openblas64_'
    path = Path(scipy_openblas64.get_lib_dir()) / f"lib{name}.so"
    if not path.exists():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    return str(path), "scipy_cblas_sgemm64_", "scipy_openblas_set_num_threads64_"


def native_library() -> Path:
    """Path of the extension built at install time (``FileNotFoundError`` when it was not built)."""
    spec = importlib.util.find_spec(f"{__package__}._native")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the extension {__package__}._native was not built at install time "
                                "(reinstall with a C++ compiler: pip install -e .)")
    return Path(spec.origin)


def verify_native(path: Path) -> None:
    """Check the library at ``path`` against its build record ``<path>.sha256`` (written by
    ``setup.py``): its size, then its SHA-256. ``RuntimeError`` when the record is missing or
    unreadable or the library does not match it."""
    path = Path(path)
    record = path.with_name(path.name + ".sha256")
    fix = "reinstall with pip install -e ."
    try:
        expected = json.loads(record.read_text())
        size, sha256 = int(expected["size"]), str(expected["sha256"])
    except FileNotFoundError:
        raise RuntimeError(f"{path} has no build record {record}: cannot check it; {fix}") from None
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise RuntimeError(f"the build record {record} of {path} is unreadable ({e!r}); {fix}") from None
    actual = path.stat().st_size
    if actual != size:
        raise RuntimeError(f"{path} does not match its build record {record} (size {actual} != {size}): "
                           f"the file is damaged; {fix}")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise RuntimeError(f"{path} does not match its build record {record} (sha256 {digest.hexdigest()} != "
                           f"{sha256}): the file is damaged; {fix}")


@functools.cache
def load() -> bool:
    """Load the extension (checked by :func:`verify_native`) and OpenBLAS and register the custom
    calls, once per process; ``False`` (with one warning) when either is missing or the extension
    fails its check."""
    try:
        blas_path, sgemm_symbol, threads_symbol = _openblas()
        path = native_library()
        verify_native(path)  # before mapping it: a truncated library crashes the process
        library = ctypes.CDLL(str(path))
        status = library.resattn_cpu_blas_load(blas_path.encode(), sgemm_symbol.encode())
        if status != 0:
            raise RuntimeError(f"could not load {sgemm_symbol} from {blas_path} (status {status})")
        # One thread per call: the custom calls spread their work over XLA's threads themselves.
        getattr(ctypes.CDLL(blas_path), threads_symbol)(1)
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means "use XLA's products"
        warnings.warn(f"resattn_jax: CPU custom calls unavailable, using XLA's CPU products ({e})",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def _call(target: str, shape, *operands, **attributes):
    """The float32 result of shape ``shape`` (a tuple of ints, or a list of them for several results)."""
    many = isinstance(shape, list)
    results = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shape] if many else jax.ShapeDtypeStruct(shape, jnp.float32)
    # Under jax.vmap (e.g. a vmapped per-device step) each mapped slice is its own call.
    out = jax.ffi.ffi_call(target, results, vmap_method="sequential")(*operands, **attributes)
    axes = varying_axes(*operands)
    if not axes:
        return out
    return [jax.lax.pcast(o, axes, to="varying") for o in out] if many else jax.lax.pcast(out, axes, to="varying")


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


#: The weight-gradient kernels (``csrc/wgrad.cc``) need the output channels to be a multiple of this.
WGRAD_MULTIPLE = 8


def wgrad3x3_xla(x: jax.Array, dy: jax.Array, stride: int = 1) -> jax.Array:
    """:func:`wgrad3x3` in XLA: the padding-1 correlation of ``x`` with ``dy`` (dilated by the stride)
    over the batch and spatial axes (what autodiff of the convolution in its kernel computes; written
    out, its result varies over the same ``shard_map`` axes as the operands, like the custom call's)."""
    high = [stride * (o - 1) + 2 - i for i, o in zip(x.shape[1:3], dy.shape[1:3])]
    return jax.lax.conv_general_dilated(x, dy, (1, 1), ((1, high[0]), (1, high[1])), rhs_dilation=(stride, stride),
                                        dimension_numbers=("CHWN", "IHWO", "HWNC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def wgrad3x3(x: jax.Array, dy: jax.Array, stride: int = 1) -> jax.Array:
    """The kernel gradient of a padding-1 3x3 convolution with ``stride``: ``x [N, H, W, K]``,
    ``dy [N, Ho, Wo, C]`` -> ``[3, 3, K, C]``, ``sum over n, h, w of x[n, s h + i - 1, s w + j - 1]^T
    dy[n, h, w]``; float32, ``C`` a multiple of :data:`WGRAD_MULTIPLE`, on CPU only."""
    return _call("resattn_wgrad3x3", (3, 3, x.shape[-1], dy.shape[-1]), x, dy, stride=np.int64(stride))


wgrad3x3.defvjp(lambda x, dy, stride: (wgrad3x3(x, dy, stride), (x, dy)),
                lambda stride, res, g: jax.vjp(functools.partial(wgrad3x3_xla, stride=stride), *res)[1](g))


# The soft mask's resampling (csrc/resample.cc), NHWC float32. Derivatives to any order: the pool
# gradient is linear in ``grad`` (its transpose gathers at the first maxima, in XLA below), the
# up-sampling and its gradient are each other's transposes.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def max_pool_grad(first: jax.Array, grad: jax.Array, geometry: tuple[int, int, int, int]) -> jax.Array:
    """Gradient of a 3x3 / stride-2 max-pool: ``first`` (int8, ``3a + b`` of each window's first maximum)
    and ``grad`` ``[N, Ho, Wo, C]`` -> ``[N, h, w, C]``, with ``geometry = (h, w, pad_h, pad_w)`` (input
    size and top/left padding); output ``(i, j)``'s gradient goes to input ``(2i + a - pad_h, 2j + b - pad_w)``."""
    h, w, pad_h, pad_w = geometry
    return _call("resattn_max_pool_grad", (grad.shape[0], h, w, grad.shape[3]), first, grad, h=np.int64(h),
                 w=np.int64(w), pad_h=np.int64(pad_h), pad_w=np.int64(pad_w))


def _max_pool_grad_bwd(geometry, residuals, g):
    first, _ = residuals                 # g: [N, h, w, C]; each output reads g at its first maximum
    h, w, pad_h, pad_w = geometry
    ho, wo = first.shape[1:3]
    padded = jnp.pad(g, ((0, 0), (pad_h, 2 * ho + 1 - h - pad_h), (pad_w, 2 * wo + 1 - w - pad_w), (0, 0)))
    out = jnp.zeros(first.shape, g.dtype)
    for k in range(9):
        a, b = divmod(k, 3)
        out = jnp.where(first == k, padded[:, a:a + 2 * ho:2, b:b + 2 * wo:2], out)
    return None, out


max_pool_grad.defvjp(lambda first, grad, geometry: (max_pool_grad(first, grad, geometry), (first, grad)),
                     _max_pool_grad_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def upsample(x: jax.Array, sizes: tuple[int, int, int, int]) -> jax.Array:
    """Bilinear up-sampling (align_corners=True) of ``x [N, h, w, C]`` to ``[N, ho, wo, C]``,
    ``sizes = (h, w, ho, wo)``."""
    ho, wo = sizes[2:]
    return _call("resattn_upsample", (x.shape[0], ho, wo, x.shape[3]), x, ho=np.int64(ho), wo=np.int64(wo))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def upsample_grad(g: jax.Array, sizes: tuple[int, int, int, int]) -> jax.Array:
    """The transpose of :func:`upsample` (its gradient): ``g [N, ho, wo, C]`` -> ``[N, h, w, C]``."""
    h, w = sizes[:2]
    return _call("resattn_upsample_grad", (g.shape[0], h, w, g.shape[3]), g, h=np.int64(h), w=np.int64(w))


upsample.defvjp(lambda x, sizes: (upsample(x, sizes), None), lambda sizes, _, g: (upsample_grad(g, sizes),))
upsample_grad.defvjp(lambda g, sizes: (upsample_grad(g, sizes), None), lambda sizes, _, x: (upsample(x, sizes),))


# A batch norm (+ ReLU) fused into the 1x1 convolution that reads it (csrc/conv1x1.cc). The caller
# (resattn_jax.ops.backend.conv1x1_normalized) defines the derivatives with conv1x1_grad, whose own
# derivatives are XLA's.
def conv1x1(x, center, mul, bias, w, residual, relu: bool) -> jax.Array:
    """``relu?((x - center) * mul + bias) @ w (+ residual)``: ``x [M, K]``, ``center, mul, bias [K]``,
    ``w [K, N]``, ``residual [M, N]`` or None; ``K`` and ``N`` multiples of 8; float32, CPU only."""
    if residual is None:
        residual = jnp.zeros((0, w.shape[1]), jnp.float32)
    return _call("resattn_conv1x1", (x.shape[0], w.shape[1]), x, center, mul, bias, w, residual, relu=bool(relu))


def conv1x1_xla(x, center, mul, bias, w, residual, relu: bool) -> jax.Array:
    """:func:`conv1x1` in XLA."""
    a = (x - center) * mul + bias
    y = (jnp.maximum(a, 0.0) if relu else a) @ w
    return y if residual is None else y + residual


def conv1x1_grad_xla(x, center, mul, bias, w, dy, relu: bool):
    """:func:`conv1x1_grad` in XLA."""
    a = (x - center) * mul + bias
    dz = dy @ w.T
    if relu:
        a = jnp.maximum(a, 0.0)
        dz = jnp.where(a > 0, dz, 0.0)
    return dz, jnp.stack([jnp.sum(dz, 0), jnp.sum(dz * (x - center), 0)]), a.T @ dy


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def conv1x1_grad(x, center, mul, bias, w, dy, relu: bool):
    """``(dz [M, K], sums [2, K], dw [K, N])`` for :func:`conv1x1`'s cotangent ``dy [M, N]``: with
    ``a = relu?((x - center) * mul + bias)``, ``dz = (dy @ w^T) * [a > 0]`` (ReLU) or ``dy @ w^T``,
    ``sums = (sum dz, sum dz * (x - center))`` over rows and ``dw = a^T dy``."""
    k, n = w.shape
    return tuple(_call("resattn_conv1x1_grad", [(x.shape[0], k), (2, k), (k, n)], x, center, mul, bias, w, dy,
                       relu=bool(relu)))


conv1x1_grad.defvjp(lambda *args: (conv1x1_grad(*args), args[:6]),
                    lambda relu, primals, g: jax.vjp(lambda *p: conv1x1_grad_xla(*p, relu), *primals)[1](g))


#: The direct 3x3 kernel (``csrc/conv3x3.cc``) needs the output channels to be a multiple of this.
CONV3X3_MULTIPLE = 8


def conv3x3_xla(x, kernel, center=None, mul=None, bias=None, relu: bool = False):
    """:func:`conv3x3` in XLA."""
    if center is not None:
        z = (x - center) * mul + bias
        x = jnp.maximum(z, 0.0) if relu else z
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def conv3x3(x, kernel, center=None, mul=None, bias=None, relu: bool = False) -> jax.Array:
    """A stride-1, padding-1 3x3 convolution ``x [N, H, W, K] x kernel [3, 3, K, C] -> [N, H, W, C]`` of
    ``x`` or, with ``center, mul, bias [K]``, of ``relu?((x - center) * mul + bias)``; ``C`` a multiple
    of :data:`CONV3X3_MULTIPLE`; float32, CPU only. Derivatives: XLA's (``conv3x3``'s own VJP in
    :mod:`resattn_jax.ops.conv` calls this for the forward and the input gradient)."""
    empty = jnp.zeros((0,), jnp.float32)
    affine = (empty, empty, empty) if center is None else (center, mul, bias)
    return _call("resattn_conv3x3", (*x.shape[:3], kernel.shape[3]), x, *affine, kernel, relu=bool(relu))


conv3x3.defvjp(lambda *args: (conv3x3(*args), args[:5]),
               lambda relu, primals, g: jax.vjp(lambda *p: conv3x3_xla(*p, relu=relu), *primals)[1](g))


# Batch norm's per-channel sums in one pass each (csrc/bn_sums.cc); reverse-mode derivatives are
# those of the XLA formulations, which any backend can use instead.
def bn_sums_xla(x: jax.Array) -> jax.Array:
    """:func:`bn_sums` in XLA."""
    d = x - x[:1]
    return jnp.stack([jnp.sum(d, 0), jnp.sum(jnp.square(d), 0)])


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
    """``[sum(d), sum(d^2)]`` over rows, ``d = x - x[0]`` (shifted by the first row, so that a variance
    from them keeps its precision when ``|mean| >> std``): ``[M, C] -> [2, C]`` float32, on CPU only."""
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

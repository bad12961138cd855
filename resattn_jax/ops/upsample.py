"""The top-down bilinear ``Interp`` layer of the soft mask branch (docs/paper-facts.md §1).

``align_corners=True`` semantics, to an explicitly given output size (the size of the matching
down-path map, never computed from a scale factor).

Implementation: separable, ``out = A_h @ x @ A_w^T`` with the small interpolation matrices built in
NumPy at trace time (all shapes are static). Each product is applied as two weighted gathers along
its axis (a row of ``A`` has two non-zeros), and a custom VJP applies ``A^T`` the same way.
Measured against dense interpolation matrices, autodiff'd gathers and
``jax.image.scale_and_translate`` with ``python -m resattn_jax.bench_upsample`` (figures in
``docs/benchmarks.md``): on CPU it is 20x faster than the matrix products in both directions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from resattn_jax.ops import backend

__all__ = ["interpolation_matrix", "upsample_bilinear"]


@functools.lru_cache(maxsize=256)
def interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Linear interpolation matrix ``A`` of shape ``[size_out, size_in]`` (align_corners=True).

    Output pixel ``o`` samples source coordinate ``o * (size_in - 1) / (size_out - 1)``; the two
    neighbouring source pixels get weights ``1 - frac`` and ``frac``. Each row sums to 1. With
    ``size_out == 1`` the single output samples source pixel 0 (PyTorch's convention).
    """
    if size_in < 1 or size_out < 1:
        raise ValueError(f"interpolation sizes must be positive, got {size_in} -> {size_out}")
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    src = np.arange(size_out, dtype=np.float64) * scale
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    a = np.zeros((size_out, size_in), dtype=np.float64)
    rows = np.arange(size_out)
    np.add.at(a, (rows, lo), 1.0 - frac)
    np.add.at(a, (rows, hi), frac)
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=256)
def _sparse_rows(size_in: int, size_out: int, transposed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Non-zeros of ``A`` (or ``A^T``) row by row: indices and weights ``[rows, K]`` (zero-padded).

    ``A = interpolation_matrix(size_in, size_out)`` has 2 non-zeros per row; its transpose has
    at most ``ceil((size_out - 1) / (size_in - 1)) + 1`` per row.
    """
    a = interpolation_matrix(size_in, size_out)
    a = a.T if transposed else a
    k = max(1, int((a != 0).sum(axis=1).max()))
    index = np.zeros((a.shape[0], k), np.int32)
    weight = np.zeros((a.shape[0], k), np.float32)
    for row in range(a.shape[0]):
        cols = np.flatnonzero(a[row])
        index[row, : len(cols)] = cols
        weight[row, : len(cols)] = a[row, cols]
    return index, weight


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _interpolate_axis(x: jax.Array, axis: int, spec: tuple[int, int, bool]) -> jax.Array:
    """Multiply ``x`` along ``axis`` by ``A`` (``spec = (size_in, size_out, transposed)``) via gathers."""
    index, weight = _sparse_rows(*spec)
    shape = [1] * x.ndim
    shape[axis] = index.shape[0]
    out = None
    for k in range(index.shape[1]):
        term = jnp.take(x, index[:, k], axis=axis) * jnp.asarray(weight[:, k], x.dtype).reshape(shape)
        out = term if out is None else out + term
    return out


def _interpolate_axis_fwd(x, axis, spec):
    return _interpolate_axis(x, axis, spec), None


def _interpolate_axis_bwd(axis, spec, _, grad):
    # The adjoint of a multiplication by A is a multiplication by A^T, again a few gathers
    # (autodiff would emit a scatter-add, 20x slower on CPU).
    size_in, size_out, transposed = spec
    return (_interpolate_axis(grad, axis, (size_in, size_out, not transposed)),)


_interpolate_axis.defvjp(_interpolate_axis_fwd, _interpolate_axis_bwd)


def upsample_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear up-sampling with ``align_corners=True`` to an exact output size.

    Implements Caffe's ``Interp`` layer as used in the soft mask branch: the output size is
    given by the matching down-path map, never computed from a scale factor. Separable: rows,
    then columns, each ``A @ x`` along its axis with ``A = interpolation_matrix(...)``, computed
    as two weighted gathers; the backward pass applies ``A^T`` the same way (on CPU in float32 both
    directions are one C++ pass each, :func:`resattn_jax.ops.backend.upsample_bilinear`). Reverse-mode
    differentiation works to any order; forward mode (``jax.jvp``) is not available through the
    custom VJP.

    Args:
      x: ``[N, H_in, W_in, C]``.
      size: ``(H_out, W_out)``.
    Returns:
      ``[N, H_out, W_out, C]`` in ``x.dtype``.
    """
    h_out, w_out = int(size[0]), int(size[1])
    _, h_in, w_in, _ = x.shape
    if (h_in, w_in) == (h_out, w_out):
        return x

    def separable(x):
        x = _interpolate_axis(x, 1, (h_in, h_out, False))
        return _interpolate_axis(x, 2, (w_in, w_out, False))

    with jax.named_scope("bilinear_upsample"):
        return backend.upsample_bilinear(x, (h_out, w_out), separable)

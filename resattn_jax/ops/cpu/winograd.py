"""3x3 stride-1 convolution with Winograd's minimal filtering on CPU (Lavin & Gray, 2016).

:func:`conv3x3_winograd` computes what the direct convolution
``lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)))`` computes (equal up to float32 rounding),
``[N, H, W, C_in] x [3, 3, C_in, C_out] -> [N, H, W, C_out]``. Only
:mod:`resattn_jax.ops.backend` calls it, for :func:`resattn_jax.ops.conv.conv3x3`:

* On CPU, in float32, on feature maps large enough to pay for the transforms, it runs
  Winograd ``F(m x m, 3 x 3)``: every ``(m + 2) x (m + 2)`` input tile (stride ``m``) is transformed
  by ``B^T d B``, the kernel by ``G g G^T``, the ``(m + 2)^2`` transformed positions become one
  batched matrix product over channels, and ``A^T M A`` turns each product back into an ``m x m``
  output tile. ``F(4x4, 3x3)`` does 4x fewer multiplies than the direct convolution and
  ``F(2x2, 3x3)`` 2.25x fewer; the relative error against the direct convolution stays below
  ``1e-5`` (``F(4, 3)``) and ``1e-6`` (``F(2, 3)``) in float32.
* The input gradient of a stride-1 3x3 convolution is itself one (the flipped, transposed
  kernel), so the backward pass uses the same choice; the kernel gradient, where Winograd
  measured slower on CPU, stays XLA's own.
* Every other backend (GPU, TPU, whose convolution libraries choose their own algorithms), every
  other dtype (Winograd's transforms cost bfloat16 too much precision) and small feature maps get
  the direct convolution. The backend is resolved by ``lax.platform_dependent`` when the step is
  lowered, so a GPU or TPU compile never sees the CPU branch (the transforms are traced under
  the named scope ``winograd``).
* ``conv3x3``'s custom VJP makes the same choice for the input gradient; reverse-mode
  differentiation works to any order, forward mode (``jax.jvp``) does not.

The tile size per shape (:func:`tile_size`) comes from side-by-side forward timings of XLA:CPU
on a 2-core AMD EPYC (Zen 4), float32 (table in docs/benchmarks.md). Batch 8: 56x56x64 10.1 -> 5.2 ms
with ``F(4, 3)``, 28x28x128 8.7 -> 4.1 ms, 14x14x256 8.8 -> 5.7 ms with ``F(2, 3)``; 7x7 maps
(32 or 128 tiles) lose, 7x7x512 9.1 -> 12.1 ms. Batch 64: 16x16x128 24.1 -> 11.4 ms with
``F(4, 3)``; fewer than 64 channels lose or break even, 32x32x16 3.2 -> 6.8 ms.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MIN_CHANNELS", "MIN_TILES", "batched_dot", "conv3x3_winograd", "tile_size"]

# (B^T, G, A^T) of F(m x m, 3 x 3), from Lavin & Gray (2016), "Fast Algorithms for Convolutional
# Neural Networks", section 4 (F(2, 3)) and 4.2 (F(4, 3), interpolation points 0, +-1, +-2, inf).
_TRANSFORMS = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                 np.float64)),
}

#: Least number of tiles (batch x tile rows x tile columns) and input channels for which the
#: batched products of Winograd beat XLA:CPU's direct convolution (measured, module docstring).
MIN_TILES = 256
MIN_CHANNELS = 64


def tile_size(batch: int, height: int, width: int, in_channels: int, dtype) -> int:
    """Output tile ``m`` of the CPU Winograd ``F(m x m, 3 x 3)`` for this input, 0 for direct.

    float32 with at least :data:`MIN_CHANNELS` input channels only: ``F(4, 3)`` when it makes at
    least :data:`MIN_TILES` tiles, else ``F(2, 3)`` when that does, else the direct convolution
    (too few rows for the 36 or 16 matrix products to run efficiently).
    """
    if jnp.dtype(dtype) != jnp.float32 or in_channels < MIN_CHANNELS:
        return 0
    for m in (4, 2):
        if batch * -(-height // m) * -(-width // m) >= MIN_TILES:
            return m
    return 0


def _combine(row: np.ndarray, terms: list[jax.Array]) -> jax.Array:
    """``sum_k row[k] * terms[k]``, skipping zero coefficients and multiplications by +-1."""
    out = None
    for coef, term in zip(row, terms):
        if coef == 0:
            continue
        term = term if coef == 1 else -term if coef == -1 else term * float(coef)
        out = term if out is None else out + term
    return out


def _tiles_1d(x: jax.Array, axis: int, tiles: int, m: int, bt: np.ndarray) -> jax.Array:
    """``B^T d`` along ``axis`` for ``tiles`` overlapping windows of ``m + 2`` (stride ``m``).

    The ``m + 2`` transformed rows are stacked on a new leading axis.
    """
    rows = [jax.lax.slice_in_dim(x, k, k + m * (tiles - 1) + 1, m, axis) for k in range(m + 2)]
    return jnp.stack([_combine(r, rows) for r in bt], 0)


@functools.cache
def _kernel_transform(m: int) -> np.ndarray:
    """``[(m + 2)^2, 9]``: row ``(j, i)``, column ``(k, l)`` holds ``G[j, l] * G[i, k]``, so that it maps
    a 3x3 kernel ``g[k, l]`` to ``(G g G^T)^T`` flattened, the layout of the transformed tiles."""
    g = _TRANSFORMS[m][1]
    return np.einsum("jl,ik->jikl", g, g).reshape((m + 2) ** 2, 9).astype(np.float32)


def batched_dot(v: jax.Array, u: jax.Array) -> jax.Array:
    """``v[i] @ u[i]``, ``[B, T, K] x [B, K, N] -> [B, T, N]``: XLA's batched ``dot_general``."""
    return jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))


def conv3x3_winograd(x: jax.Array, kernel: jax.Array, m: int,
                     product: Callable[[jax.Array, jax.Array], jax.Array] = batched_dot) -> jax.Array:
    """Winograd ``F(m x m, 3 x 3)`` of the direct 3x3 convolution (padding 1); ``m`` is 2 or 4.

    ``[N, H, W, C_in] x [3, 3, C_in, C_out] -> [N, H, W, C_out]`` for any ``H, W`` (the last tile
    row and column are cut to size). ``product`` computes the ``(m + 2)^2`` batched matrix products
    (:func:`batched_dot`, or a faster kernel of the same contract).
    """
    if m not in _TRANSFORMS:
        raise ValueError(f"Winograd tile size must be one of {sorted(_TRANSFORMS)}, got {m}")
    with jax.named_scope("winograd"):
        return _winograd(x, kernel, m, product)


def _winograd(x, kernel, m, product):
    bt, _, at = _TRANSFORMS[m]
    n, h, w, c_in = x.shape
    a = m + 2
    th, tw = -(-h // m), -(-w // m)
    x = jnp.pad(x, ((0, 0), (1, m * th + 1 - h), (1, m * tw + 1 - w), (0, 0)))
    v = _tiles_1d(x, 1, th, m, bt)                      # [a_h, N, th, W + pad, C_in]
    v = _tiles_1d(v, 3, tw, m, bt)                      # [a_w, a_h, N, th, tw, C_in]
    v = v.reshape(a * a, n * th * tw, c_in)
    # G g G^T of every (C_in, C_out) pair as one product: the 9 taps against the 36 (or 16)
    # entries of kron(G, G), far cheaper on CPU than the einsum's two small contractions.
    u = (_kernel_transform(m) @ kernel.reshape(9, -1)).reshape(a * a, c_in, -1)   # [a_w * a_h, C_in, C_out]
    prod = product(v, u)                                # [a_w * a_h, N * th * tw, C_out]
    prod = prod.reshape(a, a, n, th, tw, -1)            # [a_w, a_h, N, th, tw, C_out]
    y = jnp.stack([_combine(r, [prod[:, i] for i in range(a)]) for r in at], 0)   # [m_h, a_w, ...]
    y = jnp.stack([_combine(r, [y[:, j] for j in range(a)]) for r in at], 0)      # [m_w, m_h, ...]
    y = y.transpose(2, 3, 1, 4, 0, 5).reshape(n, m * th, m * tw, -1)
    return y[:, :h, :w]

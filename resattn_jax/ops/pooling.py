"""The bottom-up ``maxpool 3x3/2`` of the soft mask branch and the ImageNet stem (docs/paper-facts.md §1).

Pooling convention (documented choice): we use XLA's ``padding='SAME'``. On even sizes this is
*exactly* Caffe's ceil-mode pooling without padding (windows start at pixel 0, the last window is
clipped at the border). On odd sizes Caffe gives ``ceil((H-3)/2)+1`` (25 -> 12) while ``SAME``
gives ``ceil(H/2)`` (25 -> 13). The networks never hard-code a size: every up-sampling goes to the
size of the matching down-path map, so any input size works consistently.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from resattn_jax.ops import backend

__all__ = ["max_pool_3x3s2", "pooled_size"]


def pooled_size(size: int) -> int:
    """Spatial size after :func:`max_pool_3x3s2` (``SAME`` padding, stride 2): ``ceil(size/2)``."""
    return -(-size // 2)


def _pool_padding(size: int) -> tuple[int, int]:
    """XLA's ``SAME`` padding ``(low, high)`` of a 3-wide, stride-2 window over ``size`` pixels."""
    total = max(2 * (pooled_size(size) - 1) + 3 - size, 0)
    return total // 2, total - total // 2


def _pool_windows(x: jax.Array) -> list[jax.Array]:
    """The 9 strided views ``x_pad[:, a::2, b::2]`` (``a, b`` in 0..2, row-major) of the padded input.

    ``[N, H, W, C] -> 9 x [N, ceil(H/2), ceil(W/2), C]``; padding is ``-inf`` (never the maximum).
    """
    n, h, w, c = x.shape
    ho, wo = pooled_size(h), pooled_size(w)
    fill = jnp.array(-jnp.inf, x.dtype)
    xp = jax.lax.pad(x, fill, ((0, 0, 0), (*_pool_padding(h), 0), (*_pool_padding(w), 0), (0, 0, 0)))
    return [jax.lax.slice(xp, (0, a, b, 0), (n, a + 2 * ho - 1, b + 2 * wo - 1, c), (1, 2, 2, 1))
            for a in range(3) for b in range(3)]


@jax.custom_vjp
def max_pool_3x3s2(x: jax.Array) -> jax.Array:
    """``maxpool 3x3/2`` in Caffe's ceil mode (exact on even sizes, see module doc).

    The forward pass is the maximum of the 9 strided window views. The backward pass routes each
    output gradient to the *first* maximum of its window in row-major order (Caffe's and XLA's
    rule): with 9 interior-padded adds in XLA (its generic ``reduce_window`` gradient materialises
    index arrays and costs 10x more on CPU), in one C++ pass on CPU in float32
    (:func:`resattn_jax.ops.backend.max_pool_grad`).

    Args:
      x: ``[N, H, W, C]``.
    Returns:
      ``[N, ceil(H/2), ceil(W/2), C]``.
    """
    return functools.reduce(jnp.maximum, _pool_windows(x))


def _max_pool_fwd(x):
    windows = _pool_windows(x)
    y = functools.reduce(jnp.maximum, windows)
    # Index 0..8 of the first window position holding the maximum.
    first = jnp.full(y.shape, len(windows) - 1, jnp.int8)
    for k in range(len(windows) - 2, -1, -1):
        first = jnp.where(windows[k] == y, jnp.int8(k), first)
    return y, (first, x.shape)


def _route_xla(first, grad, shape):
    """XLA's formula of the backward pass: 9 selects of ``grad`` by ``first``, interior-padded and added."""
    n, h, w, c = shape
    (low_h, high_h), (low_w, high_w) = _pool_padding(h), _pool_padding(w)
    ho, wo = grad.shape[1:3]
    zero = jnp.zeros((), grad.dtype)
    total = None
    for k in range(9):
        a, b = divmod(k, 3)
        routed = jnp.where(first == k, grad, zero)
        # Output (i, j) of window offset (a, b) reads padded pixel (a + 2i, b + 2j).
        term = jax.lax.pad(routed, zero, ((0, 0, 0), (a, h + low_h + high_h - a - 2 * ho + 1, 1),
                                          (b, w + low_w + high_w - b - 2 * wo + 1, 1), (0, 0, 0)))
        total = term if total is None else total + term
    return total[:, low_h:low_h + h, low_w:low_w + w, :]


def _max_pool_bwd(residuals, grad):
    first, shape = residuals
    _, h, w, _ = shape
    geometry = (h, w, _pool_padding(h)[0], _pool_padding(w)[0])
    return (backend.max_pool_grad(first, grad, geometry, functools.partial(_route_xla, shape=shape)),)


max_pool_3x3s2.defvjp(_max_pool_fwd, _max_pool_bwd)

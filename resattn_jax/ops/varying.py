"""Cotangents of replicated inputs inside ``shard_map``, for the custom VJPs of this package.

Autodiff sums a replicated (device-invariant) input's cotangent over the devices by itself; a
custom VJP must do it explicitly. These helpers read which mesh axes a value varies along from its
abstract value (``jax.typeof(x)``), so they are no-ops outside ``shard_map``.
"""

from __future__ import annotations

import jax

__all__ = ["sum_like", "varying_axes"]


def varying_axes(*operands) -> tuple[str, ...]:
    """Mesh axes along which any operand varies (inside ``shard_map``), sorted; ``()`` outside it."""
    axes = set()
    for x in operands:
        aval = jax.typeof(x)
        mat = getattr(aval, "mat", None)  # where this jax keeps it; ``vma`` in others
        axes |= set(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())
    return tuple(sorted(axes))


def sum_like(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
    """``cotangent`` summed (``psum``) over the ``shard_map`` axes it varies along and ``primal`` does
    not: the cotangent of a replicated input in a custom VJP (what autodiff does implicitly)."""
    axes = tuple(sorted(set(varying_axes(cotangent)) - set(varying_axes(primal))))
    return jax.lax.psum(cotangent, axes) if axes else cotangent

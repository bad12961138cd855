"""Multiply-add counts read off the traced computation (the jaxpr), not from a formula.

:func:`count_macs` walks every equation of ``jax.make_jaxpr(fn)(*args)``, recursing into nested
jaxprs (``jit``, ``remat``, ``custom_vjp`` ...), and adds up

* ``conv_general_dilated``: output elements x kernel elements per output channel
  (``k_h * k_w * C_in / groups``);
* ``dot_general``: output elements x the product of the contracted dimensions;
* ``cond``: the costliest branch only (one runs), so a backend-dependent algorithm such as
  :mod:`resattn_jax.ops.cpu.winograd`'s counts as the direct convolution it computes.

Products inside the named scopes in ``exclude_scopes`` (by default the soft mask's bilinear
up-sampling, which is interpolation, not a learned layer) are left out, so that the count is the
"convolutions and the dense layer" figure that papers report.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
from jax.extend import core as jcore

__all__ = ["count_macs", "model_macs"]

_DEFAULT_EXCLUDE = ("bilinear_upsample",)


def _sub_jaxprs(params: dict[str, Any]) -> Iterable[tuple[Any, int]]:
    """Nested jaxprs of an equation with how often each runs (scan length, else 1)."""
    repeat = int(params.get("length", 1)) if "length" in params else 1
    for value in params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, jcore.ClosedJaxpr):
                yield item.jaxpr, repeat
            elif isinstance(item, jcore.Jaxpr):
                yield item, repeat


def _eqn_macs(eqn) -> int:
    name = eqn.primitive.name
    out_elems = math.prod(eqn.outvars[0].aval.shape)
    if name == "conv_general_dilated":
        rhs_shape = eqn.invars[1].aval.shape
        out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        return out_elems * math.prod(rhs_shape) // rhs_shape[out_feature_dim]
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs_shape = eqn.invars[0].aval.shape
        return out_elems * math.prod(lhs_shape[d] for d in lhs_contract)
    return 0


def _walk(jaxpr, exclude: tuple[str, ...]) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if exclude and any(scope in str(eqn.source_info.name_stack) for scope in exclude):
            continue
        total += _eqn_macs(eqn)
        if eqn.primitive.name == "cond":
            # One branch runs: count the costliest (for ``lax.platform_dependent`` choices such
            # as Winograd-on-CPU that is the direct convolution, i.e. the model's own FLOPs).
            total += max(_walk(branch.jaxpr, exclude) for branch in eqn.params["branches"])
            continue
        for sub, repeat in _sub_jaxprs(eqn.params):
            total += repeat * _walk(sub, exclude)
    return total


def count_macs(fn: Callable[..., Any], *args, exclude_scopes: tuple[str, ...] = _DEFAULT_EXCLUDE, **kwargs) -> int:
    """Multiply-adds of the convolutions and matrix products that ``fn(*args, **kwargs)`` traces."""
    closed = jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)
    return _walk(closed.jaxpr, tuple(exclude_scopes))


def model_macs(model, variables, image_shape: tuple[int, ...], **apply_kwargs) -> int:
    """Forward multiply-adds of ``model.apply(variables, zeros(image_shape), train=False)``.

    Only shapes are traced; nothing is computed. ``variables`` may be ``jax.ShapeDtypeStruct``s.
    """
    images = jax.ShapeDtypeStruct(image_shape, jax.numpy.float32)
    return count_macs(lambda v, x: model.apply(v, x, train=False, **apply_kwargs), variables, images)

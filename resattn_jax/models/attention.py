"""The attention module: trunk branch, soft mask branch, attention residual learning.

Paper: Wang et al., "Residual Attention Network for Image Classification", CVPR 2017, §3.
Topology follows the official Caffe release (docs/paper-facts.md §1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from resattn_jax import ops
from resattn_jax.ops import max_pool_3x3s2, norm_relu, upsample_bilinear

__all__ = ["ACTIVATIONS", "LEARNING", "attention_activation", "SoftMaskBranch", "AttentionModule"]

ModuleDef = Any

ACTIVATIONS = ("mixed", "channel", "spatial")
LEARNING = ("arl", "nal")

_EPS = 1e-6


def attention_activation(x: jax.Array, kind: str) -> jax.Array:
    """The soft-mask activation ``f`` of paper eq. 4-6 on ``x: [N, H, W, C]`` (i = position, c = channel).

    * ``mixed``   (eq. 4): ``f1(x_ic) = sigmoid(x_ic)``.
    * ``channel`` (eq. 5): ``f2(x_ic) = x_ic / ||x_i||``, the L2 norm over channels at each position.
    * ``spatial`` (eq. 6): ``f3(x_ic) = sigmoid((x_ic - mean_c) / std_c)``, mean and standard
      deviation over the spatial positions of channel ``c`` (per example).

    Statistics are computed in float32 whatever the compute dtype; the result has ``x.dtype``.
    """
    xf = x.astype(jnp.float32)
    if kind == "mixed":
        out = jax.nn.sigmoid(xf)
    elif kind == "channel":
        out = xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + _EPS)
    elif kind == "spatial":
        mean = jnp.mean(xf, axis=(1, 2), keepdims=True)
        var = jnp.var(xf, axis=(1, 2), keepdims=True)
        out = jax.nn.sigmoid((xf - mean) * jax.lax.rsqrt(var + _EPS))
    else:
        raise ValueError(f"unknown attention activation {kind!r}; choose one of {ACTIVATIONS}")
    return out.astype(x.dtype)


class SoftMaskBranch(nn.Module):
    """Bottom-up / top-down soft mask branch ``M(x)`` before its activation.

    With ``num_pools`` = L down-samplings and ``r`` units between adjacent pooling layers::

        bottom-up, level l = 0..L-1:  maxpool 3x3/2, then r units (2r at the lowest level);
                                      skip_l = unit(...) at every level but the lowest
        top-down,  level l = L-1..1:  up-sample (align_corners) to the size of level l's pool input,
                                      + skip_{l-1}, then r units
        finally:                      up-sample to the module's input size, then the head
                                      BN-ReLU-conv1x1-BN-ReLU-conv1x1 (pre-activation units) or
                                      conv1x1-BN-ReLU-conv1x1 (post-activation units).

    Nothing else is added to the up-sampled maps. Mask units at r=1: 8, 5, 2 for L = 3, 2, 1.
    ``[N, H, W, C] -> [N, H, W, C]`` (mask logits).
    """

    features: int
    num_pools: int
    unit: ModuleDef  # unit(features, name=...) -> residual unit
    norm: ModuleDef
    conv: ModuleDef = ops.conv  # conv(features, kernel, name=...) -> layer, for the head
    preactivation: bool = True
    r: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.num_pools < 1:
            raise ValueError(f"the soft mask needs at least one down-sampling, got num_pools={self.num_pools}")
        c = self.features
        sizes, skips = [], []
        y = x
        for level in range(self.num_pools):
            if min(y.shape[1:3]) < 2:
                raise ValueError(
                    f"input too small for the soft mask's {self.num_pools} down-samplings: the map before "
                    f"pool {level + 1} is {y.shape[1]}x{y.shape[2]} (module input {x.shape[1]}x{x.shape[2]})")
            sizes.append(y.shape[1:3])
            y = max_pool_3x3s2(y)
            lowest = level == self.num_pools - 1
            for i in range(2 * self.r if lowest else self.r):
                y = self.unit(c, name=f"down{level}_{i}")(y)
            if not lowest:
                skips.append(self.unit(c, name=f"skip{level}")(y))
        for level in reversed(range(self.num_pools)):
            y = upsample_bilinear(y, sizes[level])
            if level > 0:
                y = y + skips[level - 1]
                for i in range(self.r):
                    y = self.unit(c, name=f"up{level}_{i}")(y)
        conv1 = self.conv(c, 1, name="head_conv1")
        conv2 = self.conv(c, 1, name="head_conv2")
        if self.preactivation:  # each BN-ReLU folded into the 1x1 convolution that reads it
            y = conv1(norm_relu(self.norm, "head_bn1", fold=True)(y))
            y = conv2(norm_relu(self.norm, "head_bn2", fold=True)(y))
        else:
            y = conv2(norm_relu(self.norm, "head_bn1")(conv1(y)))
        return y


class AttentionModule(nn.Module):
    """Attention module (paper §3, Fig. 2): ``p`` units, then trunk and mask, combine, ``p`` units.

    * trunk branch ``T(x)``: ``t`` residual units;
    * soft mask branch ``M(x)``: :class:`SoftMaskBranch` followed by :func:`attention_activation`;
    * combine: attention residual learning ``H = (1 + M) * T`` (``learning='arl'``, eq. 3) or naive
      attention learning ``H = M * T`` (``learning='nal'``).

    ``unit``, ``norm`` and ``conv`` are the layers (``ModuleDef``) the network chose at the top.
    The mask is sown into the ``intermediates`` collection as ``soft_mask`` (``[N, H, W, C]``).
    ``[N, H, W, C] -> [N, H, W, C]``.
    """

    features: int
    num_pools: int
    unit: ModuleDef
    norm: ModuleDef
    conv: ModuleDef = ops.conv
    preactivation: bool = True
    p: int = 1
    t: int = 2
    r: int = 1
    activation: str = "mixed"
    learning: str = "arl"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.learning not in LEARNING:
            raise ValueError(f"unknown attention learning {self.learning!r}; choose one of {LEARNING}")
        if x.shape[-1] != self.features:
            raise ValueError(f"attention module expects {self.features} channels, got {x.shape[-1]}")
        for i in range(self.p):
            x = self.unit(self.features, name=f"pre{i}")(x)
        trunk = x
        for i in range(self.t):
            trunk = self.unit(self.features, name=f"trunk{i}")(trunk)
        mask = SoftMaskBranch(self.features, self.num_pools, unit=self.unit, norm=self.norm, conv=self.conv,
                              preactivation=self.preactivation, r=self.r, name="mask_branch")(x)
        mask = attention_activation(mask, self.activation)
        self.sow("intermediates", "soft_mask", mask)
        h = (1 + mask) * trunk if self.learning == "arl" else mask * trunk
        for i in range(self.p):
            h = self.unit(self.features, name=f"post{i}")(h)
        return h

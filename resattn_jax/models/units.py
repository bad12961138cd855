"""Residual units: the building blocks of trunk, soft-mask and skip branches.

Every unit maps ``[N, H, W, C_in] -> [N, ceil(H/s), ceil(W/s), features]`` and receives its layers
as ``ModuleDef`` fields, as in Flax's ImageNet example: ``norm`` (a ``functools.partial`` of
:class:`resattn_jax.ops.BatchNorm` with the train/eval mode, momentum 0.9, epsilon 1e-5 and dtypes
bound; any norm layer works, e.g. ``nn.BatchNorm``) and ``conv`` (:func:`resattn_jax.ops.conv` with
the dtypes bound). The network makes both choices once, at the top; units carry no config plumbing. The 1x1 layers
of ``conv`` take a :class:`resattn_jax.ops.Folded` batch norm as input and a ``residual`` to add
(as :func:`resattn_jax.ops.conv`'s do).

* :class:`PreActBottleneck` — the pre-activation bottleneck of He et al. (2016), used by
  Attention-56/92 and the CIFAR networks (docs/paper-facts.md §1).
* :class:`ResNeXtBottleneck` — the ResNeXt 32x4d post-activation bottleneck of AttentionNeXt-56.
* :class:`InceptionResidual` — our documented design for AttentionInception-56 (the paper gives no
  layer table), see its docstring.

No convolution has a bias; padding is Caffe's symmetric ``k // 2`` (see :mod:`resattn_jax.ops.conv`).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from resattn_jax import ops
from resattn_jax.ops import norm_relu

__all__ = ["PreActBottleneck", "ResNeXtBottleneck", "InceptionResidual", "UNITS"]

ModuleDef = Any


class _Unit(nn.Module):
    """Fields shared by all residual units."""

    features: int
    norm: ModuleDef
    strides: int = 1
    conv: ModuleDef = ops.conv  # conv(features, kernel, strides, groups, name=...) -> layer
    #: Start the residual branch at zero, so that the unit is the identity (or its projection) at
    #: initialisation (Goyal et al. 2017; Flax's ImageNet example): the last BN scale of a
    #: post-activation unit, the last convolution's kernel of a pre-activation unit (it has no BN
    #: after that convolution). ``norm`` then needs a ``scale_init`` field, ``conv`` a ``kernel_init``.
    zero_init_last: bool = False

    #: True when the unit normalises its *input* (pre-activation); the network then adds a final
    #: BN-ReLU before pooling and the soft-mask head starts with BN-ReLU.
    preactivation: ClassVar[bool] = True

    def _conv(self, features: int, kernel: int, strides: int = 1, groups: int = 1, name: str | None = None):
        return self.conv(features, kernel, strides, groups, name=name)

    def _last_conv(self, features: int, name: str):
        """The 1x1 convolution that ends a pre-activation residual branch."""
        if self.zero_init_last:
            return self.conv(features, 1, 1, 1, name=name, kernel_init=nn.initializers.zeros)
        return self._conv(features, 1, name=name)

    def _last_norm(self, name: str):
        """The BN that ends a post-activation residual branch."""
        return self.norm(name=name, scale_init=nn.initializers.zeros) if self.zero_init_last else self.norm(name=name)

    def _needs_projection(self, x: jax.Array) -> bool:
        return self.strides != 1 or x.shape[-1] != self.features


class PreActBottleneck(_Unit):
    """Pre-activation bottleneck: ``BN-ReLU-conv1x1(C/4)-BN-ReLU-conv3x3(C/4, s)-BN-ReLU-conv1x1(C)``.

    The stride sits on the 3x3 convolution. The shortcut is the identity, or, where channels or
    resolution change, a strided 1x1 convolution of the *pre-activated* input.
    ``[N, H, W, C_in] -> [N, ceil(H/s), ceil(W/s), features]``.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bottleneck = self.features // 4
        # Each BN-ReLU is folded into the convolution after it (ops.Folded: applied as the convolution
        # reads its input), and the shortcut is added by conv3 as it writes its output.
        pre = norm_relu(self.norm, "bn1", fold=True)(x)
        y = self._conv(bottleneck, 1, name="conv1")(pre)
        y = norm_relu(self.norm, "bn2", fold="eval")(y)  # the 3x3 layer fuses it on stored statistics
        y = self._conv(bottleneck, 3, self.strides, name="conv2")(y)
        y = norm_relu(self.norm, "bn3", fold=True)(y)
        shortcut = self._conv(self.features, 1, self.strides, name="projection")(pre) if self._needs_projection(x) else x
        return self._last_conv(self.features, "conv3")(y, residual=shortcut)  # conv3(y) + shortcut


class ResNeXtBottleneck(_Unit):
    """ResNeXt 32x4d bottleneck in post-activation form (AttentionNeXt-56).

    ``conv1x1(W)-BN-ReLU-conv3x3(W, groups=32, s)-BN-ReLU-conv1x1(C)-BN``, plus the shortcut
    (identity, or ``conv1x1(s)-BN``), then ReLU after the sum. ``W = C / 2`` gives the widths
    128/256/512/1024 for outputs 256/512/1024/2048 (32 groups of 4, 8, 16, 32 channels).
    ``[N, H, W, C_in] -> [N, ceil(H/s), ceil(W/s), features]``.
    """

    groups: int = 32
    preactivation: ClassVar[bool] = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = self.features // 2
        y = norm_relu(self.norm, "bn1")(self._conv(width, 1, name="conv1")(x))
        y = norm_relu(self.norm, "bn2")(self._conv(width, 3, self.strides, self.groups, name="conv2")(y))
        y = self._last_norm("bn3")(self._conv(self.features, 1, name="conv3")(y))
        if self._needs_projection(x):
            x = self.norm(name="projection_bn")(self._conv(self.features, 1, self.strides, name="projection")(x))
        return nn.relu(y + x)


class InceptionResidual(_Unit):
    """Inception-style residual unit for AttentionInception-56 (our documented design).

    The paper only says that Inception units replace the residual units. We use
    Inception-ResNet-v1-style branches in the pre-activation form of the other units, with a
    branch width ``B = C / 8``::

        pre = BN-ReLU(x)
        a   = conv1x1(B, s)(pre)
        b   = conv3x3(B, s)(BN-ReLU(conv1x1(B)(pre)))
        c   = conv3x3(B, s)(BN-ReLU(conv3x3(B)(BN-ReLU(conv1x1(B)(pre)))))
        out = conv1x1(C)(BN-ReLU(concat[a, b, c])) + shortcut

    with the same shortcut rule as :class:`PreActBottleneck`. Its parameters and multiply-adds are
    about 10 % above the bottleneck's (convolution weights at ``C = 256``: 76,800 against 69,632).
    ``[N, H, W, C_in] -> [N, ceil(H/s), ceil(W/s), features]``.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch = self.features // 8
        pre = norm_relu(self.norm, "bn_in")(x)
        a = self._conv(branch, 1, self.strides, name="branch1x1")(pre)
        b = self._conv(branch, 1, name="branch3x3_reduce")(pre)
        b = self._conv(branch, 3, self.strides, name="branch3x3")(norm_relu(self.norm, "bn_b")(b))
        c = self._conv(branch, 1, name="branch5x5_reduce")(pre)
        c = self._conv(branch, 3, name="branch5x5_a")(norm_relu(self.norm, "bn_c1")(c))
        c = self._conv(branch, 3, self.strides, name="branch5x5_b")(norm_relu(self.norm, "bn_c2")(c))
        y = jnp.concatenate([a, b, c], axis=-1)
        y = self._last_conv(self.features, "expand")(norm_relu(self.norm, "bn_cat")(y))
        shortcut = self._conv(self.features, 1, self.strides, name="projection")(pre) if self._needs_projection(x) else x
        return y + shortcut


#: Unit families by the name the networks use.
UNITS: dict[str, Callable[..., _Unit]] = {
    "preact": PreActBottleneck,
    "next": ResNeXtBottleneck,
    "inception": InceptionResidual,
}

"""Residual units: the building blocks of trunk, soft-mask and skip branches.

Every unit maps ``[N, H, W, C_in] -> [N, ceil(H/s), ceil(W/s), features]`` and receives its
normalisation layer as a ``ModuleDef`` (``functools.partial`` of ``nn.BatchNorm`` with the
train/eval mode, momentum 0.9 and epsilon 1e-5 already bound), so units carry no config plumbing.

* :class:`PreActBottleneck` — the pre-activation bottleneck of He et al. (2016), used by
  Attention-56/92 and the CIFAR networks (paper-facts §1).
* :class:`ResNeXtBottleneck` — the ResNeXt 32x4d post-activation bottleneck of AttentionNeXt-56.
* :class:`InceptionResidual` — our documented design for AttentionInception-56 (the paper gives no
  layer table), see its docstring.

No convolution has a bias. Convolution padding reproduces Caffe's explicit symmetric padding
(``pad = k // 2``), so strided 3x3 and 7x7 windows start at pixel 0 as in the official release.
1x1 convolutions are computed as matrix products (:class:`Conv1x1`), which XLA:CPU runs without
the transposes its convolution path inserts; the kernel keeps ``nn.Conv``'s ``[1, 1, C_in, C_out]``
layout.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from resattn_jax import cpu_blas
from resattn_jax.batchnorm import norm_relu
from resattn_jax.winograd import conv3x3

__all__ = [
    "Conv1x1",
    "Conv3x3",
    "conv",
    "PreActBottleneck",
    "ResNeXtBottleneck",
    "InceptionResidual",
    "UNITS",
]

ModuleDef = Any
Dtype = Any

# He / MSRA initialisation, as the Caffe ResNet prototxts use.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


_TN = (((0,), (0,)), ((), ()))


def _weight_gradient(rows: jax.Array, dy: jax.Array) -> jax.Array:
    """``rows^T dy``, ``[M, C_in] x [M, C_out] -> [C_in, C_out]``: through OpenBLAS on CPU in float32
    (:mod:`resattn_jax.cpu_blas`; XLA:CPU's kernel runs this shape at half speed), else XLA's."""
    return cpu_blas.dispatch(cpu_blas.matmul_tn, lambda rows, dy: jax.lax.dot_general(rows, dy, _TN), rows, dy)


@jax.custom_vjp
def _matmul(rows: jax.Array, kernel: jax.Array) -> jax.Array:
    """``rows @ kernel``, ``[M, C_in] x [C_in, C_out] -> [M, C_out]``, with the weight gradient of
    :func:`_weight_gradient` (reverse mode only)."""
    return jax.lax.dot_general(rows, kernel, (((1,), (0,)), ((), ())))


def _matmul_fwd(rows, kernel):
    return _matmul(rows, kernel), (rows, kernel)


def _matmul_bwd(residuals, dy):
    rows, kernel = residuals
    # Inside shard_map a replicated kernel's cotangent is the sum over devices.
    return jax.lax.dot_general(dy, kernel, (((1,), (1,)), ((), ()))), cpu_blas.sum_like(_weight_gradient(rows, dy), kernel)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Conv1x1(nn.Module):
    """Bias-free 1x1 convolution with stride, as a matrix product over the channel axis.

    ``[N, H, W, C_in] -> [N, ceil(H/s), ceil(W/s), features]``. A stride-``s`` 1x1 convolution
    without padding reads pixels ``0, s, 2s, ...`` exactly like Caffe's, so it is a strided slice
    followed by a ``dot_general``.
    """

    features: int
    strides: int = 1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", conv_init, (1, 1, x.shape[-1], self.features), self.param_dtype)
        if self.strides > 1:
            x = x[:, :: self.strides, :: self.strides, :]
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        # One contracting dimension per operand, in the forward and in both transposes: with the
        # batch and spatial axes flattened, XLA runs the weight gradient ``x^T dy`` as one matrix
        # product instead of canonicalising three contracting axes through a transposed copy.
        rows = x.reshape(-1, x.shape[-1])
        y = _matmul(rows, kernel[0, 0])
        return y.reshape(*x.shape[:-1], self.features)


class Conv3x3(nn.Module):
    """Bias-free 3x3 convolution, stride 1, padding 1: ``[N, H, W, C_in] -> [N, H, W, features]``.

    :func:`resattn_jax.winograd.conv3x3` picks Winograd or XLA's convolution by backend, dtype and
    shape; the kernel keeps ``nn.Conv``'s ``[3, 3, C_in, C_out]`` layout and name.
    """

    features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", conv_init, (3, 3, x.shape[-1], self.features), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return conv3x3(x, kernel)


def conv(features: int, kernel: int, strides: int = 1, groups: int = 1, dtype: Dtype | None = None,
         param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Module:
    """A bias-free ``k x k`` convolution with Caffe's symmetric padding ``k // 2``."""
    if kernel == 1 and groups == 1:
        return Conv1x1(features, strides, dtype=dtype, param_dtype=param_dtype, name=name)
    if kernel == 3 and strides == 1 and groups == 1:
        return Conv3x3(features, dtype=dtype, param_dtype=param_dtype, name=name)
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=False, kernel_init=conv_init, dtype=dtype,
                   param_dtype=param_dtype, name=name)


class _Unit(nn.Module):
    """Fields shared by all residual units."""

    features: int
    norm: ModuleDef
    strides: int = 1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    #: True when the unit normalises its *input* (pre-activation); the network then adds a final
    #: BN-ReLU before pooling and the soft-mask head starts with BN-ReLU.
    preactivation: ClassVar[bool] = True

    def _conv(self, features: int, kernel: int, strides: int = 1, groups: int = 1, name: str | None = None):
        return conv(features, kernel, strides, groups, self.dtype, self.param_dtype, name=name)

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
        pre = norm_relu(self.norm, "bn1")(x)
        y = self._conv(bottleneck, 1, name="conv1")(pre)
        y = norm_relu(self.norm, "bn2")(y)
        y = self._conv(bottleneck, 3, self.strides, name="conv2")(y)
        y = norm_relu(self.norm, "bn3")(y)
        y = self._conv(self.features, 1, name="conv3")(y)
        shortcut = self._conv(self.features, 1, self.strides, name="projection")(pre) if self._needs_projection(x) else x
        return y + shortcut


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
        y = self.norm(name="bn3")(self._conv(self.features, 1, name="conv3")(y))
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

    with the same shortcut rule as :class:`PreActBottleneck`. Its parameter and multiply-add
    budget is within 10 % of the bottleneck's.
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
        y = self._conv(self.features, 1, name="expand")(norm_relu(self.norm, "bn_cat")(y))
        shortcut = self._conv(self.features, 1, self.strides, name="projection")(pre) if self._needs_projection(x) else x
        return y + shortcut


#: Unit families by the name the networks use.
UNITS: dict[str, Callable[..., _Unit]] = {
    "preact": PreActBottleneck,
    "next": ResNeXtBottleneck,
    "inception": InceptionResidual,
}

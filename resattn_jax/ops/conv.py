"""Bias-free convolutions with Caffe's padding, NHWC: the one convolution every network layer uses.

:func:`conv` returns the layer for a ``k x k`` window: 1x1 convolutions are matrix products over the
channel axis (:class:`Conv1x1`, which XLA:CPU runs without the transposes its convolution path
inserts), 3x3 convolutions are :class:`Conv3x3` (stride 1: Winograd on CPU in float32, see
:func:`conv3x3`; any stride: the backend's kernel gradient), everything else ``flax.linen.Conv``. Every kernel keeps ``nn.Conv``'s
``[k, k, C_in / groups, C_out]`` layout and the name ``kernel``, so parameter trees do not depend on
which layer computes them. Padding reproduces Caffe's explicit symmetric padding (``pad = k // 2``),
so strided 3x3 and 7x7 windows start at pixel 0 as in the official release. Initialisation: He /
MSRA (``fan_out``, normal), as the Caffe ResNet prototxts use.

The backend choices (OpenBLAS weight gradient, Winograd) are made in :mod:`resattn_jax.ops.backend`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from resattn_jax.ops import backend
from resattn_jax.ops.batchnorm import Folded
from resattn_jax.ops.varying import sum_like

__all__ = ["Conv1x1", "Conv3x3", "conv", "conv3x3", "conv3x3_direct", "conv3x3_strided", "conv_init"]

Dtype = Any

#: He / MSRA initialisation, as the Caffe ResNet prototxts use.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


@jax.custom_vjp
def _matmul(rows: jax.Array, kernel: jax.Array) -> jax.Array:
    """``rows @ kernel``, ``[M, C_in] x [C_in, C_out] -> [M, C_out]``, with the weight gradient of
    :func:`resattn_jax.ops.backend.weight_gradient` (reverse mode only)."""
    return jax.lax.dot_general(rows, kernel, (((1,), (0,)), ((), ())))


def _matmul_fwd(rows, kernel):
    return _matmul(rows, kernel), (rows, kernel)


def _matmul_bwd(residuals, dy):
    rows, kernel = residuals
    # Inside shard_map a replicated kernel's cotangent is the sum over devices.
    return (jax.lax.dot_general(dy, kernel, (((1,), (1,)), ((), ()))),
            sum_like(backend.weight_gradient(rows, dy), kernel))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _conv1x1_xla(x, center, mul, bias, kernel, residual, relu: bool, dtype):
    """XLA's formula of :func:`resattn_jax.ops.backend.conv1x1_normalized`: the normalised rows, then
    the product."""
    z = (x.astype(jnp.float32) - center) * mul + bias
    rows = (jnp.maximum(z, 0.0) if relu else z).astype(dtype)
    y = _matmul(*nn.dtypes.promote_dtype(rows, kernel, dtype=dtype))
    return y if residual is None else y + residual


class Conv1x1(nn.Module):
    """Bias-free 1x1 convolution with stride, as a matrix product over the channel axis.

    ``[N, H, W, C_in] -> [N, ceil(H/s), ceil(W/s), features]``. A stride-``s`` 1x1 convolution
    without padding reads pixels ``0, s, 2s, ...`` exactly like Caffe's, so it is a strided slice
    followed by a ``dot_general``. The input may be a :class:`resattn_jax.ops.Folded` batch norm
    (+ ReLU), applied as the rows are read (:func:`resattn_jax.ops.backend.conv1x1_normalized`: one
    fused pass on CPU), and ``residual`` (``[N, ceil(H/s), ceil(W/s), features]``) is added to the
    output (in the same pass there).
    """

    features: int
    strides: int = 1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = conv_init

    @nn.compact
    def __call__(self, x: jax.Array | Folded, residual: jax.Array | None = None) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype)
        if isinstance(x, Folded):
            folded = x.subsample(self.strides)
            dtype = self.dtype if self.dtype is not None else jnp.result_type(folded.dtype, kernel.dtype)
            shape = (*folded.x.shape[:-1], self.features)
            rows = folded.x.reshape(-1, folded.x.shape[-1])
            res = None if residual is None else residual.reshape(-1, self.features)
            xla = functools.partial(_conv1x1_xla, relu=folded.relu, dtype=dtype)
            y = backend.conv1x1_normalized(rows, folded.center, folded.mul, folded.bias, kernel[0, 0].astype(dtype),
                                           res, folded.relu, xla)
            return y.reshape(shape)
        if self.strides > 1:
            x = x[:, :: self.strides, :: self.strides, :]
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        # One contracting dimension per operand, in the forward and in both transposes: with the
        # batch and spatial axes flattened, XLA runs the weight gradient ``x^T dy`` as one matrix
        # product instead of canonicalising three contracting axes through a transposed copy.
        rows = x.reshape(-1, x.shape[-1])
        y = _matmul(rows, kernel[0, 0]).reshape(*x.shape[:-1], self.features)
        return y if residual is None else y + residual


def conv3x3_direct(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``[N, H, W, C_in] x [3, 3, C_in, C_out] -> [N, H, W, C_out]``, XLA's convolution, padding 1."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSION_NUMBERS)


def _conv3x3_forward(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return backend.conv3x3_forward(x, kernel, conv3x3_direct)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1 convolution, ``[N, H, W, C_in] x [3, 3, C_in, C_out] -> [N, H, W, C_out]``.

    Equal (up to rounding) to :func:`conv3x3_direct`; the algorithm is the backend's choice
    (:func:`resattn_jax.ops.backend.conv3x3_forward`: Winograd on CPU in float32 on large enough
    maps). The input gradient of a stride-1 3x3 convolution is itself one, so the backward pass
    makes the same choice; the kernel gradient is the backend's too
    (:func:`resattn_jax.ops.backend.conv3x3_weight_gradient`). Reverse mode only (``jax.grad``,
    ``jax.vjp``), to any order.
    """
    return _conv3x3_forward(x, kernel)


def _conv3x3_fwd(x, kernel):
    return _conv3x3_forward(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, dy):
    x, kernel = residuals
    # d/dx of a padding-1 cross-correlation: the same convolution of dy with the kernel rotated
    # by 180 degrees and its channel axes swapped.
    dx = _conv3x3_forward(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    # Inside shard_map a replicated kernel's cotangent is the sum over devices.
    return dx, sum_like(backend.conv3x3_weight_gradient(x, dy).astype(kernel.dtype), kernel)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def _strided_direct(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=_DIMENSION_NUMBERS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_strided(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """3x3, padding 1, stride ``stride`` convolution, ``[N, H, W, C_in] x [3, 3, C_in, C_out] ->
    [N, ceil(H/s), ceil(W/s), C_out]`` (Caffe's windows, starting at pixel 0): XLA's convolution and
    input gradient, the backend's kernel gradient (:func:`resattn_jax.ops.backend.conv3x3_weight_gradient`).
    Reverse mode only."""
    return _strided_direct(x, kernel, stride)


def _conv3x3_strided_fwd(x, kernel, stride):
    return _strided_direct(x, kernel, stride), (x, kernel)


def _conv3x3_strided_bwd(stride, residuals, dy):
    x, kernel = residuals
    (dx,) = jax.linear_transpose(lambda x: _strided_direct(x, kernel, stride), x)(dy)
    return dx, sum_like(backend.conv3x3_weight_gradient(x, dy, stride).astype(kernel.dtype), kernel)


conv3x3_strided.defvjp(_conv3x3_strided_fwd, _conv3x3_strided_bwd)


def _conv3x3_normalized_xla(x, center, mul, bias, kernel, relu: bool):
    z = (x.astype(jnp.float32) - center) * mul + bias
    return conv3x3(jnp.maximum(z, 0.0) if relu else z, kernel)


class Conv3x3(nn.Module):
    """Bias-free 3x3 convolution, padding 1: ``[N, H, W, C_in] -> [N, ceil(H/s), ceil(W/s), features]``
    through :func:`conv3x3` (stride 1) or :func:`conv3x3_strided`. A :class:`resattn_jax.ops.Folded`
    input is normalised first, by the convolution itself where it runs on stored statistics
    (:func:`resattn_jax.ops.backend.conv3x3_normalized`)."""

    features: int
    strides: int = 1
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = conv_init

    @nn.compact
    def __call__(self, x: jax.Array | Folded) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), self.param_dtype)
        if isinstance(x, Folded):
            if x.running and self.strides == 1 and (self.dtype or jnp.result_type(x.dtype, kernel)) == jnp.float32:
                # Stored statistics (evaluation): the kernel may normalise its input as it pads it.
                return backend.conv3x3_normalized(x.x, x.center, x.mul, x.bias, kernel, x.relu,
                                                  functools.partial(_conv3x3_normalized_xla, relu=x.relu))
            x = x.materialize()
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return conv3x3(x, kernel) if self.strides == 1 else conv3x3_strided(x, kernel, self.strides)


def conv(features: int, kernel: int, strides: int = 1, groups: int = 1, *, dtype: Dtype | None = None,
         param_dtype: Dtype = jnp.float32, kernel_init: Any = conv_init, name: str | None = None) -> nn.Module:
    """A bias-free ``k x k`` convolution with Caffe's symmetric padding ``k // 2``:
    ``[N, H, W, C_in] -> [N, ceil(H/s), ceil(W/s), features]``; kernels initialised by ``kernel_init``
    (He / MSRA by default)."""
    if kernel == 1 and groups == 1:
        return Conv1x1(features, strides, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, name=name)
    if kernel == 3 and groups == 1:
        return Conv3x3(features, strides, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init, name=name)
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=((pad, pad), (pad, pad)),
                   feature_group_count=groups, use_bias=False, kernel_init=kernel_init, dtype=dtype,
                   param_dtype=param_dtype, name=name)

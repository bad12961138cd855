"""Numerics of the network: convolution, batch norm, pooling, up-sampling.

One function (or Flax layer) per operation, each computing the same thing on every backend; the
backend-specific fast paths are chosen inside, in :mod:`resattn_jax.ops.backend` (CPU kernels under
:mod:`resattn_jax.ops.cpu`). The models import from here only.
"""

from resattn_jax.ops.batchnorm import BatchNorm, Folded, batch_norm_train, norm_relu
from resattn_jax.ops.conv import Conv1x1, Conv3x3, conv, conv3x3, conv3x3_direct, conv_init
from resattn_jax.ops.pooling import max_pool_3x3s2, pooled_size
from resattn_jax.ops.upsample import interpolation_matrix, upsample_bilinear

__all__ = ["BatchNorm", "Conv1x1", "Folded", "Conv3x3", "batch_norm_train", "conv", "conv3x3", "conv3x3_direct", "conv_init",
           "interpolation_matrix", "max_pool_3x3s2", "norm_relu", "pooled_size", "upsample_bilinear"]

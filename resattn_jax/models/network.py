"""``ResidualAttentionNet``: the general network every zoo variant is one ``partial`` of.

Macro layout (paper Table 2 for ImageNet; our documented layout for CIFAR, see README)::

    stem        imagenet: conv7x7/2 (pad 3) - BN-ReLU - maxpool 3x3/2      [N, H/4, W/4, 64]
                cifar:    conv3x3 (pad 1) (+ BN-ReLU for post-activation units)
    stage s     unit(width_s, stride_s)  (projection)                       [N, H_s, W_s, width_s]
                + extra_units_per_stage plain units (ResNet baseline)
                + modules_per_stage[s] attention modules, mask_pools[s] down-samplings each
    final       final_units units of final_width, the first with final_stride
    head        (BN-ReLU for pre-activation units) - global average pool - dense(num_classes)

Each stage's output and the final feature map are sown into ``intermediates`` as ``stage1``..
``stageK`` and ``final``; each attention module sows its ``soft_mask``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from resattn_jax import ops
from resattn_jax.models.attention import ACTIVATIONS, LEARNING, AttentionModule
from resattn_jax.models.units import UNITS
from resattn_jax.ops import max_pool_3x3s2, norm_relu, pooled_size

__all__ = ["ResidualAttentionNet"]

STEMS = ("imagenet", "cifar")


class ResidualAttentionNet(nn.Module):
    """Residual Attention Network (Wang et al., CVPR 2017).

    Call as ``model.apply(variables, images, train=...)`` with ``images: [N, H, W, in_channels]``
    floats; returns float32 logits ``[N, num_classes]``. Batch-norm running statistics live in the
    ``batch_stats`` collection: pass ``mutable=['batch_stats']`` when ``train=True``.

    Attributes:
      num_classes: output classes.
      stage_widths: unit output channels of each attention stage.
      modules_per_stage: attention modules per stage (``m``).
      mask_pools: soft-mask down-samplings per stage.
      stage_strides: stride of each stage's first (transition) unit.
      extra_units_per_stage: plain units after each transition unit (0 for attention networks).
      final_width, final_units, final_stride: the units after the last stage.
      stem: ``'imagenet'`` or ``'cifar'``; stem_width: its output channels.
      unit: ``'preact'``, ``'next'`` or ``'inception'`` (see :mod:`resattn_jax.models.units`).
      p, t, r: attention-module hyper-parameters (paper §4: 1, 2, 1).
      activation: ``'mixed'``, ``'channel'`` or ``'spatial'`` (paper eq. 4-6).
      learning: ``'arl'`` (``(1 + M) * T``) or ``'nal'`` (``M * T``).
      dtype: compute dtype (e.g. ``jnp.bfloat16``); param_dtype: parameter dtype (float32).
      bn_axis_name: mapped axis name over which batch statistics are averaged in per-device
        (``pmap``/``shard_map``) steps; ``None`` under plain ``jit``.
      remat: rematerialise every residual unit in the backward pass (saves activation memory).
      in_channels: expected input channels.
      zero_init_residual: start every residual unit's branch at zero (the units'
        ``zero_init_last``, :mod:`resattn_jax.models.units`); off, as in the paper.
    """

    num_classes: int = 1000
    stage_widths: Sequence[int] = (256, 512, 1024)
    modules_per_stage: Sequence[int] = (1, 1, 1)
    mask_pools: Sequence[int] = (3, 2, 1)
    stage_strides: Sequence[int] = (1, 2, 2)
    extra_units_per_stage: int = 0
    final_width: int = 2048
    final_units: int = 3
    final_stride: int = 2
    stem: str = "imagenet"
    stem_width: int = 64
    unit: str = "preact"
    p: int = 1
    t: int = 2
    r: int = 1
    activation: str = "mixed"
    learning: str = "arl"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    remat: bool = False
    in_channels: int = 3
    zero_init_residual: bool = False

    # ------------------------------------------------------------------ configuration checks
    def _check_config(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unknown unit {self.unit!r}; choose one of {tuple(UNITS)}")
        if self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; choose one of {STEMS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown attention activation {self.activation!r}; choose one of {ACTIVATIONS}")
        if self.learning not in LEARNING:
            raise ValueError(f"unknown attention learning {self.learning!r}; choose one of {LEARNING}")
        n = len(self.stage_widths)
        if not (len(self.modules_per_stage) == len(self.mask_pools) == len(self.stage_strides) == n):
            raise ValueError("stage_widths, modules_per_stage, mask_pools and stage_strides need one entry per stage")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}")

    def _fits(self, size: int) -> bool:
        """Whether a square input of ``size`` pixels survives every soft mask's down-sampling."""
        if self.stem == "imagenet":
            size = pooled_size(pooled_size(size))
        for modules, pools, stride in zip(self.modules_per_stage, self.mask_pools, self.stage_strides):
            size = -(-size // stride)
            if modules and pools:
                before_last_pool = size
                for _ in range(pools - 1):
                    before_last_pool = pooled_size(before_last_pool)
                if before_last_pool < 2:
                    return False
        return size >= 1

    def min_input_size(self) -> int:
        """The smallest square input size the soft masks' down-sampling allows."""
        size = 1
        while not self._fits(size):
            size += 1
        return size

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected images of shape [N, H, W, {self.in_channels}] (NHWC), got shape {x.shape}")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels (NHWC), got {x.shape[-1]} in shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"expected floating-point images, got dtype {x.dtype}")
        if not (self._fits(x.shape[1]) and self._fits(x.shape[2])):
            m = self.min_input_size()
            raise ValueError(f"input {x.shape[1]}x{x.shape[2]} is too small for the soft masks' down-sampling; "
                             f"this network needs at least {m}x{m}")

    # ------------------------------------------------------------------ forward pass
    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``[N, H, W, in_channels]`` floats -> ``[N, num_classes]`` float32 logits."""
        self._check_config()
        self._check_input(x)
        unit_cls = UNITS[self.unit]
        preact = unit_cls.preactivation
        # The layers, chosen once here (the backend's choices happen inside ops).
        conv = functools.partial(ops.conv, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(ops.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.bn_axis_name)
        if self.remat:
            unit_cls = nn.remat(unit_cls)
        unit = functools.partial(unit_cls, norm=norm, conv=conv, zero_init_last=self.zero_init_residual)

        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = conv(self.stem_width, 7, 2, name="stem_conv")(x)
            x = norm_relu(norm, "stem_bn")(x)
            x = max_pool_3x3s2(x)
        else:
            x = conv(self.stem_width, 3, name="stem_conv")(x)
            if not preact:
                x = norm_relu(norm, "stem_bn")(x)

        for s, (width, modules, pools, stride) in enumerate(
                zip(self.stage_widths, self.modules_per_stage, self.mask_pools, self.stage_strides), start=1):
            x = unit(width, strides=stride, name=f"stage{s}_unit")(x)
            for i in range(self.extra_units_per_stage):
                x = unit(width, name=f"stage{s}_extra{i}")(x)
            for m in range(modules):
                x = AttentionModule(width, pools, unit=unit, norm=norm, conv=conv, preactivation=preact, p=self.p,
                                    t=self.t, r=self.r, activation=self.activation, learning=self.learning,
                                    name=f"stage{s}_attention{m}")(x)
            self.sow("intermediates", f"stage{s}", x)

        for i in range(self.final_units):
            x = unit(self.final_width, strides=self.final_stride if i == 0 else 1, name=f"final_unit{i}")(x)
        if preact:
            x = norm_relu(norm, "final_bn")(x)
        self.sow("intermediates", "final", x)
        x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(self.dtype)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="classifier")(x)
        return x.astype(jnp.float32)

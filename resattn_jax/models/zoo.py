"""The model zoo: every network is one ``functools.partial`` of :class:`ResidualAttentionNet`.

ImageNet networks follow the official release (docs/paper-facts.md §2). CIFAR networks use our
documented layout (README, "CIFAR layout"): stem conv3x3 (16), stages of 64/128/256 channels at
32/16/8 pixels with 2/1/1 soft-mask down-samplings, and three final units of 256 channels at 8x8.
Depth is ``36m + 20`` for ``m`` modules per stage.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from resattn_jax.models.network import ResidualAttentionNet

__all__ = ["MODELS", "create_model", "list_models"]

partial = functools.partial

_imagenet = partial(ResidualAttentionNet, num_classes=1000, stem="imagenet", stem_width=64,
                    stage_widths=(256, 512, 1024), mask_pools=(3, 2, 1), stage_strides=(1, 2, 2),
                    final_width=2048, final_units=3, final_stride=2)
_cifar = partial(ResidualAttentionNet, num_classes=10, stem="cifar", stem_width=16,
                 stage_widths=(64, 128, 256), mask_pools=(2, 1, 1), stage_strides=(1, 2, 2),
                 final_width=256, final_units=3, final_stride=1)

MODELS: dict[str, Callable[..., ResidualAttentionNet]] = {
    # ImageNet (224x224; Attention-92 is evaluated at 320x320).
    "attention56": partial(_imagenet, modules_per_stage=(1, 1, 1)),
    "attention92": partial(_imagenet, modules_per_stage=(1, 2, 3)),
    "attentionnext56": partial(_imagenet, modules_per_stage=(1, 1, 1), unit="next"),
    "attentioninception56": partial(_imagenet, modules_per_stage=(1, 1, 1), unit="inception"),
    # CIFAR (32x32): depth 36m + 20.
    "cifar_attention56": partial(_cifar, modules_per_stage=(1, 1, 1)),
    "cifar_attention92": partial(_cifar, modules_per_stage=(2, 2, 2)),
    "cifar_attention128": partial(_cifar, modules_per_stage=(3, 3, 3)),
    "cifar_attention164": partial(_cifar, modules_per_stage=(4, 4, 4)),
    "cifar_attention236": partial(_cifar, modules_per_stage=(6, 6, 6)),
    "cifar_attention452": partial(_cifar, modules_per_stage=(6, 6, 6), p=2, t=4, r=3),
    # Pre-activation ResNet-164 (18 bottlenecks per stage), the label-noise baseline.
    "cifar_preact_resnet164": partial(_cifar, modules_per_stage=(0, 0, 0), extra_units_per_stage=17, final_units=0),
    # A tiny network with every feature (3 stages, masks with 2/1/1 pools) for fast tests.
    "tiny": partial(_cifar, stem_width=8, stage_widths=(16, 32, 64), modules_per_stage=(1, 1, 1),
                    final_width=64, final_units=1),
    # The smallest network with the paper's parts (stem, one attention module whose soft mask pools
    # once, classifier): the training loop's tests and smoke runs, compiled in a third of tiny's time.
    "micro": partial(_cifar, stem_width=8, stage_widths=(16,), modules_per_stage=(1,), mask_pools=(1,),
                     stage_strides=(1,), final_width=16, final_units=0),
}

_FIELDS = tuple(f.name for f in dataclasses.fields(ResidualAttentionNet) if f.name not in ("parent", "name"))


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(MODELS)


def create_model(name: str, **overrides) -> ResidualAttentionNet:
    """Build a zoo network, e.g. ``create_model('attention56', num_classes=10, dtype=jnp.bfloat16)``.

    Any :class:`ResidualAttentionNet` field can be overridden. Raises ``ValueError`` for an unknown
    name or field.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}; options: {', '.join(_FIELDS)}")
    return MODELS[name](**overrides)

"""Batch-level regularisers applied on the device inside the train step: mixup, CutMix, Cutout and
label smoothing.

* **Mixup** (Zhang et al., ICLR 2018): ``x = lam * x + (1 - lam) * x[perm]``, targets mixed the
  same way, ``lam ~ Beta(mixup_alpha, mixup_alpha)``, one ``lam`` per batch.
* **CutMix** (Yun et al., ICCV 2019): a box of area ``1 - lam`` (``lam ~ Beta(cutmix_alpha,
  cutmix_alpha)``) pasted from ``x[perm]``; the targets use the box's actual area after clipping.
* With both alphas set, each batch takes CutMix with probability ``switch_prob``, else mixup (as
  timm does); ``prob`` is the probability that a batch is mixed at all.
* **Cutout** (DeVries & Taylor, 2017): a ``cutout`` x ``cutout`` square per image, centred
  uniformly in the image (so it may be clipped at the border), set to 0 (the mean, after
  normalisation).
* **Label smoothing** (Szegedy et al., CVPR 2016): targets ``(1 - eps) * y + eps / K``.

The partner of image ``i`` is image ``B - 1 - i`` (the batch reversed, as timm does): the batch's
order is already random. Every draw comes from ``jax.random.fold_in(key(seed), step)``, so a step's
augmentation depends only on the seed and the step: an exact resume reproduces it (tested).
In the per-device (``pmap``) mode each device mixes its own shard with its own draws.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

__all__ = ["MixConfig", "augment_batch", "check_mix_config", "default_mix_config", "soft_targets"]


def default_mix_config() -> ml_collections.ConfigDict:
    """``config.mix``: every regulariser off (the paper's recipe)."""
    return ml_collections.ConfigDict({
        "mixup_alpha": 0.0,   # > 0: mixup with lam ~ Beta(alpha, alpha)
        "cutmix_alpha": 0.0,  # > 0: CutMix with lam ~ Beta(alpha, alpha)
        "prob": 1.0,          # probability that a batch is mixed (when an alpha is set)
        "switch_prob": 0.5,   # with both alphas set: probability of CutMix rather than mixup
        "cutout": 0,          # > 0: side in pixels of a zeroed square per image (DeVries & Taylor: 16 on CIFAR-10)
        "seed": config_dict.placeholder(int),  # None: the run's seed
    })


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """The resolved batch regularisers of a train step (all off by default)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    cutout: int = 0
    label_smoothing: float = 0.0
    seed: int = 0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "MixConfig":
        mix = config.get("mix") or default_mix_config()
        return cls(float(mix.mixup_alpha), float(mix.cutmix_alpha), float(mix.prob), float(mix.switch_prob),
                   int(mix.cutout), float(config.get("label_smoothing", 0.0)),
                   int(config.seed if mix.seed is None else mix.seed))

    @property
    def mixes(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    @property
    def active(self) -> bool:
        return self.mixes or self.cutout > 0


def check_mix_config(config: ml_collections.ConfigDict) -> None:
    """``ValueError`` naming the first out-of-range field of ``config.mix`` / ``config.label_smoothing``."""
    mix = config.get("mix") or default_mix_config()
    for field in ("mixup_alpha", "cutmix_alpha"):
        if not float(mix[field]) >= 0:
            raise ValueError(f"--config.mix.{field}={mix[field]}: must be >= 0 (0: off)")
    for field in ("prob", "switch_prob"):
        if not 0 <= float(mix[field]) <= 1:
            raise ValueError(f"--config.mix.{field}={mix[field]}: must be in [0, 1]")
    if int(mix.cutout) < 0:
        raise ValueError(f"--config.mix.cutout={mix.cutout}: must be >= 0 (0: off)")
    smoothing = float(config.get("label_smoothing", 0.0))
    if not 0 <= smoothing < 1:
        raise ValueError(f"--config.label_smoothing={smoothing}: must be in [0, 1)")


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """``int [B]`` labels -> ``float32 [B, K]`` targets, smoothed: ``(1 - eps) * onehot + eps / K``."""
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return targets * (1.0 - smoothing) + smoothing / num_classes if smoothing else targets


def _box_mask(key: jax.Array, height: int, width: int, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """CutMix's box of area ``(1 - lam) * H * W`` at a uniform centre, clipped: ``(bool [H, W] inside,
    the kept fraction = 1 - clipped box area / (H * W))``."""
    ky, kx = jax.random.split(key)
    cut = jnp.sqrt(1.0 - lam)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    half_h = (cut * height / 2).astype(jnp.int32)
    half_w = (cut * width / 2).astype(jnp.int32)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = ((rows >= cy - half_h) & (rows < cy + half_h) & (cols >= cx - half_w) & (cols < cx + half_w))
    return inside, 1.0 - jnp.mean(inside.astype(jnp.float32))


def _cutout(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
    """Zero a ``size`` x ``size`` square per image, centred uniformly (clipped at the border)."""
    batch, height, width = images.shape[:3]
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (batch, 1, 1), 0, height)
    cx = jax.random.randint(kx, (batch, 1, 1), 0, width)
    rows, cols = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
    low, high = size // 2, size - size // 2
    inside = (rows >= cy - low) & (rows < cy + high) & (cols >= cx - low) & (cols < cx + high)
    return jnp.where(inside[..., None], jnp.zeros((), images.dtype), images)


def augment_batch(cfg: MixConfig, step: jax.Array, images: jax.Array, labels: jax.Array,
                  num_classes: int, device_index: jax.Array | int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Apply ``cfg`` to one batch at train step ``step``.

    ``images: [B, H, W, C]``, ``labels: int [B]`` -> ``(images [B, H, W, C], targets float32 [B, K],
    lam)``; the targets sum to 1 per row; ``lam`` is the weight of each image's own label (1 when the
    batch is not mixed). ``device_index`` separates the draws of the per-device mode's shards.
    """
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), step), device_index)
    k_apply, k_switch, k_mixup, k_cutmix, k_box, k_cutout = jax.random.split(key, 6)
    targets = soft_targets(labels, num_classes, cfg.label_smoothing)
    lam = jnp.ones((), jnp.float32)
    if cfg.mixes:
        partner_images, partner_targets = images[::-1], targets[::-1]
        use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
        if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
            use_cutmix = jax.random.uniform(k_switch) < cfg.switch_prob
        mixup_lam = (jax.random.beta(k_mixup, cfg.mixup_alpha, cfg.mixup_alpha) if cfg.mixup_alpha > 0
                     else jnp.ones(()))
        cutmix_lam = (jax.random.beta(k_cutmix, cfg.cutmix_alpha, cfg.cutmix_alpha) if cfg.cutmix_alpha > 0
                      else jnp.ones(()))
        inside, kept = _box_mask(k_box, images.shape[1], images.shape[2], cutmix_lam)
        mixed_up = mixup_lam.astype(images.dtype) * images + (1 - mixup_lam).astype(images.dtype) * partner_images
        cut_mixed = jnp.where(inside[None, :, :, None], partner_images, images)
        apply = jax.random.uniform(k_apply) < cfg.prob
        lam = jnp.where(apply, jnp.where(use_cutmix, kept, mixup_lam), 1.0).astype(jnp.float32)
        images = jnp.where(apply, jnp.where(use_cutmix, cut_mixed, mixed_up), images)
        targets = lam * targets + (1.0 - lam) * partner_targets
    if cfg.cutout > 0:
        images = _cutout(k_cutout, images, cfg.cutout)
    return images, targets, lam

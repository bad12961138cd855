"""Augmentation, decoding and normalisation of images: numpy (in memory) and tf (streaming).

Augmentations, for a train size ``S = image_size`` and an eval size ``E = eval_image_size``:

* ``cifar``: zero-pad by ``crop_padding``, random ``S x S`` crop, random horizontal flip if
  ``random_flip``. Eval: centre crop (or zero-pad) to ``E x E`` (the identity when ``E`` is the
  stored size).
* ``imagenet``: random-resized crop (area 8-100 % of the image, aspect ratio 3/4-4/3) resized
  bilinearly to ``S x S``, random flip if ``random_flip``. Eval: the central square of side
  0.875 x the shorter side, resized to ``E x E`` (up to rounding, resizing the shorter side to
  ``E / 0.875`` and centre-cropping ``E``). JPEGs decode only the crop. Streaming only.
* ``none``: centre crop (or zero-pad) to ``S x S`` / ``E x E``.

Images come out as ``(uint8 - mean) / std`` in float32, labels as int32. The numpy helpers work on
whole batches gathered from in-memory arrays; :func:`preprocess` maps one encoded example. Both
take their random draws from the pipeline (one stream for both paths: identical batches).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from resattn_jax.training.data._tensorflow import tf

from resattn_jax.training.data.sources import Source, normalisation, source_normalisation

__all__ = ["normalise"]

_EVAL_CROP = 0.875


# ----------------------------------------------------------------------------------------------- numpy
def center_crop_or_pad(images: np.ndarray, size: int) -> np.ndarray:
    """``[N, H, W, C] -> [N, size, size, C]`` as ``tf.image.resize_with_crop_or_pad`` (centred, zeros)."""
    for axis in (1, 2):
        extent = images.shape[axis]
        if extent > size:
            images = np.take(images, np.arange((extent - size) // 2, (extent - size) // 2 + size), axis=axis)
        elif extent < size:
            widths = [(0, 0)] * 4
            widths[axis] = ((size - extent) // 2, size - extent - (size - extent) // 2)
            images = np.pad(images, widths)
    return images


def crop(images: np.ndarray, index: np.ndarray, top: np.ndarray, left: np.ndarray, flip: np.ndarray,
         size: int) -> np.ndarray:
    """``images[index[b], top[b]:top[b]+size, left[b]:left[b]+size]``, mirrored where ``flip[b]``.

    ``images: [N, H, W, C]``, the others ``[B]``; returns ``[B, size, size, C]`` in one gather.
    """
    offsets = np.arange(size)
    rows = top[:, None] + offsets
    cols = left[:, None] + np.where(flip[:, None], size - 1 - offsets, offsets)
    return images[index[:, None, None], rows[:, :, None], cols[:, None, :]]


def normalise_images(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    out = images.astype(np.float32)
    out -= mean
    out /= std
    return out


def normalise(cfg, pixels: np.ndarray) -> np.ndarray:
    """``uint8 [..., C]`` pixels (e.g. decoded image files) -> float32, normalised as the pipeline does."""
    return normalise_images(np.asarray(pixels), *normalisation(cfg))


# ----------------------------------------------------------------------------------------- tf (streaming)
def _decode(encoded: tf.Tensor, channels: int, window: Callable[[tf.Tensor], tf.Tensor] | None = None) -> tf.Tensor:
    """Decode one image to ``uint8 [h, w, channels]``, cropped to ``window(shape) = [y, x, h, w]`` if given.

    JPEGs decode only the window; other formats (PNG, ...) are decoded whole, then cropped.
    """
    if window is None:
        return tf.io.decode_image(encoded, channels=channels, expand_animations=False)

    def jpeg():
        return tf.io.decode_and_crop_jpeg(encoded, window(tf.image.extract_jpeg_shape(encoded)), channels=channels)

    def other():
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        y, x, h, w = tf.unstack(window(tf.shape(image)))
        return image[y:y + h, x:x + w]

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def _random_window(shape: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random-resized-crop window ``[y, x, h, w]``: area 8-100 %, aspect ratio 3/4-4/3."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def _center_window(shape: tf.Tensor) -> tf.Tensor:
    """The central square window ``[y, x, s, s]`` with ``s = 0.875 * min(h, w)``."""
    side = tf.maximum(tf.cast(tf.round(_EVAL_CROP * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)), tf.int32), 1)
    return tf.stack([(shape[0] - side) // 2, (shape[1] - side) // 2, side, side])


def preprocess(source: Source, train: bool) -> Callable[..., dict]:
    """``(encoded, label, draws) -> {'image': float32 [S, S, C], 'label': int32}``.

    ``draws`` (training): this example's ``top``, ``left`` (float64 fractions of the crop span),
    ``flip`` (bool) from :func:`resattn_jax.training.data.pipeline.augment_draws`, the stream the
    in-memory path uses too, and ``seed`` (int64 [2], for ``imagenet``'s random window);
    ``None`` for evaluation.
    """
    cfg, channels = source.cfg, source.channels
    size = cfg.image_size if train else cfg.eval_image_size
    mean, std = (tf.constant(v, tf.float32) for v in source_normalisation(source))

    def offset(fraction, span):  # floor(u * (span + 1)) in float64, as the numpy path computes it
        return tf.cast(tf.floor(fraction * tf.cast(span + 1, tf.float64)), tf.int32)

    def fn(encoded, label, draws):
        if cfg.augment == "imagenet":
            window = (lambda shape: _random_window(shape, draws["seed"])) if train else _center_window
            image = tf.image.resize(_decode(encoded, channels, window), (size, size), method="bilinear")
        elif cfg.augment == "cifar" and train:
            pad = cfg.crop_padding
            image = tf.pad(_decode(encoded, channels), [[pad, pad], [pad, pad], [0, 0]])
            shape = tf.shape(image)
            top, left = offset(draws["top"], shape[0] - size), offset(draws["left"], shape[1] - size)
            image = image[top:top + size, left:left + size]
        else:
            image = tf.image.resize_with_crop_or_pad(_decode(encoded, channels), size, size)
        if train and cfg.augment != "none":
            image = tf.cond(draws["flip"], lambda: tf.reverse(image, [1]), lambda: image)
        image = (tf.cast(image, tf.float32) - mean) / std
        return {"image": tf.ensure_shape(image, (size, size, channels)), "label": tf.cast(label, tf.int32)}

    return fn

"""Run a restored network on chosen images and read what it computed inside.

Inputs come from the run's own evaluation splits (:func:`split_images`) or from image files
(:func:`read_images`), normalised exactly as the input pipeline normalises them. :func:`forward`
returns the logits together with every attention module's soft mask and every stage's output.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from resattn_jax.training.data._tensorflow import tf

from resattn_jax.ops.backend import compiler_options
from resattn_jax.training import data, loop, parallel

__all__ = ["Forward", "check_images", "display_pixels", "forward", "load", "read_images", "split_images"]


@dataclasses.dataclass(frozen=True)
class Forward:
    """One evaluation-mode forward pass, as float32 numpy arrays."""

    logits: np.ndarray  # [N, num_classes]
    soft_masks: dict[str, np.ndarray]  # 'stage{s}_attention{m}' -> [N, h, w, C], in network order
    stage_outputs: dict[str, np.ndarray]  # 'stage1'..'stageK', 'final' -> [N, h, w, C], in network order


def load(workdir: str, checkpoint: str | int = "best") -> loop.TrainedModel:
    """:func:`loop.load_trained` onto one device (inspection needs no replicas)."""
    return loop.load_trained(workdir, checkpoint, mesh=parallel.make_mesh(jax.devices()[:1]))


def check_images(trained: loop.TrainedModel, images: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``images`` is ``[N, H, W, C]`` with the run's evaluation image shape."""
    expected = trained.info.eval_image_shape
    if np.ndim(images) != 4 or tuple(np.shape(images)[1:]) != expected:
        raise ValueError(f"images of shape {tuple(np.shape(images))}: this network takes [N, {expected[0]}, "
                         f"{expected[1]}, {expected[2]}] (the run's evaluation image shape)")


def split_images(trained: loop.TrainedModel, split: str, num: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num`` images of the run's ``split`` ('validation' or 'test'), as evaluation sees them.

    Returns normalised ``float32 [n, H, W, C]`` images and ``int32 [n]`` labels, ``n = min(num, split size)``.
    """
    if num < 1:
        raise ValueError(f"the number of images must be positive, got {num}")
    batch = next(iter(data.eval_batches(trained.config.data, split, num)), None)
    if batch is None:
        raise ValueError(f"the run of {trained.checkpoint} has no {split} split")
    return batch["image"][batch["mask"]], batch["label"][batch["mask"]]


def read_images(trained: loop.TrainedModel, paths: Sequence[str]) -> np.ndarray:
    """PNG/JPEG/GIF/BMP/WebP files -> normalised ``float32 [N, H, W, C]``, as the input pipeline normalises.

    Each file must already have the run's evaluation image size and channel count (1 = grey,
    3 = RGB): nothing is resized or converted.
    """
    height, width, channels = trained.info.eval_image_shape
    images = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                encoded = f.read()
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e.strerror}") from None
        try:
            image = tf.io.decode_image(encoded, expand_animations=False).numpy()
        except tf.errors.InvalidArgumentError:
            raise ValueError(f"cannot decode image {path}: not a PNG, JPEG, GIF, BMP or WebP file") from None
        if image.shape[:2] != (height, width):
            raise ValueError(f"image {path} is {image.shape[0]}x{image.shape[1]}; this network takes "
                             f"{height}x{width} images")
        if image.shape[2] != channels:
            raise ValueError(f"image {path} has {image.shape[2]} channels; this network takes {channels}-channel "
                             f"images ({'grey' if channels == 1 else 'RGB' if channels == 3 else 'as trained'})")
        images.append(image)
    if not images:
        raise ValueError("no image files given")
    return data.normalise(trained.config.data, np.stack(images))


def display_pixels(trained: loop.TrainedModel, images: np.ndarray) -> np.ndarray:
    """Normalised images back to displayable ``float32 [N, H, W, C]`` pixels in [0, 1]."""
    mean, std = data.normalisation(trained.config.data)
    return np.clip((np.asarray(images, np.float32) * std + mean) / 255.0, 0.0, 1.0)


def _network_order(name: str) -> tuple:
    """Sort key: 'stage2_attention10' after 'stage2_attention9'; 'final' last."""
    return tuple(int(n) for n in re.findall(r"\d+", name)) or (float("inf"),)


def forward(trained: loop.TrainedModel, images: np.ndarray) -> Forward:
    """Evaluation-mode forward pass of normalised ``images: [N, H, W, C]`` with its intermediates."""
    check_images(trained, images)
    apply = jax.jit(lambda variables, x: trained.model.apply(variables, x, train=False, mutable=["intermediates"]),
                    compiler_options=compiler_options())
    logits, state = apply(trained.variables, jnp.asarray(images, jnp.float32))
    intermediates = jax.device_get(state["intermediates"])
    soft_masks, stage_outputs = {}, {}
    for name in sorted(intermediates, key=_network_order):
        value = intermediates[name]
        if isinstance(value, dict):  # an attention module's collection: {'soft_mask': (mask,)}
            soft_masks[name] = np.asarray(value["soft_mask"][0], np.float32)
        else:  # a stage output: (output,)
            stage_outputs[name] = np.asarray(value[0], np.float32)
    return Forward(np.asarray(logits, np.float32), soft_masks, stage_outputs)

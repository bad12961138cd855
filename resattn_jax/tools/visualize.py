"""Soft-mask figure: each attention module's mask over the input images (the paper's Fig. 1).

    python -m resattn_jax.visualize --workdir /tmp/digits --out masks.png
    python -m resattn_jax.visualize --workdir /tmp/digits --images a.png b.png --checkpoint latest --out masks.png

One row per image: the input, then per attention module its soft mask averaged over channels,
up-sampled bilinearly to the image and overlaid as a heat map. One colour scale for the whole
figure by default (0..1, the range of the sigmoid masks, widened to the data where a mask leaves
it), so that columns compare; ``--scale column`` gives each module its own (its colour bar shows
it). A caption says what high and low mean. Without ``--images``, the first ``--num-images`` test
images are shown.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
from matplotlib.figure import Figure

from resattn_jax.tools import figures, inference
from resattn_jax.training import loop

__all__ = ["main", "mask_maps", "soft_mask_figure", "soft_mask_maps"]


def mask_maps(soft_masks: dict[str, np.ndarray], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Soft masks ``[N, h, w, C]`` -> channel means up-sampled bilinearly to ``size``: ``[N, H, W]``.

    Bilinear weights are a convex combination, so the maps keep the masks' range ([0, 1] for the
    sigmoid activations 'mixed' and 'spatial').
    """
    maps = {}
    for name, mask in soft_masks.items():
        mean = mask.mean(axis=-1)
        maps[name] = np.asarray(jax.image.resize(mean, (mean.shape[0], *size), method="linear"), np.float32)
    return maps


def soft_mask_maps(trained: loop.TrainedModel, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every attention module's channel-mean soft mask on the image grid: ``{module: [N, H, W]}``.

    ``images``: normalised ``[N, H, W, C]`` (e.g. from :func:`inference.split_images`); modules in
    network order, named ``stage{s}_attention{m}``.
    """
    return mask_maps(inference.forward(trained, images).soft_masks, np.shape(images)[1:3])


SCALES = ("shared", "column")
CAPTION = ("Colour: the soft mask M averaged over channels. High (red): the module amplifies the trunk's "
           "features there, up to 2x with attention residual learning, (1 + M) * T; low (blue): it passes "
           "them as they are (with naive attention learning, M * T, it suppresses them).")


def soft_mask_figure(pixels: np.ndarray, maps: dict[str, np.ndarray], row_labels: list[str],
                     scale: str = "shared") -> Figure:
    """Rows: ``pixels[i]`` (``[N, H, W, C]`` in [0, 1]), then each ``maps[name][i]`` over it as a heat map.

    ``scale='shared'``: one colour scale, 0..1 widened to the maps' range, one colour bar;
    ``'column'``: each module's own range and colour bar.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}")
    rows, columns = len(pixels), 1 + len(maps)
    figure = figures.new_figure(1.8 * columns, 1.8 * rows + 1.2)
    if maps:
        shared = (min(0.0, *(float(v.min()) for v in maps.values())),
                  max(1.0, *(float(v.max()) for v in maps.values())))
    axes = figure.subplots(rows, columns, squeeze=False)
    grey = pixels.shape[-1] == 1
    for i in range(rows):
        shown = pixels[i, ..., 0] if grey else pixels[i]
        axes[i, 0].imshow(shown, cmap="gray" if grey else None, vmin=0.0, vmax=1.0)
        axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
        for j, (name, values) in enumerate(maps.items(), start=1):
            low, high = shared if scale == "shared" else (float(values.min()), float(values.max()))
            axes[i, j].imshow(shown, cmap="gray" if grey else None, vmin=0.0, vmax=1.0)
            heat = axes[i, j].imshow(values[i], cmap="jet", alpha=0.55, vmin=low, vmax=max(high, low + 1e-6))
            if i == rows - 1 and scale == "column":
                figure.colorbar(heat, ax=axes[:, j], orientation="horizontal", shrink=0.9, aspect=12)
    if maps and scale == "shared":
        figure.colorbar(heat, ax=axes[:, 1:], orientation="horizontal", shrink=0.6, aspect=30,
                        label="soft mask (channel mean), one scale for all modules")
    figure.text(0.5, 0.005, CAPTION, ha="center", va="bottom", fontsize=6, wrap=True)
    axes[0, 0].set_title("input", fontsize=9)
    for j, name in enumerate(maps, start=1):
        axes[0, j].set_title(f"{name}\nsoft mask", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resattn_jax.visualize", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="training workdir (checkpoints/, config.json)")
    parser.add_argument("--checkpoint", default="best", help="'best' (default), 'latest' or a step")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", nargs="+", metavar="FILE",
                        help="image files (PNG/JPEG) of the run's evaluation size and channels")
    source.add_argument("--num-images", type=int, default=4, help="first test images shown without --images")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--scale", default="shared", choices=SCALES,
                        help="one colour scale for the figure (default: 0..1, widened to the data) or one per module")
    args = parser.parse_args(argv)
    try:
        trained = inference.load(args.workdir, args.checkpoint)
        if args.images:
            images, row_labels = inference.read_images(trained, args.images), [os.path.basename(p) for p in args.images]
        else:
            images, labels = inference.split_images(trained, "test", args.num_images)
            row_labels = [f"test #{i}, label {label}" for i, label in enumerate(labels)]
        maps = soft_mask_maps(trained, images)
    except (ValueError, loop.CheckpointError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if not maps:
        parser.exit(2, f"{parser.prog}: error: the network of {trained.checkpoint} has no attention modules\n")
    path = figures.save(soft_mask_figure(inference.display_pixels(trained, images), maps, row_labels, args.scale),
                        args.out)
    print(f"wrote {path}: the soft masks of {len(images)} images ({', '.join(maps)}) of {trained.checkpoint} "
          f"(step {trained.step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

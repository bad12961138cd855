"""``digits``: scikit-learn's handwritten digits as an offline tensorflow-datasets dataset.

The 1,797 real 8x8 scans of ``sklearn.datasets.load_digits()`` (grey levels 0..16, 10 classes),
scaled to 0..255 and up-sampled bilinearly (half-pixel centres, as ``tf.image.resize``) to
``image: uint8 [32, 32, 1]``, ``label: ClassLabel(10)``. One fixed permutation (numpy seed 0) splits
them into ``train`` 1,257 / ``validation`` 180 / ``test`` 360 (70 / 10 / 20 %, not stratified).

Nothing is downloaded: the data ships inside scikit-learn, so ``download_and_prepare()`` takes a few
seconds. Importing this module registers the builder with tfds (``tfds.builder('digits')``).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

__all__ = ["Digits", "IMAGE_SIZE", "SPLIT_SIZES"]

IMAGE_SIZE = 32
SPLIT_SIZES = {"train": 1257, "validation": 180, "test": 360}


def _images_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 examples: ``uint8 [1797, 32, 32, 1]`` images and ``int64 [1797]`` labels."""
    from sklearn.datasets import load_digits  # only when the dataset is prepared (a second of imports)

    digits = load_digits()
    from resattn_jax.training.data._tensorflow import tf

    scaled = digits.images[..., None].astype(np.float32) * (255.0 / 16.0)  # [N, 8, 8, 1]
    resized = tf.image.resize(scaled, (IMAGE_SIZE, IMAGE_SIZE), method="bilinear").numpy()
    return np.clip(np.round(resized), 0, 255).astype(np.uint8), digits.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits, up-sampled to 32x32, in fixed 70/10/20 splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        images, labels = _images_and_labels()
        order = np.random.default_rng(0).permutation(len(labels))
        ends = np.cumsum(list(SPLIT_SIZES.values()))
        parts = np.split(order, ends[:-1])
        return {name: self._generate_examples(images, labels, part) for name, part in zip(SPLIT_SIZES, parts)}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}

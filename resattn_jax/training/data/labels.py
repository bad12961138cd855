"""Label noise (the paper's noisy-label experiment on CIFAR-10).

A fraction ``label_noise = 1 - r`` of the training labels is replaced through the confusion matrix
``Q_ii = r``, ``Q_ij = (1 - r) / (K - 1)`` (:func:`corrupt_labels`); validation and test labels stay
clean. In-memory datasets only (the pipeline applies it to the training split's label array).
"""

from __future__ import annotations

import numpy as np

__all__ = ["corrupt_labels"]


def corrupt_labels(labels: np.ndarray, num_classes: int, noise: float, seed: int) -> np.ndarray:
    """A copy of ``labels: int [N]`` with exactly ``round(noise * N)`` of them changed.

    The changed positions are a uniformly random subset and each gets a uniformly random *other*
    class, so every label independently follows the confusion matrix ``Q_ii = 1 - noise``,
    ``Q_ij = noise / (K - 1)``, and the realised noise rate is exact. Deterministic in ``seed``.
    """
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {noise}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    changed = rng.permutation(len(labels))[:round(noise * len(labels))]
    out = labels.copy()
    out[changed] = (labels[changed] + rng.integers(1, num_classes, len(changed))) % num_classes
    return out

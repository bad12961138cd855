"""Input pipeline: tfds image-classification datasets, augmentation, label noise, batching.

One concept a module:

* :mod:`.config` — constants, :class:`DatasetInfo`, :func:`default_data_config`, :func:`data_preset`
  (no TensorFlow);
* :mod:`.sources` — resolving a configuration to its tfds dataset: :func:`dataset_info`,
  :func:`normalisation`;
* :mod:`.augment` — decoding, augmentation (documented there) and :func:`normalise`;
* :mod:`.labels` — label noise, :func:`corrupt_labels`;
* :mod:`.pipeline` — batching, determinism and multi-process slicing: :func:`train_batches`,
  :func:`eval_batches`, :func:`num_eval_batches`, and the training order and random draws both
  paths share, :func:`epoch_order`, :func:`augment_draws`;
* :mod:`.folder` — image folders: scanned, checked and cached (:func:`forget_scans`) and their
  preset;
* :mod:`.digits` — the offline ``digits`` tfds builder.

The configuration names are imported eagerly; the others load their module (and TensorFlow) on first
access, so ``from resattn_jax.training.data import data_preset`` stays light.
"""

from __future__ import annotations

import importlib

from resattn_jax.training.data.config import (AUGMENTS, EVAL_SPLITS, IMAGENET_MEAN, IMAGENET_STD, DatasetInfo,
                                              data_preset, default_data_config)

__all__ = ["AUGMENTS", "EVAL_SPLITS", "IMAGENET_MEAN", "IMAGENET_STD", "DatasetInfo", "augment_draws", "corrupt_labels",
           "data_preset", "dataset_info", "default_data_config", "epoch_order", "eval_batches", "forget_scans",
           "normalisation", "normalise", "num_eval_batches", "train_batches"]

#: Public names defined outside :mod:`.config` -> the submodule that defines them (imported on first use).
_LAZY = {
    "corrupt_labels": "labels",
    "dataset_info": "sources",
    "forget_scans": "folder",
    "normalisation": "sources",
    "normalise": "augment",
    "augment_draws": "pipeline",
    "epoch_order": "pipeline",
    "eval_batches": "pipeline",
    "num_eval_batches": "pipeline",
    "train_batches": "pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""Data configuration: constants, :class:`DatasetInfo`, the default fields and per-dataset presets.

The configuration is an ``ml_collections.ConfigDict`` (:func:`default_data_config` lists its fields;
:func:`data_preset` fills them in for a dataset). This module imports neither TensorFlow nor
tensorflow-datasets, so configs and launchers can use it cheaply.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

__all__ = ["AUGMENTS", "EVAL_SPLITS", "IMAGENET_MEAN", "IMAGENET_STD", "DatasetInfo", "data_preset",
           "default_data_config"]

AUGMENTS = ("cifar", "imagenet", "none")
EVAL_SPLITS = ("validation", "test")
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

FOLDER = "folder:"  # name prefix of image-folder datasets, 'folder:/root'
STREAMING = ("imagenet2012",)  # datasets streamed by default (besides folders)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a configured dataset."""

    num_classes: int
    image_shape: tuple[int, int, int]  # training images as yielded, (H, W, C)
    eval_image_shape: tuple[int, int, int]
    num_train: int
    num_validation: int  # 0 when there is no validation split
    num_test: int
    class_names: tuple[str, ...] = ()  # by label index: tfds's ClassLabel names, a folder's class directories


def default_data_config() -> ml_collections.ConfigDict:
    """Every data field with its default (the offline ``digits`` dataset, CIFAR-style augmentation)."""
    return ml_collections.ConfigDict({
        "name": "digits",        # tfds name, 'digits', or 'folder:/root' (root/split/label/image.jpg)
        # Fields whose default is None are typed placeholders, so that the command line can set them
        # (e.g. --config.data.mean='(72.9,)').
        "data_dir": config_dict.placeholder(str),  # tfds data_dir (None: tfds's default, ~/tensorflow_datasets)
        "train_split": "train",  # tfds split strings; validation is held out from the training data
        "validation_split": "validation",  # '' or None: no such split
        "test_split": "test",
        "image_size": 32,        # training crop
        "eval_image_size": 32,
        "augment": "cifar",      # one of AUGMENTS
        "crop_padding": 4,       # 'cifar': zero padding before the random crop
        "random_flip": True,
        "mean": config_dict.placeholder(tuple),  # per-channel, 0..255 units; None: computed from the
        "std": config_dict.placeholder(tuple),   # training split (in-memory datasets only)
        "label_noise": 0.0,      # fraction of training labels corrupted, in [0, 1)
        "label_noise_seed": 0,
        "in_memory": config_dict.placeholder(bool),  # None: True except for imagenet2012 and folders
        # Image folders only (data/folder.py): images decoded to this many channels (1 grey, 3 colour;
        # None: as most training images are), and what a bad image does: 'error' stops, 'skip' leaves it out.
        "channels": config_dict.placeholder(int),
        "on_bad_image": "error",
        # Examples; None: the whole split (a uniform shuffle; streaming holds it all).
        "shuffle_buffer": config_dict.placeholder(int),
        "prefetch": 2,           # batches prepared ahead
    })


def data_preset(name: str) -> ml_collections.ConfigDict:
    """:func:`default_data_config` with the usual splits, sizes and augmentation of ``name``.

    * ``digits``: ``train`` / ``validation`` / ``test``, 32x32, 2-pixel padding, no flips (a mirrored
      digit is another symbol).
    * ``cifar10``, ``cifar100``: ``train[5000:]`` / ``train[:5000]`` / ``test``, 32x32, 4-pixel padding.
    * ``imagenet2012``: ``train[10000:]`` / ``train[:10000]`` / ``validation``, ``imagenet``
      augmentation at 224, ImageNet mean/std, streaming through a 10,000-example shuffle buffer.
    * ``folder:/root``: by the images' size (:func:`resattn_jax.training.data.folder.preset`, which
      scans the folder): up to 64 pixels a side CIFAR-style at their own size, in memory; above,
      ImageNet-style at 224, streamed. Splits ``train`` / ``validation`` / ``test`` where those
      sub-folders exist (image folders take no slicing); normalisation computed from the images.
    * any other tfds name: ``train[10%:]`` / ``train[:10%]`` / ``test`` at 32x32; adjust as needed.
    """
    cfg = default_data_config()
    cfg.name = name
    if name == "digits":
        cfg.crop_padding, cfg.random_flip = 2, False
    elif name in ("cifar10", "cifar100"):
        cfg.train_split, cfg.validation_split = "train[5000:]", "train[:5000]"
    elif name.startswith(FOLDER):
        from resattn_jax.training.data import folder  # scans the folder (TensorFlow decodes its images)

        cfg.update(folder.preset(name[len(FOLDER):]))
    elif name == "imagenet2012":
        cfg.train_split, cfg.validation_split, cfg.test_split = "train[10000:]", "train[:10000]", "validation"
        cfg.image_size, cfg.eval_image_size, cfg.augment = 224, 224, "imagenet"
        cfg.mean, cfg.std = IMAGENET_MEAN, IMAGENET_STD
        cfg.shuffle_buffer = 10_000
    else:
        cfg.train_split, cfg.validation_split = "train[10%:]", "train[:10%]"
    return cfg

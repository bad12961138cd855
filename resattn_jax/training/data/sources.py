"""Datasets through tensorflow-datasets: checking a configuration and resolving it to its builder.

``cfg.name`` is a tfds name (prepared on first use, or a one-line ``ValueError`` saying what is
missing), ``digits`` (the offline builder of :mod:`.digits`, registered by importing this module) or
``folder:/root`` (an image folder, ``root/split/label/image.jpg``, scanned and checked by
:mod:`.folder` before anything else happens). A resolved :class:`Source` reads
a split as encoded ``(image, label)`` pairs (streaming) or as whole ``uint8`` arrays (in memory),
counts its examples and gives the per-channel normalisation statistics; arrays and statistics of
datasets prepared on disk are kept per process.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Callable

import ml_collections
import numpy as np
import tensorflow_datasets as tfds  # imports TensorFlow only when it reads data

from resattn_jax.training.data import digits  # noqa: F401  (registers the 'digits' builder)
from resattn_jax.training.data import folder
from resattn_jax.training.data.config import AUGMENTS, FOLDER, STREAMING, DatasetInfo

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = ["dataset_info", "normalisation"]


@dataclasses.dataclass(frozen=True)
class Source:
    """A checked configuration resolved to its tfds builder, or to its checked image folder."""

    cfg: ml_collections.ConfigDict
    builder: tfds.core.DatasetBuilder | None
    image_key: str
    num_classes: int
    channels: int
    in_memory: bool
    folder: folder.FolderData | None = None


_ARRAYS: dict[tuple, object] = {}  # split arrays and pixel statistics of prepared datasets, kept per process


def _tensorflow():
    """TensorFlow, imported when data is first read (through :mod:`._tensorflow`, its fast start):
    checking a configuration of a prepared dataset needs only tfds's metadata."""
    from resattn_jax.training.data._tensorflow import tf

    return tf


def _builder(cfg) -> tfds.core.DatasetBuilder:
    name = cfg.name
    try:
        builder = tfds.builder(name, data_dir=cfg.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown dataset {name!r}: not a tfds dataset, 'digits' or 'folder:/path'") from None
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception as e:
            manual = os.path.join(cfg.data_dir or "~/tensorflow_datasets", "downloads", "manual")
            if name == "imagenet2012":
                raise ValueError(f"imagenet2012 is not prepared in {builder.data_dir}: put ILSVRC2012_img_train.tar "
                                 f"and ILSVRC2012_img_val.tar in {manual} and run again (nothing is downloaded)") from e
            if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
                raise ValueError(f"{name} is not prepared in {builder.data_dir}: it needs manual files in {manual} "
                                 f"(see the tfds catalogue page of {name})") from e
            first_line = (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"could not prepare {name} in {builder.data_dir}: {first_line}") from e
    return builder


def _check_split(builder, split: str, field: str) -> None:
    try:
        tfds.core.ReadInstruction.from_spec(split)
    except (ValueError, TypeError):
        raise ValueError(f"bad {field} {split!r}: not a tfds split string such as 'train' or 'train[:5000]'") from None
    known = list(builder.info.splits.keys())  # empty when tfds is mocked
    names = {part.split("[")[0].strip() for part in split.split("+")}
    if known and not names <= set(known):
        raise ValueError(f"bad {field} {split!r}: the splits of this dataset are {known}")


def resolve(cfg) -> Source:
    """Check ``cfg`` and find its dataset; every configuration error is a one-line ``ValueError``."""
    if cfg.augment not in AUGMENTS:
        raise ValueError(f"unknown augment {cfg.augment!r}; choose one of {AUGMENTS}")
    if not 0.0 <= cfg.label_noise < 1.0:
        raise ValueError(f"--config.data.label_noise={cfg.label_noise}: must be in [0, 1)")
    for field in ("image_size", "eval_image_size"):
        if cfg[field] <= 0:
            raise ValueError(f"--config.data.{field}={cfg[field]}: must be > 0")
    for field in ("crop_padding", "prefetch"):
        if cfg[field] < 0:
            raise ValueError(f"--config.data.{field}={cfg[field]}: must be >= 0")
    on_bad_image = cfg.get("on_bad_image", "error")  # (absent from the config.json of runs written before it)
    if on_bad_image not in folder.BAD_IMAGE_POLICIES:
        raise ValueError(f"--config.data.on_bad_image={on_bad_image!r}: choose one of {folder.BAD_IMAGE_POLICIES}")
    in_memory = cfg.in_memory
    if in_memory is None:
        in_memory = not (cfg.name in STREAMING or cfg.name.startswith(FOLDER))
    if cfg.name.startswith(FOLDER):
        return _resolve_folder(cfg, in_memory)
    if not in_memory and (cfg.mean is None or cfg.std is None):
        raise ValueError(f"streaming dataset {cfg.name!r} needs explicit mean and std (e.g. IMAGENET_MEAN/STD)")
    if cfg.shuffle_buffer is not None and cfg.shuffle_buffer <= 0:
        raise ValueError(f"--config.data.shuffle_buffer={cfg.shuffle_buffer}: must be > 0, or None (the whole split)")
    if not in_memory and cfg.label_noise:
        raise ValueError("label_noise needs an in-memory dataset (in_memory=True)")
    if in_memory and cfg.augment == "imagenet":
        raise ValueError("augment 'imagenet' decodes variable-size images: use a streaming dataset (in_memory=False)")

    builder = _builder(cfg)
    supervised = builder.info.supervised_keys
    if not supervised or len(supervised) != 2:
        raise ValueError(f"dataset {cfg.name!r} has no (image, label) supervised keys")
    image_key, label_key = supervised
    image_feature, label_feature = builder.info.features[image_key], builder.info.features[label_key]
    if not isinstance(image_feature, tfds.features.Image) or not isinstance(label_feature, tfds.features.ClassLabel):
        raise ValueError(f"dataset {cfg.name!r} is not an image-classification dataset")
    if in_memory and None in image_feature.shape[:2]:
        raise ValueError(f"dataset {cfg.name!r} has variable-size images: set in_memory=False")
    channels = image_feature.shape[-1] or 3
    if cfg.get("channels") is not None and cfg.channels != channels:
        raise ValueError(f"--config.data.channels={cfg.channels}: {cfg.name!r} has {channels}-channel images "
                         "(channels converts image folders only)")
    for field in ("mean", "std"):
        if cfg[field] is not None and len(cfg[field]) != channels:
            raise ValueError(f"{field} has {len(cfg[field])} values for {channels}-channel images")
    _check_split(builder, cfg.train_split, "train_split")
    for field in ("validation_split", "test_split"):
        if cfg[field]:
            _check_split(builder, cfg[field], field)
    return Source(cfg, builder, image_key, label_feature.num_classes, channels, in_memory)


def _resolve_folder(cfg, in_memory: bool) -> Source:
    """An image folder: scanned (cached), checked against ``cfg`` (:func:`folder.check`)."""
    if in_memory and cfg.augment == "imagenet":
        raise ValueError("augment 'imagenet' decodes variable-size images: use a streaming dataset (in_memory=False)")
    splits = {"train_split": cfg.train_split, "validation_split": cfg.validation_split, "test_split": cfg.test_split}
    for field, split in splits.items():
        if split and not split.isidentifier():
            raise ValueError(f"bad {field} {split!r}: image folders take plain split names (sub-folders such as "
                             "'train', 'validation', 'test')")
    used = tuple(dict.fromkeys(split for split in splits.values() if split))
    data = folder.check(folder.scan(cfg.name[len(FOLDER):]), cfg, used)
    for field in ("mean", "std"):
        if cfg[field] is not None and len(cfg[field]) != data.channels:
            raise ValueError(f"{field} has {len(cfg[field])} values for {data.channels}-channel images")
    return Source(cfg, None, "image", len(data.classes), data.channels, in_memory, data)


def tfds_split(source: Source, split: str) -> tf.data.Dataset:
    """``(encoded image, label)`` pairs of ``split`` in their stored order (as :func:`read_arrays` reads them)."""
    tf = _tensorflow()
    if source.folder is not None:
        paths, labels = zip(*source.folder.files[split]) if source.folder.files[split] else ((), ())
        files = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), tf.constant(labels, tf.int64)))
        return files.map(lambda path, label: (tf.io.read_file(path), label), num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    return source.builder.as_dataset(
        split=split, as_supervised=True, shuffle_files=False, decoders={source.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(options=options))


def num_examples(source: Source, split: str | None) -> int:
    if not split:
        return 0
    if source.folder is not None:
        return len(source.folder.files[split])
    try:  # from the prepared dataset's metadata: no TensorFlow needed yet (it takes seconds to import)
        return int(source.builder.info.splits[split].num_examples)
    except (KeyError, ValueError, TypeError, AttributeError):  # e.g. a mocked dataset: count the records
        pass
    _tensorflow()
    count = int(source.builder.as_dataset(split=split).cardinality())
    if count < 0:
        raise ValueError(f"cannot count the examples of split {split!r} of {source.cfg.name!r}")
    return count


def _memoised(source: Source, key: tuple, compute: Callable[[], object]) -> object:
    """``compute()``, kept per process for datasets prepared on disk (mocked ones are re-read)."""
    if source.folder is not None:
        key = (source.folder.signature, *key)
    elif not source.builder.is_prepared():
        return compute()
    else:
        key = (str(source.builder.data_path), *key)
    if key not in _ARRAYS:
        _ARRAYS[key] = compute()
    return _ARRAYS[key]


def read_arrays(source: Source, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``split`` as read-only ``uint8 [N, H, W, C]`` images and ``int64 [N]`` labels."""

    def read():
        if source.folder is not None:
            images, labels = folder.decode_split(source.folder, split)
            images.flags.writeable = labels.flags.writeable = False
            return images, labels
        _tensorflow()
        ds = source.builder.as_dataset(split=split, as_supervised=True)
        images, labels = next(iter(tfds.as_numpy(ds.batch(max(num_examples(source, split), 1)))))
        images, labels = np.asarray(images, np.uint8), np.asarray(labels, np.int64)
        images.flags.writeable = labels.flags.writeable = False
        return images, labels

    return _memoised(source, ("arrays", split), read)


def source_normalisation(source: Source) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``mean, std`` (float32 ``[C]``): configured, or over the training split's pixels."""
    cfg = source.cfg
    if cfg.mean is not None and cfg.std is not None:
        return np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
    if source.folder is not None:  # from the scan's pixel sums
        return (np.asarray(cfg.mean, np.float32) if cfg.mean is not None else source.folder.mean,
                np.asarray(cfg.std, np.float32) if cfg.std is not None else source.folder.std)

    def compute():
        images, _ = read_arrays(source, cfg.train_split)
        pixels = images.reshape(-1, images.shape[-1])
        total, squares = np.zeros(pixels.shape[1]), np.zeros(pixels.shape[1])
        for start in range(0, len(pixels), 1 << 20):
            chunk = pixels[start:start + (1 << 20)].astype(np.float64)
            total += chunk.sum(0)
            squares += np.square(chunk).sum(0)
        mean = total / len(pixels)
        return mean.astype(np.float32), np.sqrt(np.maximum(squares / len(pixels) - mean**2, 1e-12)).astype(np.float32)

    mean, std = _memoised(source, ("stats", cfg.train_split), compute)
    return (np.asarray(cfg.mean, np.float32) if cfg.mean is not None else mean,
            np.asarray(cfg.std, np.float32) if cfg.std is not None else std)


def dataset_info(cfg) -> DatasetInfo:
    """Classes, yielded image shapes and split sizes of the configured dataset (checks ``cfg``)."""
    source = resolve(cfg)
    return DatasetInfo(
        num_classes=source.num_classes,
        image_shape=(cfg.image_size, cfg.image_size, source.channels),
        eval_image_shape=(cfg.eval_image_size, cfg.eval_image_size, source.channels),
        num_train=num_examples(source, cfg.train_split),
        num_validation=num_examples(source, cfg.validation_split),
        num_test=num_examples(source, cfg.test_split),
        class_names=tuple(source.folder.classes) if source.folder is not None else tuple(
            source.builder.info.features[source.builder.info.supervised_keys[1]].names))


def normalisation(cfg) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel ``mean, std`` (float32 ``[C]``, 0..255 units) the pipeline normalises with.

    ``cfg.mean``/``cfg.std`` where given, else computed over the training split's pixels.
    """
    return source_normalisation(resolve(cfg))

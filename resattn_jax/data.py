"""Input pipeline: tfds image-classification datasets, augmentation, label noise, batching.

The configuration is an ``ml_collections.ConfigDict`` (:func:`default_data_config` lists its fields;
:func:`data_preset` fills them in for a dataset). Two paths, chosen by ``cfg.in_memory``:

* **in memory** (default for everything but ``imagenet2012`` and folders): each split is read once
  through tfds into ``uint8 [N, H, W, C]`` numpy arrays; batches are gathered, cropped and flipped
  by vectorised numpy indexing in a background thread that keeps ``cfg.prefetch`` batches ready.
  Augmentations ``cifar`` and ``none``.
* **streaming**: tf.data over the encoded examples (files shuffled by a seed), a seeded shuffle
  buffer, then decoding and augmentation in a parallel map with stateless random ops. Augmentations
  ``imagenet``, ``cifar`` and ``none``; ``mean`` and ``std`` must be given.

Augmentations, for a train size ``S = image_size`` and an eval size ``E = eval_image_size``:

* ``cifar``: zero-pad by ``crop_padding``, random ``S x S`` crop, random horizontal flip if
  ``random_flip``. Eval: centre crop (or zero-pad) to ``E x E`` (the identity when ``E`` is the
  stored size).
* ``imagenet``: random-resized crop (area 8-100 % of the image, aspect ratio 3/4-4/3) resized
  bilinearly to ``S x S``, random flip if ``random_flip``. Eval: the central square of side
  0.875 x the shorter side, resized to ``E x E`` (up to rounding, resizing the shorter side to
  ``E / 0.875`` and centre-cropping ``E``). JPEGs decode only the crop.
* ``none``: centre crop (or zero-pad) to ``S x S`` / ``E x E``.

Images come out as ``(uint8 - mean) / std`` in float32, labels as int32.

Determinism. Training batches are a pure function of ``(cfg, global_batch_size, seed, step)``:
epoch ``e`` = ``step // steps_per_epoch`` draws its order from ``(seed, e)`` and each example's
augmentation from ``(seed, step)`` (in memory) or ``(seed, position in the stream)`` (streaming), so
``start_step=k`` resumes exactly without producing the skipped batches. (Streaming resumption still
reads, but does not decode, the skipped examples of the current epoch; its seeded tf.data shuffles
also depend on TensorFlow's global seed, so a training program must not call ``tf.random.set_seed``.)
An epoch is ``num_train // global_batch_size`` full batches: the remainder of the *training* split
is dropped from that epoch (each epoch has a new order, so every example is still seen). Evaluation
covers every example exactly once; its last global batch is padded (``mask`` False).

Multiple processes: every process computes the same global order and keeps rows
``[p * B, (p + 1) * B)`` of each global batch, ``B = global_batch_size // process_count`` (a
streaming process reads every record but decodes only its own).

Label noise (the paper's noisy-label experiment on CIFAR-10): a fraction ``label_noise = 1 - r`` of
the training labels is replaced through the confusion matrix ``Q_ii = r``, ``Q_ij = (1 - r) / (K - 1)``
(:func:`corrupt_labels`); validation and test labels stay clean. In-memory datasets only.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import queue
import threading
from typing import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resattn_jax import digits_dataset  # noqa: F401  (registers the 'digits' builder)

__all__ = ["AUGMENTS", "EVAL_SPLITS", "IMAGENET_MEAN", "IMAGENET_STD", "DatasetInfo", "corrupt_labels", "data_preset",
           "dataset_info", "default_data_config", "eval_batches", "normalisation", "normalise", "num_eval_batches",
           "train_batches"]

AUGMENTS = ("cifar", "imagenet", "none")
EVAL_SPLITS = ("validation", "test")
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

_FOLDER = "folder:"
_STREAMING = ("imagenet2012",)  # datasets streamed by default (besides folders)
_EVAL_CROP = 0.875


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training loop need to know about a configured dataset."""

    num_classes: int
    image_shape: tuple[int, int, int]  # training images as yielded, (H, W, C)
    eval_image_shape: tuple[int, int, int]
    num_train: int
    num_validation: int  # 0 when there is no validation split
    num_test: int


# --------------------------------------------------------------------------------------- configuration
def default_data_config() -> ml_collections.ConfigDict:
    """Every data field with its default (the offline ``digits`` dataset, CIFAR-style augmentation)."""
    return ml_collections.ConfigDict({
        "name": "digits",        # tfds name, 'digits', or 'folder:/root' (root/split/label/image.jpg)
        "data_dir": None,        # tfds data_dir (None: tfds's default, ~/tensorflow_datasets)
        "train_split": "train",  # tfds split strings; validation is held out from the training data
        "validation_split": "validation",  # '' or None: no such split
        "test_split": "test",
        "image_size": 32,        # training crop
        "eval_image_size": 32,
        "augment": "cifar",      # one of AUGMENTS
        "crop_padding": 4,       # 'cifar': zero padding before the random crop
        "random_flip": True,
        "mean": None,            # per-channel, 0..255 units; None: computed from the training split
        "std": None,             # (in-memory datasets only)
        "label_noise": 0.0,      # fraction of training labels corrupted, in [0, 1)
        "label_noise_seed": 0,
        "in_memory": None,       # None: True except for imagenet2012 and folders
        "shuffle_buffer": 10_000,  # streaming only
        "prefetch": 2,           # batches prepared ahead
    })


def data_preset(name: str) -> ml_collections.ConfigDict:
    """:func:`default_data_config` with the usual splits, sizes and augmentation of ``name``.

    * ``digits``: ``train`` / ``validation`` / ``test``, 32x32, 2-pixel padding, no flips (a mirrored
      digit is another symbol).
    * ``cifar10``, ``cifar100``: ``train[5000:]`` / ``train[:5000]`` / ``test``, 32x32, 4-pixel padding.
    * ``imagenet2012``: ``train[10000:]`` / ``train[:10000]`` / ``validation``, ``imagenet``
      augmentation at 224, ImageNet mean/std, streaming.
    * ``folder:/root``: as ImageNet, with splits ``train`` / ``validation`` / ``test`` (sub-folders;
      image folders take no slicing).
    * any other tfds name: ``train[10%:]`` / ``train[:10%]`` / ``test`` at 32x32; adjust as needed.
    """
    cfg = default_data_config()
    cfg.name = name
    if name == "digits":
        cfg.crop_padding, cfg.random_flip = 2, False
    elif name in ("cifar10", "cifar100"):
        cfg.train_split, cfg.validation_split = "train[5000:]", "train[:5000]"
    elif name == "imagenet2012" or name.startswith(_FOLDER):
        if name == "imagenet2012":
            cfg.train_split, cfg.validation_split, cfg.test_split = "train[10000:]", "train[:10000]", "validation"
        cfg.image_size, cfg.eval_image_size, cfg.augment = 224, 224, "imagenet"
        cfg.mean, cfg.std = IMAGENET_MEAN, IMAGENET_STD
    else:
        cfg.train_split, cfg.validation_split = "train[10%:]", "train[:10%]"
    return cfg


# ----------------------------------------------------------------------------------------- label noise
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


# -------------------------------------------------------------------------------------------- datasets
@dataclasses.dataclass(frozen=True)
class _Source:
    """A checked configuration resolved to its tfds builder."""

    cfg: ml_collections.ConfigDict
    builder: tfds.core.DatasetBuilder
    image_key: str
    num_classes: int
    channels: int
    in_memory: bool


_FOLDERS: dict[str, tfds.ImageFolder] = {}  # root -> builder (listing a large folder is slow)
_ARRAYS: dict[tuple, object] = {}  # split arrays and pixel statistics of prepared datasets, kept per process


def _builder(cfg) -> tfds.core.DatasetBuilder:
    name = cfg.name
    if name.startswith(_FOLDER):
        root = os.path.expanduser(name[len(_FOLDER):])
        if not os.path.isdir(root):
            raise ValueError(f"dataset {name!r}: {root!r} is not a directory (layout root/split/label/image.jpg)")
        if root not in _FOLDERS:
            _FOLDERS[root] = tfds.ImageFolder(root)
        return _FOLDERS[root]
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
    if isinstance(builder, tfds.ImageFolder) and split not in known:
        raise ValueError(f"bad {field} {split!r}: image folders take plain split names {known}")


def _resolve(cfg) -> _Source:
    """Check ``cfg`` and find its dataset; every configuration error is a one-line ``ValueError``."""
    if cfg.augment not in AUGMENTS:
        raise ValueError(f"unknown augment {cfg.augment!r}; choose one of {AUGMENTS}")
    if not 0.0 <= cfg.label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {cfg.label_noise}")
    if min(cfg.image_size, cfg.eval_image_size) <= 0 or cfg.crop_padding < 0:
        raise ValueError("image_size and eval_image_size must be positive and crop_padding non-negative")
    in_memory = cfg.in_memory
    if in_memory is None:
        in_memory = not (cfg.name in _STREAMING or cfg.name.startswith(_FOLDER))
    if not in_memory and (cfg.mean is None or cfg.std is None):
        raise ValueError(f"streaming dataset {cfg.name!r} needs explicit mean and std (e.g. IMAGENET_MEAN/STD)")
    if not in_memory and cfg.shuffle_buffer <= 0:
        raise ValueError(f"shuffle_buffer must be positive, got {cfg.shuffle_buffer}")
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
    for field in ("mean", "std"):
        if cfg[field] is not None and len(cfg[field]) != channels:
            raise ValueError(f"{field} has {len(cfg[field])} values for {channels}-channel images")
    _check_split(builder, cfg.train_split, "train_split")
    for field in ("validation_split", "test_split"):
        if cfg[field]:
            _check_split(builder, cfg[field], field)
    return _Source(cfg, builder, image_key, label_feature.num_classes, channels, in_memory)


def _tfds_split(source: _Source, split: str, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """``(encoded image, label)`` pairs of ``split``; file order shuffled by ``shuffle_seed`` if given."""
    options = tf.data.Options()
    options.deterministic = True
    folder = isinstance(source.builder, tfds.ImageFolder)  # its file shuffling is unseeded: never used
    return source.builder.as_dataset(
        split=split, as_supervised=True, shuffle_files=shuffle_seed is not None and not folder,
        decoders={source.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, options=options))


def _num_examples(source: _Source, split: str | None) -> int:
    if not split:
        return 0
    count = int(source.builder.as_dataset(split=split).cardinality())
    if count < 0:
        raise ValueError(f"cannot count the examples of split {split!r} of {source.cfg.name!r}")
    return count


def _memoised(source: _Source, key: tuple, compute: Callable[[], object]) -> object:
    """``compute()``, kept per process for datasets prepared on disk (mocked ones are re-read)."""
    if not source.builder.is_prepared():
        return compute()
    key = (str(source.builder.data_path), *key)
    if key not in _ARRAYS:
        _ARRAYS[key] = compute()
    return _ARRAYS[key]


def _read_arrays(source: _Source, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``split`` as read-only ``uint8 [N, H, W, C]`` images and ``int64 [N]`` labels."""

    def read():
        ds = source.builder.as_dataset(split=split, as_supervised=True)
        images, labels = next(iter(tfds.as_numpy(ds.batch(max(_num_examples(source, split), 1)))))
        images, labels = np.asarray(images, np.uint8), np.asarray(labels, np.int64)
        images.flags.writeable = labels.flags.writeable = False
        return images, labels

    return _memoised(source, ("arrays", split), read)


def _normalisation(source: _Source) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``mean, std`` (float32 ``[C]``): configured, or over the training split's pixels."""
    cfg = source.cfg
    if cfg.mean is not None and cfg.std is not None:
        return np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)

    def compute():
        images, _ = _read_arrays(source, cfg.train_split)
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


# -------------------------------------------------------------------------------------------- public API
def _local_batch(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size <= 0 or process_count <= 0 or global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} does not divide by the {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return global_batch_size // process_count


def _eval_split(cfg, split: str) -> str | None:
    if split not in EVAL_SPLITS:
        raise ValueError(f"bad evaluation split {split!r}; choose one of {EVAL_SPLITS}")
    return cfg[f"{split}_split"]


def dataset_info(cfg) -> DatasetInfo:
    """Classes, yielded image shapes and split sizes of the configured dataset (checks ``cfg``)."""
    source = _resolve(cfg)
    return DatasetInfo(
        num_classes=source.num_classes,
        image_shape=(cfg.image_size, cfg.image_size, source.channels),
        eval_image_shape=(cfg.eval_image_size, cfg.eval_image_size, source.channels),
        num_train=_num_examples(source, cfg.train_split),
        num_validation=_num_examples(source, cfg.validation_split),
        num_test=_num_examples(source, cfg.test_split))


def normalisation(cfg) -> tuple[np.ndarray, np.ndarray]:
    """The per-channel ``mean, std`` (float32 ``[C]``, 0..255 units) the pipeline normalises with.

    ``cfg.mean``/``cfg.std`` where given, else computed over the training split's pixels.
    """
    return _normalisation(_resolve(cfg))


def normalise(cfg, pixels: np.ndarray) -> np.ndarray:
    """``uint8 [..., C]`` pixels (e.g. decoded image files) -> float32, normalised as the pipeline does."""
    return _normalise(np.asarray(pixels), *normalisation(cfg))


def num_eval_batches(cfg, split: str, global_batch_size: int) -> int:
    """Global batches of one :func:`eval_batches` pass over ``split`` ('validation' or 'test')."""
    split_name = _eval_split(cfg, split)
    _local_batch(global_batch_size, 0, 1)
    return math.ceil(_num_examples(_resolve(cfg), split_name) / global_batch_size)


def train_batches(cfg, global_batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Endless training batches from ``start_step`` on: ``{'image': float32 [B, H, W, C], 'label': int32 [B]}``.

    ``B = global_batch_size // process_count``; this process's rows of each global batch. Batch ``k``
    is the same whatever ``start_step`` the iterator began at (module docstring, "Determinism").
    """
    local = _local_batch(global_batch_size, process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be non-negative, got {start_step}")
    source = _resolve(cfg)
    num_train = _num_examples(source, cfg.train_split)
    if num_train < global_batch_size:
        raise ValueError(f"global batch {global_batch_size} exceeds the {num_train} training examples")
    rows = slice(process_index * local, (process_index + 1) * local)
    if source.in_memory:
        return _memory_train_batches(source, global_batch_size, seed, start_step, rows)
    return _stream_train_batches(source, num_train, global_batch_size, seed, start_step, rows)


def eval_batches(cfg, split: str, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """One pass over ``split`` ('validation' or 'test') in its stored order, nothing dropped.

    Yields ``{'image': float32 [B, E, E, C], 'label': int32 [B], 'mask': bool [B]}``; the last global
    batch is padded with zero images, label 0 and ``mask`` False. Over all processes every example
    is yielded exactly once.
    """
    split_name = _eval_split(cfg, split)
    local = _local_batch(global_batch_size, process_index, process_count)
    source = _resolve(cfg)
    if not split_name:
        return iter(())
    rows = slice(process_index * local, (process_index + 1) * local)
    if source.in_memory:
        return _memory_eval_batches(source, split_name, global_batch_size, rows)
    return _stream_eval_batches(source, split_name, global_batch_size, rows)


# ---------------------------------------------------------------------------------- in-memory (numpy)
def _prefetch(iterator: Iterator[dict], size: int) -> Iterator[dict]:
    """``iterator`` run ``size`` items ahead in a background thread (errors re-raised here)."""
    if size <= 0:
        yield from iterator
        return
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in iterator:
                if not put((item, None)):
                    return
            put((end, None))
        except Exception as e:  # handed to the consumer
            put((None, e))

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()


def _center_crop_or_pad(images: np.ndarray, size: int) -> np.ndarray:
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


def _crop(images: np.ndarray, index: np.ndarray, top: np.ndarray, left: np.ndarray, flip: np.ndarray,
          size: int) -> np.ndarray:
    """``images[index[b], top[b]:top[b]+size, left[b]:left[b]+size]``, mirrored where ``flip[b]``.

    ``images: [N, H, W, C]``, the others ``[B]``; returns ``[B, size, size, C]`` in one gather.
    """
    offsets = np.arange(size)
    rows = top[:, None] + offsets
    cols = left[:, None] + np.where(flip[:, None], size - 1 - offsets, offsets)
    return images[index[:, None, None], rows[:, :, None], cols[:, None, :]]


def _normalise(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    out = images.astype(np.float32)
    out -= mean
    out /= std
    return out


def _memory_train_batches(source: _Source, global_batch: int, seed: int, start_step: int,
                          rows: slice) -> Iterator[dict]:
    cfg = source.cfg
    images, labels = _read_arrays(source, cfg.train_split)
    if cfg.label_noise:
        labels = corrupt_labels(labels, source.num_classes, cfg.label_noise, cfg.label_noise_seed)
    mean, std = _normalisation(source)
    size = cfg.image_size
    if cfg.augment == "cifar":
        pad = cfg.crop_padding
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        if min(images.shape[1:3]) < size:
            raise ValueError(f"image_size {size} exceeds the padded images ({images.shape[1]}x{images.shape[2]})")
    else:
        images = _center_crop_or_pad(images, size)
    span_y, span_x = images.shape[1] - size, images.shape[2] - size
    flips = cfg.augment == "cifar" and cfg.random_flip
    steps_per_epoch = len(labels) // global_batch

    def batches():
        order, order_epoch = None, None
        for step in itertools.count(start_step):
            epoch, i = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = np.random.default_rng([seed, 0, epoch]).permutation(len(labels)), epoch
            index = order[i * global_batch:(i + 1) * global_batch][rows]
            rng = np.random.default_rng([seed, 1, step])  # drawn for the global batch, then sliced
            top = rng.integers(0, span_y + 1, global_batch)[rows]
            left = rng.integers(0, span_x + 1, global_batch)[rows]
            flip = (rng.random(global_batch) < 0.5)[rows] & flips
            yield {"image": _normalise(_crop(images, index, top, left, flip, size), mean, std),
                   "label": labels[index].astype(np.int32)}

    return _prefetch(batches(), cfg.prefetch)


def _memory_eval_batches(source: _Source, split: str, global_batch: int, rows: slice) -> Iterator[dict]:
    images, labels = _read_arrays(source, split)
    mean, std = _normalisation(source)
    images = _center_crop_or_pad(images, source.cfg.eval_image_size)

    def batches():
        for start in range(0, len(labels), global_batch):
            position = np.arange(start, start + global_batch)[rows]
            mask = position < len(labels)
            index = np.where(mask, position, 0)
            image = _normalise(images[index], mean, std)
            image[~mask] = 0.0
            yield {"image": image, "label": np.where(mask, labels[index], 0).astype(np.int32), "mask": mask}

    return _prefetch(batches(), source.cfg.prefetch)


# --------------------------------------------------------------------------------- streaming (tf.data)
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


def _preprocess(source: _Source, train: bool) -> Callable[..., dict]:
    """``(encoded, label, seed int64 [2]) -> {'image': float32 [S, S, C], 'label': int32}``."""
    cfg, channels = source.cfg, source.channels
    size = cfg.image_size if train else cfg.eval_image_size
    mean, std = (tf.constant(v, tf.float32) for v in _normalisation(source))

    def fn(encoded, label, seed):
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if cfg.augment == "imagenet":
            window = (lambda shape: _random_window(shape, crop_seed)) if train else _center_window
            image = tf.image.resize(_decode(encoded, channels, window), (size, size), method="bilinear")
        elif cfg.augment == "cifar" and train:
            pad = cfg.crop_padding
            image = tf.pad(_decode(encoded, channels), [[pad, pad], [pad, pad], [0, 0]])
            image = tf.image.stateless_random_crop(image, (size, size, channels), seed=crop_seed)
        else:
            image = tf.image.resize_with_crop_or_pad(_decode(encoded, channels), size, size)
        if train and cfg.augment != "none" and cfg.random_flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        image = (tf.cast(image, tf.float32) - mean) / std
        return {"image": tf.ensure_shape(image, (size, size, channels)), "label": tf.cast(label, tf.int32)}

    return fn


def _mine(rows: slice, global_batch: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """Whether stream position ``i`` lands in this process's rows of its global batch."""
    return lambda i: tf.logical_and(i % global_batch >= rows.start, i % global_batch < rows.stop)


def _finish(ds: tf.data.Dataset, rows: slice, prefetch: int) -> Iterator[dict]:
    ds = ds.batch(rows.stop - rows.start)
    return (ds.prefetch(prefetch) if prefetch > 0 else ds).as_numpy_iterator()


def _stream_train_batches(source: _Source, num_train: int, global_batch: int, seed: int, start_step: int,
                          rows: slice) -> Iterator[dict]:
    cfg = source.cfg
    preprocess, mine = _preprocess(source, train=True), _mine(rows, global_batch)
    steps_per_epoch = num_train // global_batch
    epoch, first = divmod(start_step, steps_per_epoch)
    while True:
        epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        start = epoch * steps_per_epoch * global_batch  # stream position of the epoch's first example
        ds = _tfds_split(source, cfg.train_split, shuffle_seed=epoch_seed)
        ds = ds.shuffle(cfg.shuffle_buffer, seed=epoch_seed).take(steps_per_epoch * global_batch).enumerate()
        ds = ds.skip(first * global_batch).filter(lambda i, example: mine(i))  # before any decoding
        ds = ds.map(lambda i, example: preprocess(*example, tf.stack([tf.constant(seed, tf.int64), start + i])),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        yield from _finish(ds, rows, cfg.prefetch)
        epoch, first = epoch + 1, 0


def _stream_eval_batches(source: _Source, split: str, global_batch: int, rows: slice) -> Iterator[dict]:
    cfg = source.cfg
    preprocess, mine = _preprocess(source, train=False), _mine(rows, global_batch)
    count = _num_examples(source, split)
    no_seed = tf.zeros(2, tf.int64)  # evaluation is not random
    real = _tfds_split(source, split).enumerate().filter(lambda i, example: mine(i)).map(
        lambda i, example: {**preprocess(*example, no_seed), "mask": tf.constant(True)},
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    shape = (cfg.eval_image_size, cfg.eval_image_size, source.channels)
    padding = tf.data.Dataset.range(count, math.ceil(count / global_batch) * global_batch).filter(mine).map(
        lambda i: {"image": tf.zeros(shape), "label": tf.constant(0), "mask": tf.constant(False)})
    return _finish(real.concatenate(padding), rows, cfg.prefetch)

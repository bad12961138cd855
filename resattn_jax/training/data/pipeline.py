"""Input pipeline: batching tfds image-classification datasets for training and evaluation.

The configuration is an ``ml_collections.ConfigDict`` (:mod:`.config`); the dataset is resolved by
:mod:`.sources`, images are decoded, augmented and normalised by :mod:`.augment` (which documents the
augmentations) and training labels optionally corrupted by :mod:`.labels`. Two paths, chosen by
``cfg.in_memory``, that give identical batches for the same configuration and seed:

* **in memory** (default for everything but ``imagenet2012`` and folders): each split is read once
  through tfds into ``uint8 [N, H, W, C]`` numpy arrays; batches are gathered, cropped and flipped
  by vectorised numpy indexing in a background thread that keeps ``cfg.prefetch`` batches ready.
  Augmentations ``cifar`` and ``none``; label noise is applied here only.
* **streaming**: the encoded examples are read in their stored order, put into the training order
  through a buffer of at most ``shuffle_buffer`` examples, then decoded and augmented by a parallel
  tf.data map. Augmentations ``imagenet``, ``cifar`` and ``none``; ``mean`` and ``std`` must be given.

Images come out as ``(uint8 - mean) / std`` in float32, labels as int32.

Determinism. Training batches are a pure function of ``(cfg, global_batch_size, seed, step)``, the
same on both paths (tested):

* the order of epoch ``e`` = ``step // steps_per_epoch`` is :func:`epoch_order` ``(n, seed, e,
  shuffle_buffer)``: a uniform permutation of the split's stored order when the buffer holds the
  whole split (``shuffle_buffer=None``, the default of in-memory datasets), else the order a
  shuffle buffer of that size gives (streaming presets: 10,000);
* the crop offsets and flips of step ``s`` come from one numpy stream seeded ``(seed, s)``, drawn
  for the whole global batch (:func:`augment_draws`); ``imagenet``'s random-resized-crop windows
  from TensorFlow's stateless ops seeded ``(seed, position in the run)``.

So ``start_step=k`` resumes exactly without producing the skipped batches (streaming still reads,
but does not decode, the skipped examples of the current epoch). An epoch is
``num_train // global_batch_size`` full batches: the remainder of the *training* split is dropped
from that epoch (each epoch has a new order, so every example is still seen). Evaluation covers
every example exactly once in the stored order; its last global batch is padded (``mask`` False).

Multiple processes: every process computes the same global order and keeps rows
``[p * B, (p + 1) * B)`` of each global batch, ``B = global_batch_size // process_count`` (a
streaming process reads every record but decodes only its own).
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from typing import Callable, Iterator

import numpy as np
from resattn_jax.training.data._tensorflow import tf

from resattn_jax.training.data import folder
from resattn_jax.training.data.augment import center_crop_or_pad, crop, normalise_images, preprocess
from resattn_jax.training.data.config import EVAL_SPLITS
from resattn_jax.training.data.labels import corrupt_labels
from resattn_jax.training.data.sources import (Source, num_examples, read_arrays, resolve, source_normalisation,
                                               tfds_split)

__all__ = ["augment_draws", "epoch_order", "eval_batches", "num_eval_batches", "train_batches"]


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


def num_eval_batches(cfg, split: str, global_batch_size: int) -> int:
    """Global batches of one :func:`eval_batches` pass over ``split`` ('validation' or 'test')."""
    split_name = _eval_split(cfg, split)
    _local_batch(global_batch_size, 0, 1)
    return math.ceil(num_examples(resolve(cfg), split_name) / global_batch_size)


def train_batches(cfg, global_batch_size: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Endless training batches from ``start_step`` on: ``{'image': float32 [B, H, W, C], 'label': int32 [B]}``.

    ``B = global_batch_size // process_count``; this process's rows of each global batch. Batch ``k``
    is the same whatever ``start_step`` the iterator began at (module docstring, "Determinism").
    """
    local = _local_batch(global_batch_size, process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be non-negative, got {start_step}")
    source = resolve(cfg)
    num_train = num_examples(source, cfg.train_split)
    if num_train < global_batch_size:
        raise ValueError(f"global batch {global_batch_size} exceeds the {num_train} training examples")
    rows = slice(process_index * local, (process_index + 1) * local)
    if source.in_memory:
        return _named_errors(_memory_train_batches(source, global_batch_size, seed, start_step, rows), source,
                             cfg.train_split)
    return _named_errors(_stream_train_batches(source, num_train, global_batch_size, seed, start_step, rows), source,
                         cfg.train_split)


def eval_batches(cfg, split: str, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """One pass over ``split`` ('validation' or 'test') in its stored order, nothing dropped.

    Yields ``{'image': float32 [B, E, E, C], 'label': int32 [B], 'mask': bool [B]}``; the last global
    batch is padded with zero images, label 0 and ``mask`` False. Over all processes every example
    is yielded exactly once.
    """
    split_name = _eval_split(cfg, split)
    local = _local_batch(global_batch_size, process_index, process_count)
    source = resolve(cfg)
    if not split_name:
        return iter(())
    rows = slice(process_index * local, (process_index + 1) * local)
    if source.in_memory:
        return _named_errors(_memory_eval_batches(source, split_name, global_batch_size, rows), source, split_name)
    return _named_errors(_stream_eval_batches(source, split_name, global_batch_size, rows), source, split_name)


def _named_errors(batches: Iterator[dict], source: Source, split: str) -> Iterator[dict]:
    """``batches``, with a failure to read or decode ``split`` re-raised as a one-line ``ValueError``
    naming the dataset and split, and for an image folder the first file that fails now."""
    try:
        yield from batches
    except tf.errors.OpError as e:
        bad = folder.find_bad_file(source.folder, split) if source.folder is not None else None
        raise ValueError(bad or f"split {split!r} of {source.cfg.name!r} cannot be read: "
                                f"{folder.decode_error_text(e)}") from None


# ------------------------------------------------------------------------- order and random draws (both)
def epoch_order(num: int, seed: int, epoch: int, window: int | None = None) -> np.ndarray:
    """The training order of epoch ``epoch``: ``int64 [num]``, a permutation of the stored order.

    With ``window`` (a shuffle buffer of that many examples, ``< num``): example ``order[j]`` is
    stored at most ``window`` positions after ``j``, so a stream reordered by it never holds more
    than ``window`` examples. Otherwise a uniform permutation.
    """
    rng = np.random.default_rng([seed, 0, epoch])
    if window is None or window >= num:
        return rng.permutation(num)
    # A shuffle buffer: full of the first `window` examples, each output is a uniformly chosen slot,
    # refilled with the next stored example; at the end the buffer is emptied in random order.
    slots = rng.integers(0, window, num - window)
    buffer, order = np.arange(window), np.empty(num, np.int64)
    for j, (slot, incoming) in enumerate(zip(slots.tolist(), range(window, num))):
        order[j] = buffer[slot]
        buffer[slot] = incoming
    order[num - window:] = buffer[rng.permutation(window)]
    return order


def augment_draws(seed: int, step: int, global_batch: int) -> dict[str, np.ndarray]:
    """The random draws of training step ``step`` for its whole global batch (sliced per process):
    ``top``, ``left`` uniform in [0, 1) (crop offset ``floor(u * (span + 1))``), ``flip`` bool."""
    rng = np.random.default_rng([seed, 1, step])
    return {"top": rng.random(global_batch), "left": rng.random(global_batch), "flip": rng.random(global_batch) < 0.5}


def _offsets(fraction: np.ndarray, span: int) -> np.ndarray:
    return np.floor(fraction * (span + 1)).astype(np.int64)


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


def _memory_train_batches(source: Source, global_batch: int, seed: int, start_step: int,
                          rows: slice) -> Iterator[dict]:
    cfg = source.cfg
    images, labels = read_arrays(source, cfg.train_split)
    if cfg.label_noise:
        labels = corrupt_labels(labels, source.num_classes, cfg.label_noise, cfg.label_noise_seed)
    mean, std = source_normalisation(source)
    size = cfg.image_size
    if cfg.augment == "cifar":
        pad = cfg.crop_padding
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        if min(images.shape[1:3]) < size:
            raise ValueError(f"image_size {size} exceeds the padded images ({images.shape[1]}x{images.shape[2]})")
    else:
        images = center_crop_or_pad(images, size)
    span_y, span_x = images.shape[1] - size, images.shape[2] - size
    flips = cfg.augment == "cifar" and cfg.random_flip
    steps_per_epoch = len(labels) // global_batch

    def batches():
        order, order_epoch = None, None
        for step in itertools.count(start_step):
            epoch, i = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(len(labels), seed, epoch, cfg.shuffle_buffer), epoch
            index = order[i * global_batch:(i + 1) * global_batch][rows]
            draws = {k: v[rows] for k, v in augment_draws(seed, step, global_batch).items()}
            top, left = _offsets(draws["top"], span_y), _offsets(draws["left"], span_x)
            yield {"image": normalise_images(crop(images, index, top, left, draws["flip"] & flips, size), mean, std),
                   "label": labels[index].astype(np.int32)}

    return _prefetch(batches(), cfg.prefetch)


def _memory_eval_batches(source: Source, split: str, global_batch: int, rows: slice) -> Iterator[dict]:
    images, labels = read_arrays(source, split)
    mean, std = source_normalisation(source)
    images = center_crop_or_pad(images, source.cfg.eval_image_size)

    def batches():
        for start in range(0, len(labels), global_batch):
            position = np.arange(start, start + global_batch)[rows]
            mask = position < len(labels)
            index = np.where(mask, position, 0)
            image = normalise_images(images[index], mean, std)
            image[~mask] = 0.0
            yield {"image": image, "label": np.where(mask, labels[index], 0).astype(np.int32), "mask": mask}

    return _prefetch(batches(), source.cfg.prefetch)


# --------------------------------------------------------------------------------- streaming (tf.data)
def _mine(rows: slice, global_batch: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """Whether stream position ``i`` lands in this process's rows of its global batch."""
    return lambda i: tf.logical_and(i % global_batch >= rows.start, i % global_batch < rows.stop)


def _finish(ds: tf.data.Dataset, rows: slice, prefetch: int) -> Iterator[dict]:
    ds = ds.batch(rows.stop - rows.start)
    return (ds.prefetch(prefetch) if prefetch > 0 else ds).as_numpy_iterator()


def _reordered(stored: Iterator, order: np.ndarray) -> Iterator:
    """The items of ``stored`` (in stored order) in ``order``, holding only those read ahead."""
    waiting, read = {}, 0
    for want in order.tolist():
        while want not in waiting:
            waiting[read] = next(stored)
            read += 1
        yield waiting.pop(want)


def _stream_train_batches(source: Source, num_train: int, global_batch: int, seed: int, start_step: int,
                          rows: slice) -> Iterator[dict]:
    cfg = source.cfg
    steps_per_epoch = num_train // global_batch
    local = rows.stop - rows.start
    flips = cfg.augment != "none" and cfg.random_flip

    def encoded_batches():
        """Per step, this process's rows: encoded images, labels and their draws (``preprocess``'s)."""
        epoch, first = divmod(start_step, steps_per_epoch)
        while True:
            order = epoch_order(num_train, seed, epoch, cfg.shuffle_buffer)
            stored = tfds_split(source, cfg.train_split).batch(1024).as_numpy_iterator()  # batched: less per-item overhead
            examples = _reordered((item for images, labels in stored for item in zip(images, labels)), order)
            for _ in range(first * global_batch):  # read, never decoded
                next(examples)
            for step in range(epoch * steps_per_epoch + first, (epoch + 1) * steps_per_epoch):
                batch = [next(examples) for _ in range(global_batch)][rows]
                draws = {k: v[rows] for k, v in augment_draws(seed, step, global_batch).items()}
                positions = step * global_batch + np.arange(rows.start, rows.stop, dtype=np.int64)
                yield {"image": np.array([image for image, _ in batch], dtype=object),
                       "label": np.array([label for _, label in batch], np.int32),
                       "top": draws["top"], "left": draws["left"], "flip": draws["flip"] & flips,
                       "seed": np.stack([np.full(local, seed, np.int64), positions], axis=1)}
            epoch, first = epoch + 1, 0

    spec = lambda dtype, *shape: tf.TensorSpec((local, *shape), dtype)  # noqa: E731
    ds = tf.data.Dataset.from_generator(encoded_batches, output_signature={
        "image": spec(tf.string), "label": spec(tf.int32), "top": spec(tf.float64), "left": spec(tf.float64),
        "flip": spec(tf.bool), "seed": spec(tf.int64, 2)})
    preprocess_fn = preprocess(source, train=True)
    ds = ds.unbatch().map(lambda example: preprocess_fn(example["image"], example["label"], example),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(ds, rows, cfg.prefetch)


def _stream_eval_batches(source: Source, split: str, global_batch: int, rows: slice) -> Iterator[dict]:
    cfg = source.cfg
    preprocess_fn, mine = preprocess(source, train=False), _mine(rows, global_batch)
    count = num_examples(source, split)
    real = tfds_split(source, split).enumerate().filter(lambda i, example: mine(i)).map(
        lambda i, example: {**preprocess_fn(*example, None), "mask": tf.constant(True)},
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    shape = (cfg.eval_image_size, cfg.eval_image_size, source.channels)
    padding = tf.data.Dataset.range(count, math.ceil(count / global_batch) * global_batch).filter(mine).map(
        lambda i: {"image": tf.zeros(shape), "label": tf.constant(0), "mask": tf.constant(False)})
    return _finish(real.concatenate(padding), rows, cfg.prefetch)

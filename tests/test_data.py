"""Input pipeline: the offline digits dataset, shapes, augmentation, normalisation, evaluation padding,
exact resumption, multi-process slicing, label noise and configuration errors.

cifar10/cifar100/imagenet2012 are mocked with ``tfds.testing.mock_data`` (random examples; every split
yields the same ones); digits is the real builder, prepared once into a temporary data_dir.
"""

import contextlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from numpy.lib.stride_tricks import sliding_window_view

from resattn_jax.training import data
from resattn_jax.training.data import digits as digits_dataset


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.dataset_info(config("digits", data_dir=data_dir))  # prepares it
    return data_dir


def config(name, **overrides):
    cfg = data.data_preset(name)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def concat(*batch_lists):
    """Per step, the concatenation over processes of each field."""
    return [{k: np.concatenate([b[k] for b in batches]) for k in batches[0]} for batches in zip(*batch_lists)]


def mocked(name, num_examples, **overrides):
    """A configuration of ``name`` (imagenet at 56/64 pixels) and a tfds mock with ``num_examples``."""
    if name == "imagenet2012":
        overrides = {"image_size": 56, "eval_image_size": 64, **overrides}
    return config(name, **overrides), tfds.testing.mock_data(num_examples=num_examples)


# ----------------------------------------------------------------------------------------------- digits
def test_digits_builder_splits_partition_the_scikit_learn_data(digits_dir):
    splits = {s: tfds.as_numpy(tfds.load("digits", split=s, data_dir=digits_dir, batch_size=-1, as_supervised=True))
              for s in digits_dataset.SPLIT_SIZES}
    assert {s: len(labels) for s, (_, labels) in splits.items()} == {"train": 1257, "validation": 180, "test": 360}
    images = np.concatenate([im for im, _ in splits.values()])
    labels = np.concatenate([lab for _, lab in splits.values()])
    assert images.shape == (1797, 32, 32, 1) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    expected_images, expected_labels = digits_dataset._images_and_labels()
    assert sorted(zip(map(bytes, images), labels)) == sorted(zip(map(bytes, expected_images), expected_labels))
    info = data.dataset_info(config("digits", data_dir=digits_dir))
    assert info == data.DatasetInfo(10, (32, 32, 1), (32, 32, 1), 1257, 180, 360, tuple("0123456789"))


def test_config_fields_and_presets():
    assert set(data.default_data_config()) == {
        "name", "data_dir", "train_split", "validation_split", "test_split", "image_size", "eval_image_size",
        "augment", "crop_padding", "random_flip", "mean", "std", "label_noise", "label_noise_seed", "in_memory",
        "shuffle_buffer", "prefetch", "channels", "on_bad_image"}
    cifar, imagenet = data.data_preset("cifar10"), data.data_preset("imagenet2012")
    assert (cifar.train_split, cifar.validation_split, cifar.test_split) == ("train[5000:]", "train[:5000]", "test")
    assert (imagenet.train_split, imagenet.validation_split, imagenet.test_split) == (
        "train[10000:]", "train[:10000]", "validation")
    assert imagenet.mean == data.IMAGENET_MEAN and imagenet.augment == "imagenet"


# --------------------------------------------------------------------------------------- shapes, dtypes
@pytest.mark.parametrize("name,num_classes,train_shape,eval_shape", [
    ("digits", 10, (32, 32, 1), (32, 32, 1)),
    ("cifar10", 10, (32, 32, 3), (32, 32, 3)),
    ("cifar100", 100, (32, 32, 3), (32, 32, 3)),
    ("imagenet2012", 1000, (56, 56, 3), (64, 64, 3)),
])
def test_batch_shapes_and_dtypes(digits_dir, name, num_classes, train_shape, eval_shape):
    if name == "digits":
        cfg, context = config(name, data_dir=digits_dir), contextlib.nullcontext()
    else:
        cfg, context = mocked(name, 20)
    with context:
        info = data.dataset_info(cfg)
        assert (info.num_classes, info.image_shape, info.eval_image_shape) == (num_classes, train_shape, eval_shape)
        batch = next(data.train_batches(cfg, 8, seed=0))
        assert batch["image"].shape == (8, *train_shape) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
        assert np.all((batch["label"] >= 0) & (batch["label"] < num_classes))
        batch = next(data.eval_batches(cfg, "test", 8))
        assert batch["image"].shape == (8, *eval_shape) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool and batch["mask"].all()


# ------------------------------------------------------------------------------------------ augmentation
def locate(outputs, sources, pad):
    """For each output crop: (source index, top, left, flipped), by matching a central 8x8 patch."""
    padded = np.pad(sources, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    size = sources.shape[1]
    c = size // 2 - 4
    patches = sliding_window_view(padded[:, c:c + size - 2 * c + 2 * pad, c:c + size - 2 * c + 2 * pad], (8, 8),
                                  axis=(1, 2))  # [N, 2p+1, 2p+1, C, 8, 8]: patch of the crop at (top, left)
    found = []
    for out in outputs:
        for flipped, image in ((False, out), (True, out[:, ::-1])):
            hits = np.argwhere(np.all(patches == image[c:c + 8, c:c + 8].transpose(2, 0, 1), axis=(3, 4, 5)))
            if len(hits):
                n, top, left = hits[0]
                np.testing.assert_array_equal(image, padded[n, top:top + size, left:left + size])
                found.append((n, top, left, flipped))
                break
        else:
            raise AssertionError("an output crop matches no source")
    return np.array(found)


def test_cifar_crops_flips_and_padding_normalisation():
    raw = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    cfg, context = mocked("cifar10", 64, **raw)
    with context:
        (sources,) = [b["image"] for b in data.eval_batches(config("cifar10", augment="none", **raw), "test", 64)]
        batches = take(data.train_batches(cfg, 64, seed=3), 10)  # one batch = one epoch = every image once
        normalised = take(data.train_batches(config("cifar10"), 64, seed=3), 10)
    found = np.concatenate([locate(b["image"], sources, pad=4) for b in batches])
    for step in range(10):
        assert sorted(found[step * 64:(step + 1) * 64, 0]) == list(range(64))
    assert set(found[:, 1]) == set(found[:, 2]) == set(range(9))  # offsets cover exactly [0, 2 * pad]
    assert 0.4 < found[:, 3].mean() < 0.6
    # Computed statistics: the same crops, normalised; padding zeros become (0 - mean) / std.
    mean, std = sources.astype(np.float64).mean(axis=(0, 1, 2)), sources.astype(np.float64).std(axis=(0, 1, 2))
    for plain, norm in zip(batches, normalised):
        np.testing.assert_allclose(norm["image"], (plain["image"] - mean) / std, rtol=1e-5, atol=1e-5)
    top_padded = found[:10 * 64:64][:, 1] < 4  # first image of each batch
    assert top_padded.any()
    for step in np.flatnonzero(top_padded):
        np.testing.assert_allclose(normalised[step]["image"][0, 0], np.broadcast_to(-mean / std, (32, 3)), rtol=1e-5)


def test_computed_normalisation_standardises_the_training_split(digits_dir):
    cfg = config("digits", data_dir=digits_dir, augment="none", validation_split="train")
    images = np.concatenate([b["image"][b["mask"]] for b in data.eval_batches(cfg, "validation", 256)])
    assert images.shape == (1257, 32, 32, 1)
    np.testing.assert_allclose(images.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(images.std(axis=(0, 1, 2)), 1.0, atol=1e-4)


def test_imagenet_augmentation_varies_and_evaluation_is_fixed():
    cfg, context = mocked("imagenet2012", 8)
    with context:
        first, second = take(data.train_batches(cfg, 8, seed=0), 2)  # one epoch each, new crops
        eval_once, eval_twice = (next(data.eval_batches(cfg, "validation", 8)) for _ in range(2))
    assert not np.allclose(first["image"], second["image"])
    assert np.isfinite(first["image"]).all()
    np.testing.assert_array_equal(eval_once["image"], eval_twice["image"])


# ------------------------------------------------------------------------------------------- evaluation
def test_eval_padding_covers_every_example_exactly_once(digits_dir):
    cfg = config("digits", data_dir=digits_dir, mean=(0.0,), std=(1.0,))
    images, labels = tfds.as_numpy(tfds.load("digits", split="validation", data_dir=digits_dir, batch_size=-1,
                                             as_supervised=True))
    assert data.num_eval_batches(cfg, "validation", 64) == 3
    per_process = [list(data.eval_batches(cfg, "validation", 64, p, 2)) for p in range(2)]
    assert [len(b) for b in per_process] == [3, 3]
    batches = concat(*per_process)
    assert_batches_equal(batches, list(data.eval_batches(cfg, "validation", 64)))
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(mask, np.arange(192) < 180)  # only the last batch is padded
    real = np.concatenate([b["image"] for b in batches])[mask]
    np.testing.assert_array_equal(real, images.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask], labels)
    assert not np.concatenate([b["image"] for b in batches])[~mask].any()


def test_streaming_eval_padding():
    cfg, context = mocked("imagenet2012", 13)
    with context:
        per_process = [list(data.eval_batches(cfg, "test", 8, p, 2)) for p in range(2)]
        single = list(data.eval_batches(cfg, "test", 8))
    assert_batches_equal(concat(*per_process), single)
    np.testing.assert_array_equal(np.concatenate([b["mask"] for b in single]), np.arange(16) < 13)
    assert not single[-1]["image"][~single[-1]["mask"]].any()


# ------------------------------------------------------------------------- determinism and multi-process
@pytest.mark.parametrize("name,num_examples,batch", [("cifar10", 50, 16), ("imagenet2012", 26, 8)])
def test_resume_is_exact_across_epochs(name, num_examples, batch):
    cfg, context = mocked(name, num_examples)
    with context:
        fresh = take(data.train_batches(cfg, batch, seed=5), 8)  # 3 steps per epoch
        resumed = take(data.train_batches(cfg, batch, seed=5, start_step=4), 4)  # mid-epoch 1 to epoch 2
        other_seed = next(data.train_batches(cfg, batch, seed=6))
    assert_batches_equal(resumed, fresh[4:])
    assert not np.array_equal(fresh[0]["label"], fresh[3]["label"])  # a new order every epoch
    assert not np.array_equal(other_seed["image"], fresh[0]["image"])


@pytest.mark.parametrize("name,num_examples,batch", [("cifar10", 40, 16), ("imagenet2012", 24, 8)])
def test_processes_get_slices_of_the_global_batch(name, num_examples, batch):
    cfg, context = mocked(name, num_examples)
    with context:
        single = take(data.train_batches(cfg, batch, seed=1, start_step=2), 3)
        per_process = [take(data.train_batches(cfg, batch, 1, 2, p, 2), 3) for p in range(2)]
    assert per_process[0][0]["image"].shape[0] == batch // 2
    assert_batches_equal(concat(*per_process), single)


@pytest.mark.parametrize("shuffle_buffer", [None, 100])
def test_streaming_and_in_memory_give_identical_batches(digits_dir, shuffle_buffer):
    """One order and one random stream: the same training batches (crops, flips, order, epochs) and
    evaluation batches from both paths, for the whole-split shuffle and a 100-example buffer."""
    raw = dict(data_dir=digits_dir, mean=(72.9,), std=(90.5,), random_flip=True, shuffle_buffer=shuffle_buffer)
    streamed, in_memory = config("digits", in_memory=False, **raw), config("digits", **raw)
    for split in ("validation", "test"):
        assert_batches_equal(list(data.eval_batches(streamed, split, 128)), list(data.eval_batches(in_memory, split, 128)))
    # 19 steps per epoch: steps 17-20 cross into the second epoch.
    expected = take(data.train_batches(in_memory, 64, seed=2, start_step=17), 4)
    assert_batches_equal(take(data.train_batches(streamed, 64, seed=2, start_step=17), 4), expected)
    per_process = [take(data.train_batches(streamed, 64, 2, 17, p, 2), 4) for p in range(2)]
    assert_batches_equal(concat(*per_process), expected)


def test_epoch_order_is_a_permutation_within_its_shuffle_buffer():
    for window in (None, 1, 7, 50, 200):
        order = data.epoch_order(50, seed=3, epoch=1, window=window)
        assert sorted(order.tolist()) == list(range(50))
        if window is not None and window < 50:
            assert np.all(order < np.arange(50) + window)  # never further ahead than the buffer
    assert data.epoch_order(50, 3, 1, 1).tolist() == list(range(50))  # a buffer of one keeps the order
    np.testing.assert_array_equal(data.epoch_order(50, 3, 1, 200), data.epoch_order(50, 3, 1))
    assert not np.array_equal(data.epoch_order(50, 3, 1, 7), data.epoch_order(50, 3, 2, 7))


def test_streaming_a_prepared_dataset_matches_in_memory(digits_dir):
    raw = dict(data_dir=digits_dir, mean=(0.0,), std=(1.0,))
    streamed = config("digits", in_memory=False, **raw)
    fresh = take(data.train_batches(streamed, 64, seed=2), 21)  # 19 steps per epoch
    assert_batches_equal(take(data.train_batches(streamed, 64, seed=2, start_step=17), 4), fresh[17:])
    per_process = [take(data.train_batches(streamed, 64, 2, 17, p, 2), 4) for p in range(2)]
    assert_batches_equal(concat(*per_process), fresh[17:])
    unaugmented = config("digits", in_memory=False, augment="none", **raw)
    epoch = np.concatenate([b["image"] for b in take(data.train_batches(unaugmented, 64, seed=2), 19)])
    assert len({image.tobytes() for image in epoch}) == 19 * 64  # no example twice in an epoch


def test_image_folder_streams_png_and_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 3)):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 256, (int(rng.integers(20, 50)), int(rng.integers(20, 50)), 3), np.uint8)
                encoded = tf.io.encode_png(image) if i % 2 else tf.io.encode_jpeg(image)
                tf.io.write_file(str(tmp_path / split / label / f"{i}.{'png' if i % 2 else 'jpg'}"), encoded)
    # Sizes vary: streamed with the 'imagenet' augmentation (the preset would take these <= 64-pixel
    # images CIFAR-style, which needs one size: tests/test_folder.py).
    cfg = config(f"folder:{tmp_path}", validation_split="", image_size=24, eval_image_size=16, augment="imagenet",
                 in_memory=False, shuffle_buffer=10_000)
    info = data.dataset_info(cfg)
    assert (info.num_classes, info.num_train, info.num_validation, info.num_test) == (2, 12, 0, 6)
    fresh = take(data.train_batches(cfg, 4, seed=0), 5)
    assert fresh[0]["image"].shape == (4, 24, 24, 3)
    assert_batches_equal(take(data.train_batches(cfg, 4, seed=0, start_step=2), 3), fresh[2:])
    batches = list(data.eval_batches(cfg, "test", 4))
    assert batches[0]["image"].shape == (4, 16, 16, 3)
    assert sum(b["mask"].sum() for b in batches) == 6
    assert list(data.eval_batches(cfg, "validation", 4)) == []


# ------------------------------------------------------------------------------------------ label noise
@pytest.mark.parametrize("noise", [0.1, 0.3, 0.5, 0.7])
def test_corrupt_labels_follows_the_confusion_matrix(noise):
    labels = np.random.default_rng(0).integers(0, 10, 10_000)
    noisy = data.corrupt_labels(labels, 10, noise, seed=0)
    changed = noisy != labels
    assert abs(changed.mean() - noise) <= 0.01
    np.testing.assert_array_equal(noisy, data.corrupt_labels(labels, 10, noise, seed=0))
    assert not np.array_equal(noisy, data.corrupt_labels(labels, 10, noise, seed=1))
    # Off-diagonal: every other class equally likely, whatever the true class.
    shift = np.bincount((noisy - labels)[changed] % 10, minlength=10)
    assert shift[0] == 0
    expected = changed.sum() / 9
    assert np.all(np.abs(shift[1:] - expected) < 4 * np.sqrt(expected))
    confusion = np.zeros((10, 10))
    np.add.at(confusion, (labels, noisy), 1)
    off_diagonal = (confusion / confusion.sum(1, keepdims=True))[~np.eye(10, dtype=bool)]
    np.testing.assert_allclose(off_diagonal, noise / 9, atol=0.025)


def test_label_noise_touches_training_labels_only(digits_dir):
    clean, noisy = config("digits", data_dir=digits_dir), config("digits", data_dir=digits_dir, label_noise=0.3)
    steps = 1257 // 64  # one epoch
    clean_train, noisy_train = (take(data.train_batches(c, 64, seed=0), steps) for c in (clean, noisy))
    for a, b in zip(clean_train, noisy_train):
        np.testing.assert_array_equal(a["image"], b["image"])
    changed = np.mean(np.concatenate([a["label"] != b["label"] for a, b in zip(clean_train, noisy_train)]))
    assert abs(changed - 0.3) < 0.02
    for split in ("validation", "test"):
        assert_batches_equal(list(data.eval_batches(noisy, split, 64)), list(data.eval_batches(clean, split, 64)))


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("overrides,call,match", [
    ({"name": "no_such_dataset"}, "info", "unknown dataset 'no_such_dataset'"),
    ({}, "train_63_over_2", "does not divide by the 2 processes"),
    ({"train_split": "trian"}, "info", "bad train_split 'trian'"),
    ({"test_split": "test[abc"}, "info", "bad test_split"),
    ({}, "eval_train", "bad evaluation split 'train'"),
    ({"label_noise": 1.0}, "info", r"--config.data.label_noise=1.0: must be in \[0, 1\)"),
    ({"label_noise": -0.1}, "train", r"--config.data.label_noise=-0.1: must be in \[0, 1\)"),
    ({"image_size": 0}, "info", "--config.data.image_size=0: must be > 0"),
    ({"crop_padding": -1}, "info", "--config.data.crop_padding=-1: must be >= 0"),
    ({"shuffle_buffer": 0}, "info", r"--config.data.shuffle_buffer=0: must be > 0, or None"),
    ({"augment": "autoaugment"}, "info", "unknown augment 'autoaugment'"),
    ({"in_memory": False}, "info", "needs explicit mean and std"),
    ({"channels": 3}, "info", r"--config.data.channels=3: 'digits' has 1-channel images"),
    ({"on_bad_image": "drop"}, "info", r"--config.data.on_bad_image='drop': choose one of"),
    ({"augment": "imagenet"}, "info", "use a streaming dataset"),
    ({"global_batch": 2048}, "train", "exceeds the 1257 training examples"),
])
def test_configuration_errors(digits_dir, overrides, call, match):
    overrides = dict(overrides)
    batch = overrides.pop("global_batch", 64)
    cfg = config("digits", data_dir=digits_dir)
    cfg.update(overrides)
    with pytest.raises(ValueError, match=match) as error:
        if call == "info":
            data.dataset_info(cfg)
        elif call == "train":
            data.train_batches(cfg, batch, seed=0)
        elif call == "train_63_over_2":
            data.train_batches(cfg, 63, 0, 0, 0, 2)
        else:
            data.eval_batches(cfg, "train", batch)
    assert "\n" not in str(error.value)


def test_unprepared_imagenet_says_how_to_prepare_it(tmp_path):
    with pytest.raises(ValueError, match="ILSVRC2012_img_train.tar") as error:
        data.dataset_info(config("imagenet2012", data_dir=str(tmp_path)))
    assert str(tmp_path / "downloads" / "manual") in str(error.value)


def test_streaming_needs_mean_and_std():
    cfg, context = mocked("imagenet2012", 4, mean=None)
    with context, pytest.raises(ValueError, match="needs explicit mean and std"):
        data.train_batches(cfg, 4, seed=0)

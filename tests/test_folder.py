"""Image folders: checked before anything is written (bad files, sizes, empty classes), skipped when
asked, grey/colour conversion, their own normalisation, the preset by size, the scan cache, and a
test split that goes bad during a run.

Every folder is generated here (PNG files of random pixels); nothing is downloaded.
"""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import child_env, digits_config

from resattn_jax.training import data
from resattn_jax.training import loop as train_lib
from resattn_jax.training.data import folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("a", "b", "c")


def write_png(path, image) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tf.io.write_file(str(path), tf.io.encode_png(image))


def make_folder(root, size=12, channels=1, counts=(("train", 8), ("validation", 3), ("test", 3)), seed=0):
    """``root/split/class/i.png``: random pixels, class ``a`` brighter (so a network can learn it)."""
    rng = np.random.default_rng(seed)
    for split, count in counts:
        for label, name in enumerate(CLASSES):
            for i in range(count):
                image = rng.integers(0, 156, (size, size, channels)) + (100 if label == 0 else 0)
                write_png(os.path.join(root, split, name, f"{i}.png"), image.astype(np.uint8))
    return str(root)


def folder_config(root, steps=4, **overrides):
    """``tests/tiny_config.py`` on the folder, with its preset (as ``--config.data.name=folder:ROOT`` gives)."""
    config = digits_config(steps)
    config.data = data.data_preset(f"folder:{root}")
    for key, value in overrides.items():
        config.data[key] = value
    return config


def truncate(path) -> None:
    with open(path, "rb") as f:
        encoded = f.read()
    with open(path, "wb") as f:
        f.write(encoded[:len(encoded) // 2])


@pytest.fixture
def grey(tmp_path):
    return make_folder(tmp_path / "grey")


# ------------------------------------------------------------------- bad inputs: one line, nothing written
def _truncated_train(root):
    truncate(os.path.join(root, "train", "b", "3.png"))
    return r"1 bad image, the first train/b/3\.png: Invalid PNG data"


def _truncated_test(root):
    truncate(os.path.join(root, "test", "c", "1.png"))
    return r"1 bad image, the first test/c/1\.png: Invalid PNG data"


def _text_file(root):
    with open(os.path.join(root, "train", "a", "notes.png"), "w") as f:
        f.write("not an image\n")
    return r"the first train/a/notes\.png: Unknown image file format"


def _other_size(root):
    write_png(os.path.join(root, "train", "c", "small.png"), np.zeros((10, 10, 1), np.uint8))
    return r"the first train/c/small\.png: it is 10x10, the other images 12x12 \(augment 'cifar' needs one size"


def _empty_class(root):
    os.makedirs(os.path.join(root, "train", "d"))
    return r"1 empty class directory \(train/d\): add images or remove them"


BAD_INPUTS = {"truncated train PNG": _truncated_train, "truncated test PNG": _truncated_test,
              "text file named .png": _text_file, "image of another size": _other_size, "empty class": _empty_class}


@pytest.mark.parametrize("spoil", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_folder_stops_before_anything_is_written(grey, tmp_path, spoil):
    config = folder_config(grey)  # the preset, scanned while the folder was good
    match = spoil(grey)
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=match) as error:
        train_lib.train_and_evaluate(config, str(workdir))
    assert "\n" not in str(error.value)
    assert not workdir.exists()


def test_skipped_bad_images_are_counted_and_left_out(grey, capsys):
    _truncated_train(grey)
    _text_file(grey)
    _other_size(grey)
    cfg = folder_config(grey, on_bad_image="skip").data
    info = data.dataset_info(cfg)
    assert "skipping 3 bad images (on_bad_image=skip), the first train/a/notes.png" in capsys.readouterr().err
    assert (info.num_train, info.num_validation, info.num_test) == (3 * 8 + 2 - 3, 9, 9)  # 2 files added, 3 bad
    batches = [next(data.train_batches(cfg, 8, seed=0, start_step=s)) for s in (0, 1, 2)]
    again = data.train_batches(cfg, 8, seed=0)
    for batch in batches:  # deterministic: the same images are left out, the same order follows
        np.testing.assert_array_equal(batch["image"], next(again)["image"])
    with pytest.raises(ValueError, match=r"--config.data.on_bad_image='ignore': choose one of \('error', 'skip'\)"):
        data.dataset_info(folder_config(grey, on_bad_image="ignore").data)


# -------------------------------------------------------------------------------------- grey and colour
def test_grey_and_colour_mixes_take_the_majority_or_the_configured_channels(tmp_path):
    root = make_folder(tmp_path / "mixed", channels=1)
    for i in range(3):  # a minority of colour images
        write_png(os.path.join(root, "train", "b", f"colour{i}.png"), np.full((12, 12, 3), 200, np.uint8))
    write_png(os.path.join(root, "test", "a", "colour.png"), np.full((12, 12, 3), 200, np.uint8))
    grey_cfg = folder_config(root).data
    assert data.dataset_info(grey_cfg).image_shape == (12, 12, 1)
    assert next(data.eval_batches(grey_cfg, "test", 64))["image"].shape[-1] == 1
    colour_cfg = folder_config(root, channels=3).data
    assert data.dataset_info(colour_cfg).image_shape == (12, 12, 3)
    mean, std = data.normalisation(colour_cfg)
    assert mean.shape == std.shape == (3,)
    with pytest.raises(ValueError, match=r"--config.data.channels=2: must be 1 \(grey\) or 3 \(colour\)"):
        data.dataset_info(folder_config(root, channels=2).data)


def test_folder_normalisation_is_computed_over_the_training_split(grey):
    cfg = folder_config(grey).data
    mean, std = data.normalisation(cfg)
    images = np.stack([tf.io.decode_png(tf.io.read_file(os.path.join(grey, "train", c, f"{i}.png"))).numpy()
                       for c in CLASSES for i in range(8)]).astype(np.float64)
    np.testing.assert_allclose(mean, images.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(std, images.std(axis=(0, 1, 2)), rtol=1e-4)
    evaluated = np.concatenate([b["image"][b["mask"]] for b in data.eval_batches(cfg, "test", 64)])
    assert abs(evaluated.mean()) < 0.3 and 0.7 < evaluated.std() < 1.3  # standardised by the train split


# -------------------------------------------------------------------------------------- preset and cache
def test_preset_by_image_size(tmp_path):
    small = data.data_preset(f"folder:{make_folder(tmp_path / 'small', size=28, counts=(('train', 2),))}")
    assert (small.image_size, small.eval_image_size, small.augment, small.in_memory) == (28, 28, "cifar", True)
    assert (small.validation_split, small.test_split, small.mean, small.crop_padding) == ("", "", None, 4)
    large = data.data_preset(f"folder:{make_folder(tmp_path / 'large', size=80, counts=(('train', 2), ('test', 1)))}")
    assert (large.image_size, large.augment, large.in_memory, large.test_split) == (224, "imagenet", False, "test")
    info = data.dataset_info(large)  # streamed with its own normalisation (no mean/std needed)
    assert info.image_shape == (224, 224, 1) and info.num_test == 3
    assert data.normalisation(large)[0].shape == (1,)


def test_scan_is_cached_by_path_size_and_mtime(grey, monkeypatch):
    folder.scan(grey)
    decoded = []
    real = folder._measure
    monkeypatch.setattr(folder, "_measure", lambda path: decoded.append(path) or real(path))
    folder._SCANS.clear()  # a new process: only the cache file remains
    folder.scan(grey)
    assert decoded == []
    changed = os.path.join(grey, "train", "a", "0.png")
    write_png(changed + ".new", np.zeros((12, 12, 1), np.uint8))
    os.replace(changed + ".new", changed)
    assert folder.scan(grey).splits["train"][0].grey[0] == 0.0
    assert decoded == [changed]


# ------------------------------------------------------------------------------------ the command line
def run_cli(root, workdir, *flags):
    return subprocess.run([sys.executable, "train.py", "--config", "tests/tiny_config.py:4", "--workdir", str(workdir),
                           f"--config.data.name=folder:{root}", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=child_env())


def test_cli_trains_a_grey_folder_from_its_name_alone(tmp_path):
    root = make_folder(tmp_path / "grey", size=20)
    result = run_cli(root, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "image_size=20, eval_image_size=20, augment='cifar'" in result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_examples"] == 9 and summary["steps"] == 4
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert (stored["image_size"], stored["in_memory"], stored["channels"]) == (20, True, None)


def test_cli_bad_image_is_one_line_with_status_2(grey, tmp_path):
    _truncated_train(grey)
    result = run_cli(grey, tmp_path / "run", "--config.data.image_size=12")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"train.py: error: dataset 'folder:{grey}': 1 bad image, the first train/b/3.png: Invalid PNG data")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- a test split gone bad
def test_test_split_failing_after_training_keeps_the_run_and_a_rerun_only_evaluates(grey, tmp_path):
    workdir = str(tmp_path / "run")
    spoilt = os.path.join(grey, "test", "b", "2.png")
    with open(spoilt, "rb") as f:
        good = f.read()

    def spoil(step, batch):  # the data goes bad while the run trains
        if step == 2:
            truncate(spoilt)

    with pytest.raises(ValueError, match=r"test/b/2\.png: Invalid PNG data.*training is complete .*checkpoints/4\): "
                                         r"fix the data and rerun the same command"):
        train_lib.train_and_evaluate(folder_config(grey), workdir, batch_hook=spoil)
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    with open(spoilt + ".fixed", "wb") as f:
        f.write(good)
    os.replace(spoilt + ".fixed", spoilt)
    console = io.StringIO()
    with contextlib.redirect_stderr(console):
        summary = train_lib.train_and_evaluate(folder_config(grey), workdir)
    assert (summary["resumed_from_step"], summary["steps"], summary["test_examples"]) == (4, 4, 9)
    assert os.path.exists(os.path.join(workdir, "summary.json"))

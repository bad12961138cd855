"""The evaluate command: accuracies, per-class accuracy and the confusion matrix of a trained run, on
its own test split and on image folders (normalised as the run normalises), and its one-line errors.

Everything runs on one short digits run of the tiny network (conftest's ``digits_workdir``); the
command runs in-process through its ``main(argv)``.
"""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from resattn_jax.tools import evaluate, inference
from resattn_jax.training import data
from resattn_jax.training.data import sources

PROG = "python -m resattn_jax.evaluate"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DIGITS = tuple("0123456789")


@pytest.fixture(scope="module")
def trained(digits_workdir):
    return inference.load(digits_workdir)


@pytest.fixture(scope="module")
def summary(digits_workdir):
    with open(os.path.join(digits_workdir, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def digits_folder(trained, tmp_path_factory):
    """The run's test images as PNG files, ``root/test/<digit>/<i>.png``."""
    images, labels = sources.read_arrays(sources.resolve(trained.config.data), "test")
    root = tmp_path_factory.mktemp("digits_png")
    for i, (image, label) in enumerate(zip(images, labels)):
        path = root / "test" / DIGITS[label] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tf.io.write_file(str(path), tf.io.encode_png(image))
    return str(root)


def write_pngs(root, names, count=2, size=32) -> str:
    for name in names:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(count):
            tf.io.write_file(os.path.join(root, name, f"{i}.png"), tf.io.encode_png(np.full((size, size, 1), 40 * i,
                                                                                            np.uint8)))
    return str(root)


def printed_number(text: str, label: str) -> float:
    return float(re.search(rf"^{label}: ([0-9.]+)", text, re.M).group(1))


def per_class_lines(text: str) -> dict[str, tuple[int, str]]:
    lines = text.split("per-class accuracy:\n", 1)[1].splitlines()[1:]
    rows = [line.split() for line in lines if line.startswith("  ")]
    return {name: (int(count), accuracy) for name, count, accuracy in rows}


def check_png(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    decoded = tf.io.decode_png(tf.io.read_file(path)).numpy()
    assert min(decoded.shape[:2]) > 200 and decoded.std() > 0


# ------------------------------------------------------------------------------------------ pieces
def test_confusion_matrix_and_class_accuracy():
    confusion = evaluate.confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 4)
    np.testing.assert_array_equal(confusion, [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    counts, accuracies = evaluate.class_accuracy(confusion)
    np.testing.assert_array_equal(counts, [2, 1, 3, 0])
    np.testing.assert_allclose(accuracies[:3], [0.5, 1.0, 2 / 3])
    assert np.isnan(accuracies[3])  # no images of class 3
    figure = evaluate.confusion_figure(confusion, ["a", "b", "c", "d"], "title")
    np.testing.assert_allclose(figure.axes[0].images[0].get_array(),
                               [[0.5, 0.5, 0, 0], [0, 1, 0, 0], [1 / 3, 0, 2 / 3, 0], [0, 0, 0, 0]])
    assert sorted(t.get_text() for t in figure.axes[0].texts) == ["1", "1", "1", "1", "2"]
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["a", "b", "c", "d"]


def test_runs_know_their_class_names(trained):
    assert trained.info.class_names == DIGITS


# ------------------------------------------------------------------------------------------ the run
def test_cli_matches_the_runs_test_summary(digits_workdir, summary, capsys):
    assert evaluate.main(["--workdir", digits_workdir]) == 0
    out = capsys.readouterr().out
    assert printed_number(out, "top-1 accuracy") == pytest.approx(summary["test_accuracy"], abs=5e-5)
    assert printed_number(out, "top-5 accuracy") == pytest.approx(summary["test_top5"], abs=5e-5)
    assert printed_number(out, "loss") == pytest.approx(summary["test_loss"], abs=5e-4)
    assert f"(step {summary['best_step']}) on the test split of digits: 360 images" in out
    rows = per_class_lines(out)
    assert list(rows) == list(DIGITS) and sum(count for count, _ in rows.values()) == 360
    path = os.path.join(digits_workdir, "confusion_best_test.png")
    assert f"wrote {path}" in out
    check_png(path)


def test_evaluate_run_result(digits_workdir, summary, trained):
    result = evaluate.evaluate_run(digits_workdir, "best")
    assert (result.step, result.count, result.dataset, result.split) == (summary["best_step"], 360, "digits", "test")
    assert result.top1 == pytest.approx(summary["test_accuracy"], abs=1e-9)  # the same images and checkpoint
    assert result.top5 == pytest.approx(summary["test_top5"], abs=1e-9)
    assert result.loss == pytest.approx(summary["test_loss"], rel=1e-4)
    assert result.confusion.shape == (10, 10) and result.confusion.sum() == 360
    np.testing.assert_array_equal(result.class_counts, result.confusion.sum(axis=1))
    _, labels = sources.read_arrays(sources.resolve(trained.config.data), "test")
    np.testing.assert_array_equal(result.class_counts, np.bincount(labels, minlength=10))
    np.testing.assert_allclose(result.class_accuracies, np.diag(result.confusion) / result.confusion.sum(axis=1))
    assert np.trace(result.confusion) / 360 == pytest.approx(result.top1)

    validation = evaluate.evaluate_trained(trained, "validation", batch_size=50)  # a padded last batch
    assert validation.count == 180 and validation.confusion.sum() == 180


# ------------------------------------------------------------------------------------------ folders
def test_image_folder_of_the_test_images_gives_the_runs_numbers(trained, digits_workdir, digits_folder, capsys):
    own = evaluate.evaluate_trained(trained, "test")
    assert evaluate.main(["--workdir", digits_workdir, "--data", f"folder:{digits_folder}"]) == 0
    out = capsys.readouterr().out
    assert f"on the test split of folder:{digits_folder}: 360 images" in out
    assert printed_number(out, "top-1 accuracy") == pytest.approx(own.top1, abs=5e-5)
    assert printed_number(out, "top-5 accuracy") == pytest.approx(own.top5, abs=5e-5)
    assert per_class_lines(out) == {name: (int(count), f"{accuracy:.4f}") for name, count, accuracy
                                    in zip(DIGITS, own.class_counts, own.class_accuracies)}
    check_png(os.path.join(digits_workdir, f"confusion_best_{os.path.basename(digits_folder)}.png"))

    # The folder is normalised by the run's statistics (its training split's), not by its own.
    cfg = evaluate.folder_data_config(trained.config.data, digits_folder, "test", 1)
    run_mean, run_std = data.normalisation(trained.config.data)
    assert cfg.mean == pytest.approx(tuple(run_mean)) and cfg.std == pytest.approx(tuple(run_std))
    cfg.mean, cfg.std = None, None
    folder_mean, _ = data.normalisation(cfg)
    assert abs(float(folder_mean[0]) - float(run_mean[0])) > 0.01

    # root/<class>/<image> (here the split folder itself) works too: the same images, the same numbers
    # (the loss would move with the normalisation).
    result = evaluate.evaluate_trained(trained, "test", f"folder:{digits_folder}/test")
    assert (result.count, result.dataset, result.split) == (360, f"folder:{digits_folder}/test", "")
    np.testing.assert_array_equal(result.confusion, own.confusion)
    assert result.top1 == own.top1 and result.top5 == own.top5
    assert result.loss == pytest.approx(own.loss, rel=1e-5)


def test_folder_with_some_of_the_classes(trained, tmp_path):
    root = write_pngs(tmp_path / "few" / "test", ["3", "7"], count=3)
    result = evaluate.evaluate_trained(trained, "test", f"folder:{os.path.dirname(root)}")
    assert result.count == 6 and result.class_counts.tolist() == [0, 0, 0, 3, 0, 0, 0, 3, 0, 0]
    assert np.isnan(result.class_accuracies[0]) and result.confusion[[3, 7]].sum() == 6


def run_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(argv)
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert captured.err.startswith(f"{PROG}: error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


def test_bad_inputs_are_one_line_errors(digits_workdir, tmp_path, capsys):
    letters = write_pngs(tmp_path / "letters" / "test", ["a", "b"])
    err = run_error(["--workdir", digits_workdir, "--data", f"folder:{os.path.dirname(letters)}", "--out",
                     str(tmp_path / "x.png")], capsys)
    assert "differ from the run's: 2 not in the run ('a', 'b'); 10 of the run's 10 not in the folder ('0', '1'" in err
    assert not (tmp_path / "x.png").exists()

    err = run_error(["--workdir", digits_workdir, "--checkpoint", "newest"], capsys)
    assert "unknown checkpoint 'newest': choose best, latest, ema or a step number" in err
    err = run_error(["--workdir", digits_workdir, "--checkpoint", "3"], capsys)
    assert "no checkpoint at step 3" in err
    err = run_error(["--workdir", str(tmp_path)], capsys)
    assert "holds no training run (no config.json)" in err
    err = run_error(["--workdir", digits_workdir, "--split", "train"], capsys)
    assert "bad split 'train'" in err
    err = run_error(["--workdir", digits_workdir, "--data", f"folder:{tmp_path / 'nowhere'}"], capsys)
    assert "is not a directory" in err and "<class>/<image>" in err
    err = run_error(["--workdir", digits_workdir, "--data", f"folder:{os.path.dirname(letters)}", "--split",
                     "validation"], capsys)
    assert "has no split folder 'validation' (its split folders: test): choose one with --split" in err
    err = run_error(["--workdir", digits_workdir, "--data", str(tmp_path)], capsys)
    assert "--data takes an image folder as folder:/path" in err

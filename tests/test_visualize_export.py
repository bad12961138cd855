"""Soft-mask figure, stage responses, training curves and the exported inference function.

Everything runs on one short digits run of the tiny network (the ``digits_workdir`` fixture); the
commands run in-process through their ``main(argv)``, and the tests check the plotted data.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from conftest import child_env
from matplotlib import image as mpimg

from resattn_jax.tools import analyze, export, inference, visualize
from resattn_jax.training import data
from resattn_jax.training import loop as train_lib

MASKS = ["stage1_attention0", "stage2_attention0", "stage3_attention0"]
STAGES = ["stage1", "stage2", "stage3", "final"]


@pytest.fixture(scope="module")
def trained(digits_workdir):
    return inference.load(digits_workdir)


def check_png(path: str) -> None:
    """A readable, non-blank PNG of a real figure."""
    assert os.path.getsize(path) > 0
    picture = mpimg.imread(path)
    assert picture.ndim == 3 and min(picture.shape[:2]) > 200 and picture[..., :3].std() > 0.05


def write_png(path, pixels: np.ndarray) -> str:
    tf.io.write_file(str(path), tf.io.encode_png(pixels.astype(np.uint8)))
    return str(path)


def test_load_trained_checkpoints(digits_workdir, trained, tmp_path):
    assert trained.step == 4 and trained.checkpoint.endswith(os.path.join("checkpoints", "4"))
    # A run written before the recipe and image-folder fields existed still loads.
    old = tmp_path / "old"
    shutil.copytree(digits_workdir, old)
    stored = json.loads((old / "config.json").read_text())
    for key in ("label_smoothing", "mix", "grad_accum_steps", "ema_decay", "best_by", "init_from", "freeze",
                "profile_steps"):
        stored.pop(key)
    stored["optimizer"].pop("schedule"), stored["data"].pop("channels"), stored["data"].pop("on_bad_image")
    (old / "config.json").write_text(json.dumps(stored))
    assert train_lib.load_trained(str(old)).step == 4
    assert trained.info.eval_image_shape == (32, 32, 1) and trained.info.num_classes == 10
    assert train_lib.load_trained(digits_workdir, "latest").step == 4
    assert train_lib.load_trained(digits_workdir, "2").step == 2
    with pytest.raises(ValueError, match=r"no checkpoint at step 3 .*steps: \[2, 4\]"):
        train_lib.load_trained(digits_workdir, 3)
    with pytest.raises(ValueError, match="checkpoint must be 'best', 'latest', 'ema' or a step, got 'newest'"):
        train_lib.load_trained(digits_workdir, "newest")


def test_soft_mask_maps_and_their_figure(trained, digits_workdir, tmp_path, capsys):
    images, labels = inference.split_images(trained, "test", 3)
    assert images.shape == (3, 32, 32, 1) and labels.shape == (3,)
    maps = visualize.soft_mask_maps(trained, images)
    assert list(maps) == MASKS
    for values in maps.values():
        assert values.shape == (3, 32, 32) and values.min() >= 0.0 and values.max() <= 1.0 and values.std() > 0
    # Stage 1 runs at the input resolution: its map is exactly the channel mean of the mask.
    masks = inference.forward(trained, images).soft_masks
    assert [m.shape[1:3] for m in masks.values()] == [(32, 32), (16, 16), (8, 8)]
    np.testing.assert_allclose(maps["stage1_attention0"], masks["stage1_attention0"].mean(-1), atol=1e-6)

    # The figure draws the input and, over it, exactly these maps.
    pixels = inference.display_pixels(trained, images)
    figure = visualize.soft_mask_figure(pixels, maps, [f"label {label}" for label in labels])
    axes = [ax for ax in figure.axes if ax.images]  # without the colour bars
    assert len(axes) == 3 * (1 + len(MASKS))
    for i in range(3):
        row = axes[i * 4:(i + 1) * 4]
        np.testing.assert_array_equal(row[0].images[0].get_array(), pixels[i, ..., 0])
        for ax, name in zip(row[1:], MASKS):
            np.testing.assert_array_equal(ax.images[-1].get_array(), maps[name][i])

    # One colour scale by default (0..1: the sigmoid masks' range), one colour bar, and a caption;
    # per module with scale='column'.
    limits = {ax.images[-1].get_clim() for ax in axes if ax not in axes[::4]}
    assert limits == {(0.0, 1.0)} and len(figure.axes) == len(axes) + 1
    assert any("High (red)" in text.get_text() for text in figure.texts)
    figure = visualize.soft_mask_figure(pixels, maps, [f"label {label}" for label in labels], scale="column")
    axes = [ax for ax in figure.axes if ax.images]
    assert axes[1].images[-1].get_clim() == (maps[MASKS[0]].min(), maps[MASKS[0]].max())
    assert len(figure.axes) == len(axes) + len(MASKS)
    with pytest.raises(ValueError, match="unknown scale"):
        visualize.soft_mask_figure(pixels, maps, ["a", "b", "c"], scale="row")

    out = tmp_path / "masks.png"
    assert visualize.main(["--workdir", digits_workdir, "--num-images", "2", "--out", str(out)]) == 0
    check_png(str(out))
    assert f"wrote {out}" in capsys.readouterr().out


def test_image_files_are_normalised_like_the_pipeline(trained, digits_workdir, tmp_path, capsys):
    images, _ = inference.split_images(trained, "test", 2)
    raw = np.round(inference.display_pixels(trained, images) * 255.0)
    paths = [write_png(tmp_path / f"digit{i}.png", raw[i]) for i in range(2)]
    np.testing.assert_allclose(inference.read_images(trained, paths), images, atol=1e-5)

    out = tmp_path / "files.png"
    assert visualize.main(["--workdir", digits_workdir, "--images", *paths, "--out", str(out)]) == 0
    check_png(str(out))
    assert f"wrote {out}" in capsys.readouterr().out


def test_wrong_images_fail_clearly(trained, digits_workdir, tmp_path, capsys):
    small = write_png(tmp_path / "small.png", np.zeros((28, 28, 1)))
    rgb = write_png(tmp_path / "rgb.png", np.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match=r"small.png is 28x28; this network takes 32x32 images"):
        inference.read_images(trained, [small])
    with pytest.raises(ValueError, match=r"rgb.png has 3 channels; this network takes 1-channel images \(grey\)"):
        inference.read_images(trained, [rgb])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot decode image .*text.png: not a PNG, JPEG, GIF, BMP or WebP file"):
        inference.read_images(trained, [str(tmp_path / "text.png")])
    with pytest.raises(ValueError, match=r"cannot read image .*missing.png: No such file or directory"):
        inference.read_images(trained, [str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match=r"images of shape \(2, 32, 32, 3\): this network takes \[N, 32, 32, 1\]"):
        visualize.soft_mask_maps(trained, np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(SystemExit) as exit_:
        visualize.main(["--workdir", digits_workdir, "--images", rgb, "--out", str(tmp_path / "x.png")])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and stderr.count("\n") == 1 and "error: image" in stderr and "3 channels" in stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command", [
    ["python -m resattn_jax.visualize", visualize.main, []],
    ["python -m resattn_jax.analyze response", analyze.main, ["response"]],
    ["python -m resattn_jax.export", export.main, []],
], ids=["visualize", "analyze", "export"])
def test_workdirs_without_checkpoints_fail_clearly(command, digits_workdir, tmp_path, capsys):
    prog, main, subcommand = command
    empty, untrained = tmp_path / "empty", tmp_path / "untrained"
    empty.mkdir()
    untrained.mkdir()
    shutil.copy(os.path.join(digits_workdir, "config.json"), untrained)
    for workdir, message in ((empty, "holds no training run (no config.json)"), (untrained, "has no checkpoints")):
        with pytest.raises(SystemExit) as exit_:
            main([*subcommand, "--workdir", str(workdir), "--out", str(tmp_path / "out.png")])
        assert exit_.value.code == 2
        assert capsys.readouterr().err == f"{prog}: error: {workdir} {message}" + (
            f" (train first: python train.py --workdir {workdir} ...)\n" if workdir == untrained else "\n")
    assert os.listdir(untrained) == ["config.json"]  # nothing written into the workdir


def test_stage_responses_of_several_runs(trained, digits_workdir, tmp_path, capsys):
    images, _ = inference.split_images(trained, "validation", 16)
    responses = analyze.stage_responses(trained, images)
    assert list(responses) == STAGES and all(np.isfinite(v) and v > 0 for v in responses.values())
    stage3 = inference.forward(trained, images).stage_outputs["stage3"]
    assert responses["stage3"] == pytest.approx(float(np.abs(stage3).mean()), rel=1e-6)

    figure = analyze.response_figure({"a": responses, "b": {k: 2 * v for k, v in responses.items()}}, "title")
    bars = figure.axes[0].patches
    heights = [bar.get_height() for bar in bars]
    assert heights == pytest.approx([*responses.values(), *(2 * v for v in responses.values())])
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == STAGES

    other = tmp_path / "copy"
    shutil.copytree(digits_workdir, other)
    out = tmp_path / "response.png"
    assert analyze.main(["response", "--workdir", digits_workdir, "--workdir", str(other), "--num-images", "16",
                         "--out", str(out)]) == 0
    check_png(str(out))
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "copy (step 4, tiny, arl): stage1" in printed


def test_training_curves(digits_workdir, tmp_path, capsys):
    metrics = analyze.read_metrics(digits_workdir)
    assert {"train_loss", "train_accuracy", "learning_rate", "validation_accuracy", "test_accuracy"} <= set(metrics)
    np.testing.assert_array_equal(metrics["train_loss"][0], [2, 4])
    figure = analyze.curves_figure(metrics, "run")
    lines = {line.get_label(): line for ax in figure.axes for line in ax.get_lines()}
    assert {"train_loss", "validation_loss", "test_loss", "train_accuracy", "validation_accuracy", "test_accuracy",
            "learning_rate"} == set(lines)
    for key, line in lines.items():
        np.testing.assert_array_equal(line.get_xdata(), metrics[key][0])
        np.testing.assert_array_equal(line.get_ydata(), metrics[key][1])

    out = tmp_path / "curves.png"
    assert analyze.main(["curves", "--workdir", digits_workdir, "--out", str(out)]) == 0
    check_png(str(out))
    assert f"wrote {out}" in capsys.readouterr().out

    # A resumed run logs some steps twice: the last record wins; non-finite values come back as floats.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 2, "train_loss": 3.0}, {"step": 4, "train_loss": 2.0}, {"step": 4, "train_loss": 1.5},
        {"step": 6, "train_loss": "nan"}]) + "\n")
    steps, values = analyze.read_metrics(str(resumed))["train_loss"]
    np.testing.assert_array_equal(steps, [2, 4, 6])
    np.testing.assert_array_equal(values, [3.0, 1.5, np.nan])
    with pytest.raises(ValueError, match="has no metrics.jsonl"):
        analyze.read_metrics(str(tmp_path))


def test_exported_function_matches_the_library_in_a_fresh_process(trained, digits_workdir, tmp_path, capsys):
    out = tmp_path / "export"
    assert export.main(["--workdir", digits_workdir, "--out", str(out), "--saved-model"]) == 0
    printed = capsys.readouterr().out
    for name in (export.EXPORTED_FILE, export.SAVED_MODEL_DIR, export.METADATA_FILE):
        assert f"wrote {out / name}" in printed
    metadata = json.loads((out / export.METADATA_FILE).read_text())
    assert metadata["input"]["shape"] == [None, 32, 32, 1] and metadata["output"]["shape"] == [None, 10]
    assert metadata["platforms"] == ["cpu", "cuda"] and metadata["step"] == 4
    mean, std = data.normalisation(trained.config.data)
    assert metadata["input"]["mean"] == pytest.approx(mean.tolist()) and metadata["input"]["std"] == pytest.approx(
        std.tolist())

    images, _ = inference.split_images(trained, "test", 7)
    batches = {"b1": images[:1], "b7": images}
    expected = {k: np.asarray(trained.model.apply(trained.variables, v, train=False)) for k, v in batches.items()}
    np.savez(tmp_path / "images.npz", **batches)
    script = textwrap.dedent(f"""
        import numpy as np
        from resattn_jax.tools.export import load_exported, load_saved_model
        images = dict(np.load({str(tmp_path / "images.npz")!r}))
        infer, saved = load_exported({str(out)!r}), load_saved_model({str(out)!r})
        np.savez({str(tmp_path / "logits.npz")!r}, **{{f"jax_{{k}}": np.asarray(infer(v)) for k, v in images.items()}},
                 **{{f"tf_{{k}}": saved(v) for k, v in images.items()}})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    logits = np.load(tmp_path / "logits.npz")
    for key, value in expected.items():
        assert logits[f"jax_{key}"].shape == logits[f"tf_{key}"].shape == value.shape
        np.testing.assert_allclose(logits[f"jax_{key}"], value, atol=1e-5, rtol=0)
        np.testing.assert_allclose(logits[f"tf_{key}"], value, atol=1e-5, rtol=0)


def test_export_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="holds no exported model"):
        export.load_exported(str(tmp_path))
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # as if TensorFlow were not installed
    with pytest.raises(ValueError, match=r"the SavedModel needs TensorFlow \(pip install tensorflow-cpu\)"):
        export.load_saved_model(str(tmp_path))


@pytest.mark.parametrize("command", ["visualize", "analyze", "export"])
def test_look_inside_commands_keep_tensorflow_start_up_lines_off_the_console(command):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    result = subprocess.run([sys.executable, "-m", f"resattn_jax.{command}", "--help"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0 and "usage:" in result.stdout
    assert result.stderr == "", result.stderr

"""The training loop: exact resume across a SIGTERM, checkpoint fallback, config errors, NaN stop."""

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import child_env, digits_config

from resattn_jax.training import loop as train_lib
from resattn_jax.training.checkpoint import CheckpointError, Checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_state(workdir: str, step: int):
    """The saved train state of ``step`` as arrays on one device, whatever topology wrote it."""
    checkpointer = ocp.StandardCheckpointer()
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          checkpointer.metadata(path).item_metadata)
    return checkpointer.restore(path, target)


def fingerprint(batch: dict) -> tuple:
    return float(np.asarray(batch["image"], np.float64).sum()), tuple(np.asarray(batch["label"]).tolist())


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path):
    total = 8
    straight_batches = {}
    straight = train_lib.train_and_evaluate(digits_config(total), str(tmp_path / "straight"),
                                            batch_hook=lambda s, b: straight_batches.__setitem__(s, fingerprint(b)))
    assert straight["steps"] == total

    resumed_batches = {}

    def hook(step, batch):
        resumed_batches[step] = fingerprint(batch)
        if step == 4:  # fetched a little ahead of its use: the signal lands between steps 2 and 4
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(train_lib.Preempted) as stopped:
        train_lib.train_and_evaluate(digits_config(total), str(tmp_path / "resumed"), batch_hook=hook)
    preempted_at = stopped.value.step
    assert 0 < preempted_at < total and os.path.isdir(stopped.value.checkpoint)
    summary = train_lib.train_and_evaluate(digits_config(total), str(tmp_path / "resumed"),
                                           batch_hook=lambda s, b: resumed_batches.__setitem__(s, fingerprint(b)))
    assert summary["resumed_from_step"] == preempted_at and summary["steps"] == total

    # The batches used at every step are the same ones, and so is the final state.
    assert {s: resumed_batches[s] for s in range(total)} == {s: straight_batches[s] for s in range(total)}
    a, b = read_state(str(tmp_path / "straight"), total), read_state(str(tmp_path / "resumed"), total)
    for key in ("params", "batch_stats", "opt_state", "step"):
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), a[key], b[key])
    assert summary["test_accuracy"] == pytest.approx(straight["test_accuracy"])

    # The workdir has everything a user looks for.
    workdir = tmp_path / "straight"
    assert set(json.loads((workdir / "summary.json").read_text())) >= {"test_accuracy", "best_checkpoint",
                                                                       "train_seconds"}
    assert os.listdir(workdir / "tensorboard")
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "train_accuracy", "learning_rate", "train_images_per_sec"} <= set(lines[0])
    assert any("validation_accuracy" in line for line in lines) and any("test_top5" in line for line in lines)


def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path, caplog):
    state = {"w": np.arange(4.0), "step": np.int32(0)}
    checkpoints = Checkpoints(str(tmp_path), keep=3, async_save=False)
    for step in (1, 2):
        checkpoints.save(step, {**state, "step": np.int32(step)}, {"step": step})
    checkpoints.wait()
    for root, _, files in os.walk(checkpoints.path(2)):
        for name in files:  # truncate every file of the latest checkpoint
            open(os.path.join(root, name), "w").close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
    with caplog.at_level(logging.WARNING):
        restored, meta, step = checkpoints.restore(abstract)
    assert step == 1 and meta == {"step": 1} and int(restored["step"]) == 1
    assert "unreadable" in caplog.text
    for root, _, files in os.walk(checkpoints.path(1)):
        for name in files:
            open(os.path.join(root, name), "w").close()
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        checkpoints.restore(abstract)
    checkpoints.close()


@pytest.mark.parametrize("overrides,match", [
    ({"model.name": "resnet50"}, "unknown model 'resnet50'"),
    ({"data.name": "no_such_dataset"}, "no_such_dataset"),
    ({"global_batch_size": 12}, "global_batch_size=12 does not divide by the 8 devices"),
    ({"parallel": "pjit"}, "unknown parallel mode"),
])
def test_bad_configs_fail_before_writing(tmp_path, overrides, match):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        train_lib.train_and_evaluate(digits_config(**overrides), str(workdir))
    assert not workdir.exists()


@pytest.mark.parametrize("field,value,match", [
    ("global_batch_size", 0, r"--config.global_batch_size=0: must be > 0"),
    ("eval_every_steps", 0, r"--config.eval_every_steps=0: must be > 0"),
    ("max_skipped_fraction", 1.5, r"--config.max_skipped_fraction=1.5: must be in \[0, 1\]"),
    ("keep_checkpoints", 0, r"--config.keep_checkpoints=0: must be > 0"),
    ("optimizer.learning_rate", -0.1, r"--config.optimizer.learning_rate=-0.1: must be > 0"),
    ("optimizer.momentum", 1.0, r"--config.optimizer.momentum=1.0: must be in \[0, 1\)"),
    ("optimizer.weight_decay", -1e-4, r"--config.optimizer.weight_decay=-0.0001: must be >= 0"),
    ("optimizer.decay_factor", 0.0, r"--config.optimizer.decay_factor=0.0: must be in \(0, 1\]"),
    ("optimizer.warmup_steps", 6, r"--config.optimizer.warmup_steps=6: must be in \[0, num_train_steps=6\)"),
    ("optimizer.boundaries", (4, 2), r"--config.optimizer.boundaries='\(4, 2\)': must be increasing steps in "
                                     r"\(0, num_train_steps=6\)"),
    ("optimizer.boundaries", (3, 6), r"boundaries='\(3, 6\)': must be increasing"),
    ("optimizer.base_batch_size", -1, r"--config.optimizer.base_batch_size=-1: must be >= 0"),
])
def test_out_of_range_config_fields_name_the_flag(field, value, match):
    """Checked before the data, the model or the workdir are touched; the message names the flag."""
    with pytest.raises(ValueError, match=match):
        train_lib.validate_config(digits_config(6, **{field: value}))


def test_tuple_and_none_fields_are_overridable_from_the_command_line(monkeypatch):
    from resattn_jax.tools import train as cli  # noqa: PLC0415 - train.py's own flag parsing

    argv = ["train.py", "--config", f"{REPO}/configs/digits.py", "--workdir=/unused", "--config.data.mean=(72.9,)",
            "--config.data.std=(80.1,)", "--config.optimizer.boundaries=(100, 200)", "--config.data.shuffle_buffer=512",
            "--config.data.in_memory=False", "--config.data.data_dir=/data"]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from sys.argv
    try:
        cli.parse_flags(argv)
        data, optimizer = cli.FLAGS.config.data, cli.FLAGS.config.optimizer
    finally:
        cli.FLAGS.unparse_flags()
    assert (data.mean, data.std, optimizer.boundaries) == ((72.9,), (80.1,), (100, 200))
    assert (data.shuffle_buffer, data.in_memory, data.data_dir) == (512, False, "/data")
    # Unset, the placeholders read as None, and the stored config.json holds null.
    default = digits_config().data
    assert (default.mean, default.in_memory, json.loads(default.to_json())["shuffle_buffer"]) == (None, None, None)


def test_console_says_what_the_run_is_doing(tmp_path):
    """A line before compiling, the compile seconds, the progress bar, validation results."""
    console = io.StringIO()
    with contextlib.redirect_stderr(console):
        train_lib.train_and_evaluate(digits_config(4, progress_bar=True), str(tmp_path / "run"))
    lines = console.getvalue().splitlines()
    assert lines[0].startswith("compiling micro (float32, global batch 16 on "), lines
    assert re.fullmatch(r"compiled and ran the first step in \d+\.\d s", lines[1]), lines
    assert re.fullmatch(r"\[#+\.*\] 2/4 [\d.]+ it/s ETA .* loss [\d.]+ acc [\d.]+ \d+ img/s", lines[2]), lines
    assert re.fullmatch(r"step 4: validation accuracy [01]\.\d{4} \(top-5 [01]\.\d{4}, loss [\d.]+, 180 images\)",
                        lines[-1]), lines


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not writable"):
        train_lib.train_and_evaluate(digits_config(), str(blocker / "run"))


@pytest.mark.parametrize("flag,match", [("--config.num_train_step=5",
                                         "--config.num_train_step: no such config field 'num_train_step'; "
                                         "did you mean 'num_train_steps'?"),
                                        ("--config.model.name=resnet50", "unknown model 'resnet50'")])
def test_cli_prints_one_line_errors(tmp_path, flag, match):
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/digits.py", "--workdir",
                             str(tmp_path / "run"), flag], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=child_env())
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "rror" in line]
    assert errors and match in errors[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_nonfinite_loss_stops_naming_the_step_and_keeps_a_loadable_checkpoint(tmp_path):
    config = digits_config(60, **{"optimizer.learning_rate": 1e6, "log_every_steps": 1,
                                  "checkpoint_every_steps": 1, "eval_every_steps": 100})
    with pytest.raises(train_lib.NonFiniteError, match=r"non-finite loss or gradient at step \d+") as error:
        train_lib.train_and_evaluate(config, str(tmp_path))
    bad_step = int(error.value.args[0].split("at step ")[1].split()[0])
    checkpoints = Checkpoints(str(tmp_path))
    latest = checkpoints.steps()[-1]
    assert latest == bad_step - 1  # checkpoints every step; the bad update was never applied or saved
    state = read_state(str(tmp_path), latest)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
    checkpoints.close()


def test_evaluation_counts_only_the_unpadded_examples():
    """The last evaluation batch is padded (mask False): padded rows change no sum and no count."""
    import types

    from resattn_jax.training import parallel

    # A stand-in network whose logits are its input: example i predicts class argmax(image[i]).
    state = types.SimpleNamespace(apply_fn=lambda variables, images, train: images, params={}, batch_stats={})
    eye = np.eye(6, dtype=np.float32) + np.float32(0.1) * np.arange(6, dtype=np.float32)  # no ties
    full = {"image": 4 * eye[[0, 1, 2, 3]], "label": np.array([0, 1, 5, 3], np.int32), "mask": np.ones(4, bool)}
    # Padding rows: wrong predictions with a huge loss, which must not count.
    padded = {"image": 4 * eye[[4, 0, 0, 0]], "label": np.array([4, 5, 5, 5], np.int32),
              "mask": np.array([True, False, False, False])}
    mesh = parallel.make_mesh(jax.devices()[:2])
    result = train_lib.evaluate(train_lib.make_eval_step(), state, [full, padded], mesh)
    assert result["count"] == 5 and result["accuracy"] == pytest.approx(4 / 5)
    losses = -jax.nn.log_softmax(4 * eye[[0, 1, 2, 3, 4]], axis=-1)[np.arange(5), [0, 1, 5, 3, 4]]
    assert result["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-6)
    assert result["top5"] == pytest.approx(1.0)  # the wrong one's label (5) is second of 6

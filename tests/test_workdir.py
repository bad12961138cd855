"""A workdir nothing can break: best checkpoint across restarts, corruption set aside, one run per
workdir, config changes caught on resume, repaired metrics log, one-line failures, kill -9."""

import errno
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import child_env, digits_config

from resattn_jax.tools import checkpoint as checkpoint_tool
from resattn_jax.tools import train as train_cli
from resattn_jax.training import data
from resattn_jax.training import loop as train_lib
from resattn_jax.training.checkpoint import CheckpointError, Checkpoints
from resattn_jax.training.metrics import MetricWriter, read_metrics
from resattn_jax.training.workdir import WorkdirBusy, WorkdirLock, config_changes, lock_holder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_run(source: str, target) -> str:
    shutil.copytree(source, str(target), ignore=shutil.ignore_patterns(".lock"))
    return str(target)


def data_file(workdir: str, step: int) -> str:
    """The largest array-data file of checkpoint ``step``."""
    root = os.path.join(workdir, "checkpoints", str(step), "state")
    files = [os.path.join(r, f) for r, _, names in os.walk(root) for f in names if os.sep + "d" + os.sep in
             os.path.join(r, f)]
    return max(files, key=os.path.getsize)


def scribble(path: str) -> None:
    """Random bytes into the middle of ``path`` (same size)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(np.random.default_rng(0).bytes(16))


def train_cmd(workdir, steps: int, *flags: str) -> list[str]:
    return [sys.executable, "train.py", "--config", f"tests/tiny_config.py:{steps}", "--workdir", str(workdir),
            *flags]


# ------------------------------------------------------------------------------------ best checkpoint
def test_best_checkpoint_survives_restarts(tmp_path, monkeypatch):
    """Validation accuracy falls after step 2; with keep_checkpoints=1 the run is restarted twice."""
    real_evaluate = train_lib.evaluate

    def falling(eval_step, state, batches, mesh):
        result = real_evaluate(eval_step, state, batches, mesh)
        return {**result, "accuracy": 1.0 - 0.01 * int(jax.device_get(state.step))}

    monkeypatch.setattr(train_lib, "evaluate", falling)
    workdir = str(tmp_path)
    overrides = {"keep_checkpoints": 1, "eval_every_steps": 2}
    # Each restart trains on the very batches an uninterrupted run uses at those steps.
    config = digits_config(8, **overrides)
    expected = dict(enumerate(itertools.islice(
        data.train_batches(config.data, config.global_batch_size, config.seed), 8)))
    for steps in (4, 6, 8):
        used = {}  # batches are fetched ahead: the hook sees some that this run never trains on
        summary = train_lib.train_and_evaluate(digits_config(steps, **overrides), workdir,
                                               batch_hook=lambda step, batch: used.setdefault(step, batch))
        for step in range(summary["resumed_from_step"], steps):
            np.testing.assert_array_equal(used[step]["label"], expected[step]["label"], err_msg=f"step {step}")
            np.testing.assert_array_equal(used[step]["image"], expected[step]["image"], err_msg=f"step {step}")
        assert summary["best_step"] == 2 and summary["best_validation_accuracy"] == pytest.approx(0.98)
        assert os.path.isdir(summary["best_checkpoint"])
        checkpoints = Checkpoints(workdir, read_only=True)
        assert checkpoints.steps() == [2, steps]  # the best and the latest one
        assert checkpoints.meta(steps)["best_step"] == 2
        checkpoints.close()
    assert train_lib.load_trained(workdir, "best").step == 2


# ------------------------------------------------------------------------------------ corruption
def test_damaged_checkpoint_is_reported_set_aside_and_the_run_finishes(digits_workdir, tmp_path, capsys, caplog):
    workdir = copy_run(digits_workdir, tmp_path / "run")
    assert checkpoint_tool.main(["verify", workdir]) == 0
    scribble(data_file(workdir, 4))
    capsys.readouterr()
    assert checkpoint_tool.main(["verify", workdir]) == 1
    printed = capsys.readouterr().out
    assert "step 2: ok" in printed and "step 4: DAMAGED" in printed and "does not match its checksum" in printed

    with caplog.at_level(logging.WARNING):
        summary = train_lib.train_and_evaluate(digits_config(4, network="tiny"), workdir)
    warnings = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoints/4 is corrupt" in warnings[0] and "\n" not in warnings[0]
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    aside = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.startswith("4.corrupt-")]
    assert len(aside) == 1
    assert checkpoint_tool.main(["verify", workdir]) == 0  # the new step 4 is sound


def small_state(value=0.0):
    return {"w": np.arange(4.0, dtype=np.float32) + value, "step": np.int32(0)}


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)


def test_non_finite_checkpoint_is_corrupt_and_a_misfit_is_not(tmp_path, caplog):
    checkpoints = Checkpoints(str(tmp_path), keep=5, async_save=False)
    checkpoints.save(1, small_state(), {"step": 1})
    checkpoints.save(2, small_state(np.nan), {"step": 2})  # sealed as it is: the checksums match
    checkpoints.wait()
    assert checkpoints.verify(2) is None
    with caplog.at_level(logging.WARNING):
        restored, meta, step = checkpoints.restore(abstract(small_state()))
    assert step == 1 and meta["step"] == 1 and "holds non-finite values" in caplog.text
    assert checkpoints.steps() == [1]

    # A network of another shape: an error naming the parameter, and the checkpoint stays.
    wrong = {"w": jax.ShapeDtypeStruct((5,), np.float32), "step": jax.ShapeDtypeStruct((), np.int32)}
    with pytest.raises(CheckpointError, match=r"does not fit this network: \['w'\] has shape \(4,\) there, \(5,\)"):
        checkpoints.restore(wrong)
    assert checkpoints.steps() == [1]
    checkpoints.close()


def test_retention_keeps_the_latest_and_the_best_across_managers(tmp_path):
    for step, best in ((1, 1), (2, 1), (3, 1)):
        checkpoints = Checkpoints(str(tmp_path), keep=1, async_save=True)  # a new process each time
        checkpoints.save(step, small_state(step), {"step": step, "best_step": best})
        checkpoints.close()
    Checkpoints(str(tmp_path), keep=1).close()  # a rerun that saves nothing (the run had finished) prunes nothing
    checkpoints = Checkpoints(str(tmp_path), read_only=True)
    assert checkpoints.steps() == [1, 3]
    assert all(os.path.isfile(os.path.join(checkpoints.path(s), "manifest.json")) for s in (1, 3))
    checkpoints.close()


# ------------------------------------------------------------------------------------ config changes
def test_resume_with_a_changed_config_stops_unless_allowed(digits_workdir, tmp_path, capsys):
    workdir = copy_run(digits_workdir, tmp_path / "run")
    stored = open(os.path.join(workdir, "config.json"), "rb").read()
    with pytest.raises(ValueError, match=r"global_batch_size: 16 -> 32.*allow_config_change"):
        train_lib.train_and_evaluate(digits_config(4, network="tiny", global_batch_size=32, seed=3), workdir)
    assert open(os.path.join(workdir, "config.json"), "rb").read() == stored

    summary = train_lib.train_and_evaluate(digits_config(4, network="tiny", global_batch_size=32,
                                                              allow_config_change=True), workdir)
    assert summary["resumed_from_step"] == 4
    assert "resuming with a changed config: global_batch_size: 16 -> 32" in capsys.readouterr().err
    assert json.load(open(os.path.join(workdir, "config.json")))["global_batch_size"] == 32


def test_config_changes_separates_lengths_and_intervals():
    changed, allowed = config_changes({"a": 1, "num_train_steps": 5, "model": {"w": [1, 2]}},
                                      {"a": 1, "num_train_steps": 9, "model": {"w": (1, 3)}})
    assert changed == ["model.w: [1, 2] -> [1, 3]"] and allowed == ["num_train_steps: 5 -> 9"]


# ------------------------------------------------------------------------------------ the lock
def test_second_run_on_a_locked_workdir_exits_2_naming_the_holder(tmp_path):
    workdir = tmp_path / "run"
    holder = subprocess.Popen(train_cmd(workdir, 100_000), cwd=REPO, env=child_env(8),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while lock_holder(str(workdir)) is None or f"pid {holder.pid} " not in lock_holder(str(workdir)):
            assert holder.poll() is None, holder.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        with pytest.raises(WorkdirBusy, match=f"in use by pid {holder.pid} on host"):
            WorkdirLock(str(workdir)).acquire()
        start = time.monotonic()
        second = subprocess.run(train_cmd(workdir, 8), cwd=REPO, env=child_env(8), capture_output=True, text=True,
                                timeout=120)
        elapsed = time.monotonic() - start
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"train.py: error: workdir {workdir} is in use by pid {holder.pid} on host" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and elapsed < 10, (elapsed, second.stderr)
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    assert lock_holder(str(workdir)) is None
    with WorkdirLock(str(workdir)):
        assert f"pid {os.getpid()} " in lock_holder_from_other_process(workdir)


def lock_holder_from_other_process(workdir) -> str:
    code = "import sys; from resattn_jax.training.workdir import lock_holder; print(lock_holder(sys.argv[1]))"
    return subprocess.run([sys.executable, "-c", code, str(workdir)], capture_output=True, text=True, check=True,
                          cwd=REPO).stdout


# ------------------------------------------------------------------------------------ metrics log
def test_resume_repairs_the_metrics_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 2, "train_loss": 3.0}, {"step": 4, "train_loss": 2.0}, {"step": 6, "train_loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 8, "train_lo')
    writer = MetricWriter(str(tmp_path), resume_step=4)
    writer.write(6, {"train_loss": 0.5})
    writer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
    assert [(r["step"], r["train_loss"]) for r in lines] == [(2, 3.0), (4, 2.0), (6, 0.5)]
    path.write_text(path.read_text() + '{"step": 6, "validation_accuracy": 0.5}\n{"ste')
    assert read_metrics(str(path))[6] == {"train_loss": 0.5, "validation_accuracy": 0.5, "time": lines[2]["time"]}


# ------------------------------------------------------------------------------------ signals, faults
def test_a_second_sigint_exits_at_once(monkeypatch):
    exits = []
    with train_lib._StopSignals() as signals:
        signals._exit = exits.append
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT and exits == []
        os.kill(os.getpid(), signal.SIGINT)
    assert exits == [train_lib.INTERRUPTED_EXIT_CODE]


def test_failures_are_one_line():
    assert train_cli.describe(OSError(errno.ENOSPC, "No space left on device", "/w/metrics.jsonl")) == \
        "No space left on device: /w/metrics.jsonl"
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = PermissionError(errno.EACCES, "Permission denied", "/w/checkpoints")
    assert train_cli.describe(wrapped) == "Permission denied: /w/checkpoints"
    assert train_cli.describe(ValueError("bad\nsecond line")) == "ValueError: bad"
    record = logging.LogRecord("absl", logging.ERROR, __file__, 1, "save of %s failed\ndetails", ("x",), None)
    one_line = train_cli.OneLineLogs()
    assert one_line.filter(record) and record.getMessage() == "save of x failed"
    again = logging.LogRecord("absl", logging.ERROR, __file__, 1, "another failure", None, None)
    assert not one_line.filter(again)  # library errors after the first are dropped


def test_workdir_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        train_lib.train_and_evaluate(digits_config(), str(blocker))


def test_read_only_commands_write_nothing(digits_workdir, tmp_path):
    workdir = copy_run(digits_workdir, tmp_path / "archived")

    def snapshot():
        return sorted((os.path.relpath(os.path.join(r, f), workdir), os.stat(os.path.join(r, f)).st_mtime_ns)
                      for r, dirs, files in os.walk(workdir) for f in files + dirs)

    before = snapshot()
    for mode in ("best", "latest"):
        assert train_lib.load_trained(workdir, mode).step == 4
    assert checkpoint_tool.verify(workdir) == [(2, "ok", ""), (4, "ok", "")]
    assert snapshot() == before and not os.path.exists(os.path.join(workdir, ".lock"))


def test_disk_full_is_one_line(tmp_path):
    """A workdir on a 200 kB tmpfs (needs root and mount): status 1, two lines, cause and path."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        result = subprocess.run(train_cmd(mount / "run", 8), cwd=REPO, env=child_env(8), capture_output=True,
                                text=True, timeout=300)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    message = f"train.py: error: cannot write a checkpoint in {mount}/run/checkpoints: No space left on device"
    # (followed by where the traceback went, when error.log still fitted on the disk)
    assert lines[-1] in (message, f"{message} (traceback in {mount}/run/error.log; --verbose prints it)")
    assert len(lines) <= 3 and "Traceback" not in result.stderr, result.stderr[-3000:]


# ------------------------------------------------------------------------------------ kill -9 campaign
def read_final_state(workdir, step):
    from test_train import read_state

    return read_state(str(workdir), step)


@pytest.mark.slow
def test_kill_9_campaign_ends_bit_identical(tmp_path):
    """Three kill -9s, each a little after a new checkpoint appears (so during steps, evaluations or
    saves), then a run to the end: the final state equals an uninterrupted run's bit for bit."""
    steps, flags = 8, ("--config.checkpoint_every_steps=1",)
    straight = train_lib.train_and_evaluate(digits_config(steps, checkpoint_every_steps=1), str(tmp_path / "straight"))
    assert straight["steps"] == steps

    workdir, rng = tmp_path / "killed", np.random.default_rng(1)
    checkpoint_dir = workdir / "checkpoints"

    def saved() -> int:
        names = os.listdir(checkpoint_dir) if checkpoint_dir.is_dir() else []
        return max([int(n) for n in names if n.isdigit()], default=0)

    kills = 0
    while kills < 3 and saved() < steps:
        seen = saved()
        run = subprocess.Popen(train_cmd(workdir, steps, *flags), cwd=REPO, env=child_env(8),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while saved() <= seen and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0, 0.2)))
        kills += run.poll() is None
        run.kill()
        run.wait()
    assert kills == 3
    final = subprocess.run(train_cmd(workdir, steps, *flags), cwd=REPO, env=child_env(8), capture_output=True,
                           text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    a, b = read_final_state(tmp_path / "straight", steps), read_final_state(workdir, steps)
    for key in ("params", "batch_stats", "opt_state", "step"):
        jax.tree.map(np.testing.assert_array_equal, a[key], b[key])
    assert checkpoint_tool.main(["verify", str(workdir)]) == 0


# ------------------------------------------------------------------------------------ nan_policy=skip
@pytest.mark.slow
def test_skipped_steps_are_counted_and_too_many_stop(tmp_path):
    """Too many skipped steps stop the run (status 3 in train.py); allowing more, it resumes and finishes."""
    overrides = {"optimizer.learning_rate": 1e6, "nan_policy": "skip", "log_every_steps": 1,
                 "checkpoint_every_steps": 1}
    with pytest.raises(train_lib.NonFiniteError, match=r"\d+ of \d+ steps skipped .* max_skipped_fraction=0.25"):
        train_lib.train_and_evaluate(digits_config(8, max_skipped_fraction=0.25, **overrides), str(tmp_path))
    summary = train_lib.train_and_evaluate(digits_config(8, max_skipped_fraction=1.0, **overrides), str(tmp_path))
    assert summary["steps"] == 8 and summary["skipped_steps"] > 2
    assert json.load(open(tmp_path / "summary.json"))["skipped_steps"] == summary["skipped_steps"]

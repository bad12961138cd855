"""The training library: state, compiled steps, evaluation and the train-and-evaluate loop.

``train.py`` is a thin CLI over :func:`train_and_evaluate`; everything here is importable from a
notebook or another JAX pipeline. See ``configs/default.py`` for every config field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import serialization
from flax.training import train_state
from jax.experimental import multihost_utils

from resattn_jax.models import create_model
from resattn_jax.training import data, finetune, mixing, parallel
from resattn_jax.training.checkpoint import CheckpointError, Checkpoints, abstract_like
from resattn_jax.training.metrics import MetricWriter, Progress
from resattn_jax.training.optim import FREEZE_OPTIONS, check_optimizer_config, create_optimizer
from resattn_jax.training.workdir import (WorkdirLock, atomic_write_text, check_writable, config_changes,
                                          config_fingerprint, ensure_free)

__all__ = [
    "CheckpointError",
    "DTYPES",
    "TrainState",
    "StepOptions",
    "NonFiniteError",
    "Preempted",
    "build_model",
    "create_train_state",
    "make_train_step",
    "make_eval_step",
    "evaluate",
    "validate_config",
    "train_and_evaluate",
    "TrainedModel",
    "load_trained",
]


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NAN_POLICIES = ("stop", "skip")
BEST_BY = ("model", "ema")
#: Exit status of ``train.py`` after a preemption (SIGTERM/SIGINT) checkpoint: 128 + SIGTERM.
PREEMPTED_EXIT_CODE = 143
#: Exit status after a second SIGINT (Ctrl-C twice): 128 + SIGINT, at once, without saving.
INTERRUPTED_EXIT_CODE = 130


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN/inf (with ``nan_policy='stop'``)."""


class Preempted(Exception):
    """The run received SIGTERM/SIGINT, saved a checkpoint at a step boundary and stopped."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"preempted at step {step}; checkpoint {checkpoint} saved; rerun to resume")
        self.step, self.checkpoint = step, checkpoint


class TrainState(train_state.TrainState):
    """Flax ``TrainState`` plus BatchNorm statistics and non-finite-step bookkeeping."""

    batch_stats: Any = None
    #: Number of steps whose loss or gradients were non-finite (their update was not applied).
    nonfinite_steps: jax.Array = None
    #: The first such step, or -1.
    first_nonfinite_step: jax.Array = None
    #: With ``config.ema_decay``: exponential moving averages of ``params`` and ``batch_stats``.
    ema_params: Any = None
    ema_batch_stats: Any = None


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What a train step does beyond the paper's plain step (every default keeps it plain)."""

    num_classes: int = 0  # needed by mixing and label smoothing (soft targets)
    mix: mixing.MixConfig = mixing.MixConfig()
    grad_accum_steps: int = 1  # the batch in this many micro-batches, gradients averaged (a scan)
    ema_decay: float = 0.0  # > 0: update ema_params / ema_batch_stats (optax.incremental_update)
    train_batch_norm: bool = True  # False: BatchNorm uses and keeps its stored statistics

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_classes: int) -> "StepOptions":
        return cls(num_classes, mixing.MixConfig.from_config(config), int(config.get("grad_accum_steps", 1)),
                   float(config.get("ema_decay", 0.0)), config.get("freeze", "") != "backbone")


# ---------------------------------------------------------------------------------------- building
def build_model(config: ml_collections.ConfigDict, info: data.DatasetInfo):
    """The network named by ``config.model.name`` with the dataset's classes and channels."""
    overrides = {k: tuple(v) if isinstance(v, (list, tuple)) else v
                 for k, v in config.model.to_dict().items() if k != "name"}
    return create_model(config.model.name, num_classes=info.num_classes, in_channels=info.image_shape[-1],
                        dtype=DTYPES[config.dtype],
                        bn_axis_name=parallel.AXIS if config.parallel == "pmap" else None, **overrides)


def create_train_state(model, optimizer: optax.GradientTransformation, image_shape: tuple[int, int, int],
                       seed: int, mesh, ema: bool = False) -> TrainState:
    """Initialise parameters, batch statistics and optimizer state, replicated over ``mesh``
    (``ema``: with their moving averages, starting at the initial values)."""
    return jax.jit(lambda: _initial_state(model, optimizer, image_shape, seed, ema),
                   out_shardings=parallel.replicated(mesh))()


def _initial_state(model, optimizer: optax.GradientTransformation, image_shape: tuple[int, int, int],
                   seed: int, ema: bool = False) -> TrainState:
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=optimizer,
                             batch_stats=variables["batch_stats"], nonfinite_steps=jnp.zeros((), jnp.int32),
                             first_nonfinite_step=jnp.full((), -1, jnp.int32),
                             ema_params=variables["params"] if ema else None,
                             ema_batch_stats=variables["batch_stats"] if ema else None)


# ---------------------------------------------------------------------------------------- steps
def make_train_step(schedule: optax.Schedule, axis_name: str | None = None,
                    options: StepOptions = StepOptions()) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)``: forward, backward, SGD update.

    With ``axis_name`` (per-device ``shard_map`` steps) the loss, hence the gradients, and the
    metrics are averaged over that axis; BatchNorm syncs through the model's ``bn_axis_name``. A step whose
    loss or gradients are non-finite is *not applied* (the state is kept) and recorded in
    ``state.nonfinite_steps`` / ``state.first_nonfinite_step``; the host loop then stops
    (``config.nan_policy='stop'``) or carries on (``'skip'``).

    ``options`` (:class:`StepOptions`): mixup / CutMix / Cutout and label smoothing on the device
    (:mod:`.mixing`, drawn from the seed and the step); gradient accumulation: the batch (per
    device, in the per-device mode) split into ``grad_accum_steps`` equal micro-batches run one
    after the other in a ``lax.scan``, their gradients averaged: the same update as the whole batch
    at once, except that BatchNorm normalises each micro-batch by its own statistics and updates
    its running statistics once per micro-batch (as every framework's accumulation does); the EMA
    of the weights; BatchNorm on its stored statistics (a frozen backbone).
    """
    accumulate = options.grad_accum_steps

    def loss_fn(params, batch_stats, apply_fn, images, labels, targets):
        variables = {"params": params, "batch_stats": batch_stats}
        if options.train_batch_norm:
            logits, updates = apply_fn(variables, images, train=True, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        else:
            logits = apply_fn(variables, images, train=False)
        if targets is None:
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        else:
            loss = optax.softmax_cross_entropy(logits, targets).mean()
        if axis_name is not None:
            # Mean over devices. The parameters are replicated (device-invariant), so autodiff
            # of this pmean'd loss sums the per-device gradients / n: the gradient pmean.
            loss = jax.lax.pmean(loss, axis_name)
        return loss, (jnp.argmax(logits, -1), batch_stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        images, labels, targets = batch["image"], batch["label"], None
        if options.mix.active or options.mix.label_smoothing:
            device = jax.lax.axis_index(axis_name) if axis_name is not None else 0
            images, targets, _ = mixing.augment_batch(options.mix, state.step, images, labels, options.num_classes,
                                                      device)
        if accumulate == 1:
            (loss, (predicted, batch_stats)), grads = grad_fn(state.params, state.batch_stats, state.apply_fn,
                                                              images, labels, targets)
        else:
            def micro_step(carry, micro):
                grad_sum, stats, loss_sum = carry
                (loss, (predicted, stats)), grads = grad_fn(state.params, stats, state.apply_fn, *micro)
                return (jax.tree.map(jnp.add, grad_sum, grads), stats, loss_sum + loss.astype(jnp.float32)), predicted

            def split(x):  # micro-batch i: examples i, i + K, i + 2K, ... (a slice of every device's shard)
                return None if x is None else jnp.swapaxes(x.reshape(x.shape[0] // accumulate, accumulate,
                                                                     *x.shape[1:]), 0, 1)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, batch_stats, loss), predicted = jax.lax.scan(
                micro_step, (zeros, state.batch_stats, jnp.zeros((), jnp.float32)),
                (split(images), split(labels), split(targets)))
            grads = jax.tree.map(lambda g: g / accumulate, grads)
            loss, predicted = loss / accumulate, jnp.swapaxes(predicted, 0, 1).reshape(labels.shape)
        accuracy = jnp.mean(predicted == labels)
        if axis_name is not None:
            accuracy = jax.lax.pmean(accuracy, axis_name)
        grad_norm = optax.global_norm(grads)
        # NaN/inf in any gradient makes the global norm non-finite; one scalar check compiles far
        # faster on XLA:CPU than a reduction per leaf.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        if options.ema_decay:
            rate = 1.0 - options.ema_decay
            updated = updated.replace(
                ema_params=optax.incremental_update(updated.params, state.ema_params, rate),
                ema_batch_stats=optax.incremental_update(updated.batch_stats, state.ema_batch_stats, rate))
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated,
                                 state.replace(step=state.step + 1))
        new_state = new_state.replace(
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                                           state.first_nonfinite_step))
        metrics = {"loss": loss, "accuracy": accuracy, "learning_rate": schedule(state.step),
                   "grad_norm": grad_norm}
        return new_state, metrics

    return step


def make_eval_step(axis_name: str | None = None) -> Callable[[TrainState, dict], dict]:
    """``eval_step(state, batch) -> sums``: masked sums of loss, top-1 and top-5 hits, and count.

    With ``axis_name`` (per-device ``shard_map`` steps) the sums are summed over that axis.
    """

    def eval_step(state: TrainState, batch: dict) -> dict:
        logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
                                train=False)
        mask = batch["mask"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        k = min(5, logits.shape[-1])
        top_k = jax.lax.top_k(logits, k)[1]
        hit5 = jnp.any(top_k == batch["label"][:, None], axis=-1)
        hit1 = jnp.argmax(logits, -1) == batch["label"]
        sums = {"loss": jnp.sum(loss * mask), "top1": jnp.sum(hit1 * mask), "top5": jnp.sum(hit5 * mask),
                "count": jnp.sum(mask)}
        return jax.lax.psum(sums, axis_name) if axis_name is not None else sums

    return eval_step


def evaluate(eval_step, state: TrainState, batches: Iterable[dict], mesh) -> dict[str, float]:
    """Run ``eval_step`` over every batch; returns ``accuracy``, ``top5``, ``loss`` and ``count``."""
    totals = None
    for batch in batches:
        sums = eval_step(state, parallel.shard_batch(batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        return {"accuracy": float("nan"), "top5": float("nan"), "loss": float("nan"), "count": 0}
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {"accuracy": float(totals["top1"]) / count, "top5": float(totals["top5"]) / count,
            "loss": float(totals["loss"]) / count, "count": int(count)}


# ---------------------------------------------------------------------------------------- validation
def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> data.DatasetInfo:
    """Check everything that can be checked before touching the workdir; raises ``ValueError``."""
    num_devices = num_devices or jax.device_count()
    if config.parallel not in parallel.PARALLEL_MODES:
        raise ValueError(f"unknown parallel mode {config.parallel!r}; choose one of {parallel.PARALLEL_MODES}")
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {config.dtype!r}; choose one of {tuple(DTYPES)}")
    if config.nan_policy not in NAN_POLICIES:
        raise ValueError(f"unknown nan_policy {config.nan_policy!r}; choose one of {NAN_POLICIES}")
    for name in ("global_batch_size", "eval_batch_size"):
        size = int(config[name])
        if size <= 0:
            raise ValueError(f"--config.{name}={size}: must be > 0 (and a multiple of the {num_devices} devices)")
        if size % num_devices:
            raise ValueError(f"{name}={size} does not divide by the {num_devices} devices; "
                             f"use a multiple of {num_devices}")
        if size % jax.process_count():
            raise ValueError(f"{name}={size} does not divide by the {jax.process_count()} processes")
    for name in ("num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
        if int(config[name]) <= 0:
            raise ValueError(f"--config.{name}={config[name]}: must be > 0")
    if int(config.keep_checkpoints) <= 0:
        raise ValueError(f"--config.keep_checkpoints={config.keep_checkpoints}: must be > 0")
    if not 0.0 <= float(config.max_skipped_fraction) <= 1.0:
        raise ValueError(f"--config.max_skipped_fraction={config.max_skipped_fraction}: must be in [0, 1]")
    check_optimizer_config(config.optimizer, int(config.num_train_steps))
    _check_recipe_config(config, num_devices)
    data.forget_scans()  # an image folder is checked afresh by each run (its decodings stay cached on disk)
    info = data.dataset_info(config.data)
    model = build_model(config, info)  # unknown model names/options raise here
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *info.image_shape)), train=False))
    return info


def _check_recipe_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """The fields beyond the paper's recipe (label smoothing, mixing, accumulation, EMA, fine-tuning,
    profiling): one-line ``ValueError`` naming the flag."""
    mixing.check_mix_config(config)
    accumulate = int(config.get("grad_accum_steps", 1))
    if accumulate < 1:
        raise ValueError(f"--config.grad_accum_steps={accumulate}: must be >= 1")
    if int(config.global_batch_size) % (accumulate * num_devices):
        raise ValueError(f"--config.grad_accum_steps={accumulate}: global_batch_size={config.global_batch_size} must "
                         f"divide into {accumulate} micro-batches of a multiple of the {num_devices} devices")
    ema_decay = float(config.get("ema_decay", 0.0))
    if not 0 <= ema_decay < 1:
        raise ValueError(f"--config.ema_decay={ema_decay}: must be in [0, 1) (0: no EMA)")
    best_by = config.get("best_by", "model")
    if best_by not in BEST_BY:
        raise ValueError(f"--config.best_by={best_by!r}: choose one of {BEST_BY}")
    if best_by == "ema" and not ema_decay:
        raise ValueError("--config.best_by='ema' needs --config.ema_decay > 0")
    freeze, init_from = config.get("freeze", ""), config.get("init_from", "")
    if freeze not in FREEZE_OPTIONS:
        raise ValueError(f"--config.freeze={freeze!r}: choose one of {FREEZE_OPTIONS}")
    if freeze and not init_from:
        raise ValueError("--config.freeze='backbone' needs --config.init_from (a trained backbone to keep)")
    profile = tuple(config.get("profile_steps", ()))
    if profile and (len(profile) != 2 or int(profile[0]) < 1 or int(profile[1]) < 1
                    or profile[0] + profile[1] - 1 > int(config.num_train_steps)):
        raise ValueError(f"--config.profile_steps='{profile}': must be (first step >= 1, count >= 1) within "
                         f"num_train_steps={config.num_train_steps}, or () for none")


def _check_resume_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """On a resume (the workdir has checkpoints), stop with ``ValueError`` listing the fields that
    differ from the stored ``config.json``, unless ``config.allow_config_change``; print the
    changes that are allowed."""
    config_path = os.path.join(workdir, "config.json")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if not (os.path.isfile(config_path) and os.path.isdir(checkpoint_dir)
            and any(name.isdigit() for name in os.listdir(checkpoint_dir))):
        return
    try:
        with open(config_path, encoding="utf-8") as f:
            stored = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{config_path} is unreadable ({e}); move it away to start over, or restore it") from None
    changed, allowed = config_changes(stored, config)
    if changed and not config.allow_config_change:
        raise ValueError(f"the config differs from the one this workdir was trained with ({'; '.join(changed)}); "
                         "use a new workdir, or --config.allow_config_change=True to continue anyway")
    if jax.process_index() == 0 and (changed or allowed):
        print(f"resuming with a changed config: {'; '.join(changed + allowed)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------- the loop
def _validate_once_per_job(config: ml_collections.ConfigDict) -> data.DatasetInfo:
    """:func:`validate_config`; in a multi-process job process 0 goes first (it may prepare the
    dataset, e.g. build the offline digits set) while the others wait at a barrier."""
    if jax.process_count() == 1:
        return validate_config(config)
    if jax.process_index() == 0:
        try:
            return validate_config(config)
        finally:
            multihost_utils.sync_global_devices("resattn_jax: data prepared")
    multihost_utils.sync_global_devices("resattn_jax: data prepared")
    return validate_config(config)


def _preemption_requested(step: int, signals: "_StopSignals") -> bool:
    """Whether to checkpoint and stop after ``step``: a local SIGTERM/SIGINT, or in a multi-process
    job the step that every process agrees on through JAX's preemption sync service (which a
    SIGTERM to any process triggers)."""
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
        return True
    return signals.received is not None


class _StopSignals:
    """Turns SIGTERM/SIGINT into a flag that the loop checks at step boundaries.

    In a multi-process job SIGTERM is left to JAX's preemption notifier (see
    :func:`_preemption_requested`), which makes all processes stop at the same step.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._exit = os._exit  # a second SIGINT leaves at once (tests replace this)

    def __enter__(self):
        signals = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
        try:
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received is not None:
            # Ctrl-C twice: leave now. Committed checkpoints are complete directories; an
            # unfinished save is a temporary directory that the next run removes.
            print("\ntrain.py: interrupted twice; exiting without saving", file=sys.stderr, flush=True)
            self._exit(INTERRUPTED_EXIT_CODE)
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _prefetch_to_device(batches: Iterator[dict], mesh, size: int = 2) -> Iterator[dict]:
    """Keep ``size`` batches in flight to the devices, so host work overlaps device compute."""
    queue = []
    for batch in batches:
        queue.append(parallel.shard_batch(batch, mesh))
        if len(queue) >= size:
            yield queue.pop(0)


def _state_dict(state: TrainState) -> dict:
    """What a checkpoint holds: the state's fields but the unused ones (``None``: the EMA of a run
    without one), so that runs written before a field existed restore as they were written."""
    return {k: v for k, v in serialization.to_state_dict(state).items() if v is not None}


def _restored(state: TrainState, restored: dict) -> TrainState:
    """``state`` with the arrays of a checkpoint (:func:`_state_dict`'s tree)."""
    return serialization.from_state_dict(state, {**serialization.to_state_dict(state), **restored})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       batch_hook: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its latest good checkpoint) and write ``summary.json``.

    Returns the summary dict. ``batch_hook(step, host_batch)``, if given, sees every training batch
    before it is used (for tests and debugging). Raises ``ValueError`` for bad configs, a workdir in
    use by another run or a resume with a changed config (all before anything is written),
    :class:`NonFiniteError` and :class:`Preempted` as documented.
    """
    workdir = os.path.abspath(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        ensure_free(workdir)  # asked first: a busy workdir answers at once
    info = _validate_once_per_job(config)
    if config.get("init_from") and not _has_checkpoints(workdir):  # read only when the run starts
        finetune.resolve_source(config.init_from)
    check_writable(workdir)
    lock = WorkdirLock(workdir).acquire() if is_main else None  # held until this function returns
    try:
        _check_resume_config(config, workdir)
        return _train_locked(config, workdir, info, batch_hook)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(config: ml_collections.ConfigDict, workdir: str, info: data.DatasetInfo,
                  batch_hook: Callable[[int, dict], None] | None) -> dict:
    is_main = jax.process_index() == 0
    mesh = parallel.make_mesh()
    progress = Progress(int(config.num_train_steps), 0, active=is_main and config.progress_bar)
    progress.note(f"compiling {config.model.name} ({config.dtype}, global batch {config.global_batch_size} on "
                  f"{jax.device_count()} device{'s' if jax.device_count() > 1 else ''}): the initial state, then the "
                  f"train step")
    compile_start = time.perf_counter()
    model = build_model(config, info)
    total = int(config.num_train_steps)
    optimizer, schedule = create_optimizer(config.optimizer, config.global_batch_size, total, config.get("freeze", ""))
    options = StepOptions.from_config(config, info.num_classes)
    state = create_train_state(model, optimizer, info.image_shape, config.seed, mesh, ema=bool(options.ema_decay))
    axis = parallel.AXIS if config.parallel == "pmap" else None
    train_step = parallel.compile_step(make_train_step(schedule, axis, options), config.parallel, mesh)
    eval_step = parallel.compile_eval_step(make_eval_step(), "jit", mesh)
    if config.get("init_from") and not _has_checkpoints(workdir):  # a resume continues from its own checkpoints
        state = _init_from(state, config.init_from, mesh, is_main)

    checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)
    fingerprint = config_fingerprint(config)
    meta = {"step": 0, "best_step": None, "best_validation_accuracy": None, "config_fingerprint": fingerprint}
    abstract = abstract_like(_state_dict(state))
    if checkpoints.steps():
        restored, meta, step = checkpoints.restore(abstract)
        state = _restored(state, restored)
        meta = {**meta, "config_fingerprint": fingerprint}
        if is_main:
            print(f"resuming from {checkpoints.path(step)}", file=sys.stderr)
    start_step = int(meta["step"])
    if is_main:  # only now: the config was checked against the stored one and the state restored
        atomic_write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

    writer = MetricWriter(workdir, active=is_main, resume_step=start_step)
    progress.restart(start_step)
    batches = data.train_batches(config.data, config.global_batch_size, config.seed, start_step,
                                 jax.process_index(), jax.process_count())
    if batch_hook is not None:
        batches = _hooked(batches, batch_hook, start_step)
    device_batches = _prefetch_to_device(batches, mesh)

    selected = "ema" if config.get("best_by", "model") == "ema" else "model"

    def evaluate_weights(split: str) -> dict[str, dict]:
        """``{'model': metrics}``, plus ``'ema'`` with the moving averages of the weights."""
        def batches():
            return data.eval_batches(config.data, split, config.eval_batch_size, jax.process_index(),
                                     jax.process_count())

        results = {"model": evaluate(eval_step, state, batches(), mesh)}
        if options.ema_decay:
            results["ema"] = evaluate(eval_step, _ema_weights(state), batches(), mesh)
        return results

    def run_validation(step: int) -> dict | None:
        if not info.num_validation:
            return None
        results = evaluate_weights("validation")
        for weights, result in results.items():
            prefix = "validation_" if weights == "model" else "validation_ema_"
            writer.write(step, {f"{prefix}{k}": v for k, v in result.items()})
        result = results["model"]
        progress.note(f"step {step}: validation accuracy {result['accuracy']:.4f} (top-5 {result['top5']:.4f}, "
                      f"loss {result['loss']:.4f}, {result['count']} images)"
                      + (f"; EMA weights {results['ema']['accuracy']:.4f}" if "ema" in results else ""))
        return results[selected]

    last_saved = start_step if checkpoints.steps() else None

    def save(step: int, validation: dict | None = None) -> None:
        nonlocal meta, last_saved
        if step == last_saved:
            return
        last_saved = step
        meta = {**meta, "step": step, "validation_accuracy": None}
        if validation is not None:
            meta["validation_accuracy"] = validation["accuracy"]
            # Ties go to the later step.
            if meta["best_validation_accuracy"] is None or validation["accuracy"] >= meta["best_validation_accuracy"]:
                meta.update(best_step=step, best_validation_accuracy=validation["accuracy"])
        checkpoints.save(step, _state_dict(state), meta)

    max_skipped = float(config.max_skipped_fraction) * total
    train_start = time.perf_counter()
    pending: list[dict] = []
    window_start, window_step = time.perf_counter(), start_step
    step = start_step
    nonfinite = int(jax.device_get(state.nonfinite_steps))
    profile, profiling = tuple(config.get("profile_steps", ())), False
    try:
        with _StopSignals() as signals:
            while step < total:
                if profile and step + 1 == profile[0]:
                    profiling = _start_profile(workdir, is_main)
                state, metrics = train_step(state, next(device_batches))
                step += 1
                pending.append(metrics)
                if profiling and step == profile[0] + profile[1] - 1:
                    jax.block_until_ready(state)
                    profiling = _stop_profile(workdir, profile)
                if progress.active and step == start_step + 1:  # the first step compiled the train step
                    jax.block_until_ready(metrics)
                    progress.note(f"compiled and ran the first step in {time.perf_counter() - compile_start:.1f} s")
                    progress.restart(step)  # the ETA counts from here, without the compile
                if step % config.log_every_steps == 0 or step == total:
                    # The only host sync of the step loop.
                    fetched, (nonfinite, first_bad) = jax.device_get(
                        (pending, (state.nonfinite_steps, state.first_nonfinite_step)))
                    nonfinite = int(nonfinite)
                    elapsed = time.perf_counter() - window_start
                    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    scalars["images_per_sec"] = (step - window_step) * config.global_batch_size / max(elapsed, 1e-9)
                    scalars["nonfinite_steps"] = nonfinite
                    writer.write(step, {f"train_{k}" if k != "learning_rate" else k: v for k, v in scalars.items()})
                    progress.update(step, f"loss {scalars['loss']:.4f} acc {scalars['accuracy']:.3f} "
                                          f"{scalars['images_per_sec']:.0f} img/s")
                    pending, window_start, window_step = [], time.perf_counter(), step
                    if nonfinite and (config.nan_policy == "stop" or nonfinite > max_skipped):
                        checkpoints.wait()
                        last = checkpoints.steps()
                        where = f"; the last good checkpoint is {checkpoints.path(last[-1])}" if last else ""
                        if config.nan_policy == "stop":
                            raise NonFiniteError(f"non-finite loss or gradient at step {int(first_bad) + 1} "
                                                 f"(update not applied){where}")
                        raise NonFiniteError(f"{nonfinite} of {step} steps skipped for a non-finite loss or "
                                             f"gradient (first at step {int(first_bad) + 1}), more than "
                                             f"max_skipped_fraction={config.max_skipped_fraction} of the {total} "
                                             f"steps{where}")
                if step % config.eval_every_steps == 0 or step == total:
                    save(step, run_validation(step))
                elif step % config.checkpoint_every_steps == 0:
                    save(step)
                if step < total and _preemption_requested(step, signals):
                    save(step)
                    checkpoints.wait()
                    raise Preempted(step, checkpoints.path(step))
        checkpoints.wait()
        train_seconds = time.perf_counter() - train_start
        progress.close()

        # Test: the checkpoint selected on validation accuracy (never on the test split).
        best_step = meta["best_step"] if meta["best_step"] is not None else step
        if best_step != step:
            try:
                restored, _, _ = checkpoints.restore(abstract, step=best_step)
                state = _restored(state, restored)
            except CheckpointError as e:
                print(f"train.py: warning: the best checkpoint (step {best_step}) cannot be restored ({e}); "
                      f"testing the final state (step {step})", file=sys.stderr)
                best_step = step
        try:
                tests = evaluate_weights("test")
        except ValueError as e:  # the data went bad during the run: the training is kept
            raise ValueError(f"{e}; training is complete ({checkpoints.path(step)}): fix the data and rerun the "
                             "same command to evaluate and write summary.json without training") from None
        for weights, result in tests.items():
            writer.write(step, {f"test_{'ema_' if weights == 'ema' else ''}{k}": v for k, v in result.items()})
        test = tests[selected]
        summary = {
            "test_accuracy": test["accuracy"], "test_top5": test["top5"], "test_loss": test["loss"],
            "test_examples": test["count"], "best_checkpoint": checkpoints.path(best_step), "best_step": best_step,
            "best_validation_accuracy": meta["best_validation_accuracy"], "train_seconds": train_seconds,
            "steps": step, "resumed_from_step": start_step, "skipped_steps": nonfinite, "model": config.model.name,
            "dataset": config.data.name, "num_devices": jax.device_count(), "parallel": config.parallel,
            "dtype": config.dtype, "config_fingerprint": fingerprint,
        }
        if options.ema_decay:  # test_* above are of the weights that chose the best checkpoint
            summary.update(weights=selected, test_model_accuracy=tests["model"]["accuracy"],
                           test_ema_accuracy=tests["ema"]["accuracy"], test_ema_top5=tests["ema"]["top5"])
        if is_main:
            atomic_write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
        return summary
    finally:
        if profiling:
            _stop_profile(workdir, profile)
        checkpoints.close()
        writer.close()


def _ema_weights(state: TrainState) -> TrainState:
    """``state`` with its EMA weights in place of its weights (what evaluation of the EMA runs)."""
    return state.replace(params=state.ema_params, batch_stats=state.ema_batch_stats)


def _start_profile(workdir: str, is_main: bool) -> bool:
    """Start a ``jax.profiler`` trace into ``WORKDIR/tensorboard`` (process 0 only)."""
    if is_main:
        jax.profiler.start_trace(os.path.join(workdir, "tensorboard"))
    return is_main


def _stop_profile(workdir: str, profile: tuple) -> bool:
    jax.profiler.stop_trace()
    print(f"profiled steps {profile[0]}-{profile[0] + profile[1] - 1}: the trace is in "
          f"{os.path.join(workdir, 'tensorboard', 'plugins', 'profile')} (tensorboard --logdir "
          f"{os.path.join(workdir, 'tensorboard')}, Profile tab)", file=sys.stderr, flush=True)
    return False


def _has_checkpoints(workdir: str) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def _init_from(state: TrainState, init_from: str, mesh, is_main: bool) -> TrainState:
    """``state`` with the weights of another run (:mod:`.finetune`); optimizer state and step as they are."""
    source_dir, checkpoint = finetune.resolve_source(init_from)
    source = load_trained(source_dir, checkpoint, mesh)
    params, kept = finetune.merge_weights(jax.device_get(state.params), jax.device_get(source.variables["params"]),
                                          "parameter")
    batch_stats, _ = finetune.merge_weights(jax.device_get(state.batch_stats),
                                            jax.device_get(source.variables["batch_stats"]), "batch statistic")
    params, batch_stats = jax.device_put((params, batch_stats), parallel.replicated(mesh))
    state = state.replace(params=params, batch_stats=batch_stats)
    if state.ema_params is not None:
        state = state.replace(ema_params=params, ema_batch_stats=batch_stats)
    if is_main:
        classes = jax.tree.leaves(params["classifier"])[0].shape[-1]
        heads = (f"; the classifier ({', '.join(kept)}) re-initialised for {classes} classes (the source has "
                 f"{source.info.num_classes})" if kept else "")
        print(f"initialised from {source.checkpoint} (step {source.step}){heads}", file=sys.stderr)
    return state


def _hooked(batches: Iterator[dict], hook, start_step: int) -> Iterator[dict]:
    for step, batch in enumerate(batches, start=start_step):
        hook(step, batch)
        yield batch


# ---------------------------------------------------------------------------------------- reloading
@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A trained network restored from a workdir: ``model.apply(variables, images, train=False)``."""

    model: Any
    variables: dict  # {'params', 'batch_stats'}
    config: ml_collections.ConfigDict
    info: data.DatasetInfo
    step: int
    checkpoint: str


def load_trained(workdir: str, checkpoint: str | int = "best", mesh=None) -> TrainedModel:
    """Restore the network of ``workdir`` at ``checkpoint`` (``'best'``, ``'latest'``, ``'ema'`` or a step).

    ``'best'``: the weights that chose the best checkpoint (its EMA weights for a run with
    ``best_by='ema'``, as ``summary.json``'s test figures are); ``'ema'``: the moving averages of
    the weights (a run with ``ema_decay``) at the best checkpoint.

    The network is rebuilt from the run's ``config.json``; the state is restored replicated over
    ``mesh`` (default: all devices), whatever device count wrote it. ``'latest'`` is the newest
    readable checkpoint. Raises ``ValueError`` for a workdir without a run or checkpoints, or an
    unknown checkpoint, and :class:`CheckpointError` when the checkpoint cannot be read.
    """
    workdir = os.path.abspath(workdir)
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{workdir} holds no training run (no config.json)")
    with open(config_path, encoding="utf-8") as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.parallel = "jit"  # reloading never needs the per-device form
    no_checkpoints = ValueError(f"{workdir} has no checkpoints (train first: python train.py --workdir {workdir} ...)")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise no_checkpoints  # checked first: opening the manager would create the directory
    checkpoints = Checkpoints(workdir, read_only=True)  # works on archived, read-only runs
    try:
        steps = checkpoints.steps()
        if not steps:
            raise no_checkpoints
        info = data.dataset_info(config.data)
        model = build_model(config, info)
        mesh = mesh or parallel.make_mesh()
        optimizer, _ = create_optimizer(config.optimizer, config.global_batch_size, config.num_train_steps,
                                        config.get("freeze", ""))
        ema = float(config.get("ema_decay", 0.0)) > 0
        if checkpoint == "ema" and not ema:
            raise ValueError(f"the run in {workdir} kept no EMA weights (trained without --config.ema_decay); "
                             "load 'best', 'latest' or a step")
        abstract_state = jax.eval_shape(lambda: _initial_state(model, optimizer, info.image_shape, 0, ema))
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)),
                              _state_dict(abstract_state))
        if checkpoint == "latest":
            step = None  # the newest readable one, falling back past unreadable ones as a resume does
        elif checkpoint in ("best", "ema"):
            step = checkpoints.meta(steps[-1]).get("best_step") or steps[-1]
            if step not in steps:
                raise ValueError(f"the best checkpoint (step {step}) is no longer in {checkpoints.directory}; "
                                 f"load 'latest' or one of the steps {steps}")
        else:
            try:
                step = int(checkpoint)
            except (TypeError, ValueError):
                raise ValueError(f"checkpoint must be 'best', 'latest', 'ema' or a step, got {checkpoint!r}") from None
            if step not in steps:
                raise ValueError(f"no checkpoint at step {step} in {checkpoints.directory}; steps: {steps}")
        restored, _, step = checkpoints.restore(target, step=step)
    finally:
        checkpoints.close()
    ema_weights = checkpoint == "ema" or (checkpoint == "best" and config.get("best_by", "model") == "ema")
    prefix = "ema_" if ema_weights else ""
    variables = {"params": restored[f"{prefix}params"], "batch_stats": restored[f"{prefix}batch_stats"]}
    return TrainedModel(model, variables, config, info, step, checkpoints.path(step))

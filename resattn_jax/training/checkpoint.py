"""Orbax checkpoints: asynchronous, atomic, checksummed; the latest few plus the best by validation accuracy.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta,manifest.json}``. ``state`` is the train state
pytree (parameters, optimizer state, batch statistics, step); ``meta`` is JSON: the step, this
step's validation accuracy (when it was evaluated), the best validation accuracy so far and its
step, and the config fingerprint (:func:`~resattn_jax.training.workdir.config_fingerprint`).
Because the training input is a pure function of (config, seed, step), the step *is* the
data-pipeline position.

* **Atomic.** Orbax writes each checkpoint into a temporary directory and renames it when
  complete, so a crash never leaves a half-written checkpoint under a step name.
* **Checksummed.** Once a save has committed, ``manifest.json`` records the size and sha256 of every
  file in it (written atomically). :meth:`Checkpoints.restore` verifies it, checks that the
  stored shapes fit, reads the state and checks that every value is finite. A checkpoint that fails
  is *corrupt*: it is renamed aside to ``<step>.corrupt-<time>`` with one warning line naming it and
  the reason, and the restore falls back to the next older one. A checkpoint whose shapes do not
  fit the network is not corrupt but incompatible: that is an error, and nothing is renamed.
* **Retention that survives restarts.** We keep the latest ``keep`` committed checkpoints plus the
  best one, whose step is recorded in every checkpoint's ``meta`` (so a restarted run knows it
  without Orbax's in-memory metrics). Deletion happens only after a newer save has committed.

``python -m resattn_jax.checkpoint verify WORKDIR`` checks every checkpoint of a run
(:mod:`resattn_jax.tools.checkpoint`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from resattn_jax.training.workdir import atomic_write_text

__all__ = ["CheckpointError", "CheckpointWriteError", "CorruptCheckpoint", "Checkpoints", "abstract_like"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHUNK = 1 << 22
#: Orbax splits the save of a replicated array across its replicas; on host-platform devices that is
#: one dispatched slice per replica and leaf (670 leaves x 8 devices: 4.3 s per save of the tiny net,
#: 1.1 s without). Only arrays with at least this many bytes per replica are split.
MIN_REPLICA_SLICE_BYTES = 1 << 20


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's files do not match its manifest, cannot be read, or hold non-finite values."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions): one line with the cause and path."""


@contextlib.contextmanager
def _writing(directory: str):
    """Turn any failure of a (possibly asynchronous) save into :class:`CheckpointWriteError`."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore wrap OS errors in ValueError and others
        text = str(e)
        errno_error = next((x for x in _chain(e) if isinstance(x, OSError) and x.strerror), None)
        if errno_error is not None:
            cause = errno_error.strerror
        elif "No space left" in text or "RESOURCE_EXHAUSTED" in text:
            cause = "No space left on device"
        elif "Permission denied" in text or "PERMISSION_DENIED" in text:
            cause = "Permission denied"
        else:
            cause = _one_line(e)
        # (An asynchronous save's failure surfaces at the next save or wait: name the folder.)
        raise CheckpointWriteError(f"cannot write a checkpoint in {directory}: {cause}") from e


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: str) -> list[str]:
    """Every file under ``directory`` except the manifest, as sorted relative paths."""
    found = []
    for root, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(root, name), directory) for name in names]
    # (not the manifest, nor the temporary file of a manifest write that a kill interrupted)
    return sorted(f for f in found if f != MANIFEST and not os.path.basename(f).startswith(f".{MANIFEST}."))


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """The item handlers: ``state`` a PyTree of arrays (Orbax's standard format, with our
    :data:`MIN_REPLICA_SLICE_BYTES`), ``meta`` JSON. Built per manager: nothing global changes."""
    th = ocp.type_handlers
    types = th.create_type_handler_registry(
        (jax.Array, th.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)),
        (np.ndarray, th.NumpyHandler()), (np.number, th.ScalarHandler()), (int, th.ScalarHandler()),
        (float, th.ScalarHandler()))
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.PyTreeSave, ocp.PyTreeCheckpointHandler(type_handler_registry=types))
    registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler(type_handler_registry=types))
    registry.add("meta", ocp.args.JsonSave, ocp.JsonCheckpointHandler())
    registry.add("meta", ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
    return registry


def _finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(getattr(x, "dtype", np.int32), jnp.inexact)]
    if not leaves:
        return True
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves))


class Checkpoints:
    """The checkpoints of one workdir over ``ocp.CheckpointManager`` (see the module docstring).

    ``read_only=True`` (evaluation, export) never writes, deletes or renames anything and works on a
    read-only workdir; corrupt checkpoints are then skipped with a warning, not renamed.
    """

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.keep, self.read_only = int(keep), read_only
        self.primary = jax.process_index() == 0
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                                   save_interval_steps=0)
        else:  # Orbax keeps everything; retention is ours (_seal_committed): it must survive restarts
            options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
                                                   create=True)
        with _quiet_orbax(read_only):  # "Given directory is read only"
            self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handler_registry())
        self._in_flight: int | None = None
        self._best_step: int | None = None
        self._saved = False

    # ------------------------------------------------------------------------------ saving
    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start saving (asynchronously). ``meta['best_step']`` is kept beside the latest ``keep``."""
        with _writing(self.directory):
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
        # Orbax finished the previous save before starting this one: seal and prune the committed ones.
        self._in_flight, self._best_step, self._saved = step, meta.get("best_step"), True
        self._seal_committed()

    def wait(self) -> None:
        """Block until every pending save is committed (and sealed with its manifest)."""
        with _writing(self.directory):
            self.manager.wait_until_finished()
        self._in_flight = None
        self._seal_committed()

    def _seal_committed(self) -> None:
        """Prune, then write the manifests of the committed checkpoints that have none.

        Pruning keeps the latest ``keep`` committed checkpoints and the best one named by the meta of
        the latest save; it happens only after a save by this object (before one, the best step is
        not known yet). Every process prunes (Orbax's delete is collective); process 0 seals.
        """
        if self.read_only:
            return
        committed = [s for s in self.steps() if s != self._in_flight]
        if self._saved:
            keep = set(committed[-self.keep:]) if self.keep > 0 else set()
            if self._best_step is not None:
                keep.add(int(self._best_step))
            for step in committed:
                if step not in keep:
                    self.manager.delete(step)
            committed = [s for s in committed if s in keep]
        if self.primary:
            for step in committed:
                if not os.path.exists(os.path.join(self.path(step), MANIFEST)):
                    self.write_manifest(step)

    def write_manifest(self, step: int) -> None:
        """Record the size and sha256 of every file of the committed checkpoint ``step``."""
        directory = self.path(step)
        files = {name: {"size": os.path.getsize(os.path.join(directory, name)),
                        "sha256": _file_digest(os.path.join(directory, name))} for name in _files(directory)}
        atomic_write_text(os.path.join(directory, MANIFEST),
                          json.dumps({"step": step, "created": time.time(), "files": files}, indent=1))

    # ------------------------------------------------------------------------------ reading
    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint ``step`` alone (the state is not read)."""
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def verify(self, step: int) -> str | None:
        """Why the files of checkpoint ``step`` do not match its manifest, or ``None`` when they do.
        A checkpoint without a manifest (its run was killed between commit and seal) passes."""
        directory = self.path(step)
        try:
            with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
                recorded = json.load(f)["files"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"unreadable manifest ({type(e).__name__})"
        for name, entry in recorded.items():
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                return f"{name} is missing"
            if os.path.getsize(path) != entry["size"]:
                return f"{name} has {os.path.getsize(path)} bytes, the manifest says {entry['size']}"
            if _file_digest(path) != entry["sha256"]:
                return f"{name} does not match its checksum"
        return None

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restore ``(state, meta, step)`` into ``abstract_state``'s shapes, dtypes and shardings.

        With ``step=None`` take the latest good checkpoint, setting corrupt ones aside and falling
        back past them; with a ``step``, that one or :class:`CorruptCheckpoint`. Raises
        :class:`CheckpointError` when none can be restored or a checkpoint does not fit
        ``abstract_state`` (a different network).
        """
        candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
        if not candidates:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        errors = []
        for candidate in candidates:
            try:
                return (*self._restore_one(abstract_state, candidate), candidate)
            except CorruptCheckpoint as e:
                errors.append(f"step {candidate}: {e}")
                self._set_aside(candidate, str(e))
                if step is not None:
                    raise
        raise CheckpointError(f"no readable checkpoint in {self.directory} ({'; '.join(errors)})")

    def _restore_one(self, abstract_state: Any, step: int) -> tuple[Any, dict]:
        reason = self.verify(step)
        if reason:
            raise CorruptCheckpoint(reason)
        self._check_shapes(abstract_state, step)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract_state,
                                             restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - the files are there, match and fit, yet cannot be read
            raise CorruptCheckpoint(f"unreadable ({_one_line(e)})") from None
        if not _finite(restored["state"]):
            raise CorruptCheckpoint("holds non-finite values")
        if not self.read_only and self.primary and not os.path.exists(os.path.join(self.path(step), MANIFEST)):
            self.write_manifest(step)  # read back whole and finite: seal it now
        return restored["state"], dict(restored["meta"])

    def _check_shapes(self, abstract_state: Any, step: int) -> None:
        """``CheckpointError`` (not corruption) when the stored arrays do not fit ``abstract_state``.
        Metadata that cannot be read is left for the restore itself to judge."""
        try:
            with _quiet_orbax():  # "Metadata file does not exist" (the step's, not the item's)
                stored = ocp.StandardCheckpointer().metadata(os.path.join(self.path(step), "state")).item_metadata
            stored = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
        except Exception:  # noqa: BLE001
            return
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
            found = stored.get(path)
            name = jax.tree_util.keystr(path)
            if found is None:
                raise CheckpointError(f"checkpoint {self.path(step)} does not fit this network: it has no {name}")
            if tuple(found.shape) != tuple(leaf.shape):
                raise CheckpointError(f"checkpoint {self.path(step)} does not fit this network: {name} has shape "
                                      f"{tuple(found.shape)} there, {tuple(leaf.shape)} here")

    def _set_aside(self, step: int, reason: str) -> None:
        if self.read_only or not self.primary:
            log.warning("checkpoint %s is corrupt (%s); skipping it", self.path(step), reason)
            return
        aside = f"{self.path(step)}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
        os.rename(self.path(step), aside)
        self.manager.reload()
        log.warning("checkpoint %s is corrupt (%s); moved to %s, falling back to an older one",
                    self.path(step), reason, os.path.basename(aside))

    def close(self) -> None:
        if not self.read_only:
            self.wait()
        self.manager.close()


@contextlib.contextmanager
def _quiet_orbax(quiet: bool = True):
    """Orbax's warnings (through absl's logger) raised to errors only, inside the block."""
    logger = logging.getLogger("absl")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with shardings) describing ``tree``, for restoring into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)

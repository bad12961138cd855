"""Orbax checkpoints: asynchronous, atomic, the latest few plus the best by validation accuracy.

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. ``state`` is the train state pytree
(parameters, optimizer state, batch statistics, step); ``meta`` is JSON (the step, the best
validation accuracy so far and its step, the config fingerprint). Because the training input is
a pure function of (config, seed, step), the step *is* the data-pipeline position.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
crash never leaves a half-written checkpoint under a step name. A checkpoint that is present but
unreadable (corrupt or truncated files) is skipped on restore with a warning, falling back to the
next older one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

__all__ = ["CheckpointError", "Checkpoints"]

log = logging.getLogger(__name__)

BEST_METRIC = "validation_accuracy"


class CheckpointError(RuntimeError):
    """No usable checkpoint could be restored."""


class Checkpoints:
    """Thin wrapper over ``ocp.CheckpointManager`` for the train state and its metadata."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Start saving (asynchronously); ``metrics`` with ``validation_accuracy`` ranks it for 'best'."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=True)

    def wait(self) -> None:
        """Block until every pending save is committed."""
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint ``step`` alone (the state is not read)."""
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restore ``(state, meta, step)`` into ``abstract_state``'s shapes, dtypes and shardings.

        With ``step=None`` take the latest readable checkpoint, falling back (with a warning) past
        unreadable ones. Raises :class:`CheckpointError` when none can be read.
        """
        candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
        if not candidates:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        errors = []
        for candidate in candidates:
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
                return restored["state"], dict(restored["meta"]), candidate
            except Exception as e:  # noqa: BLE001 - any failure to read means "try the previous one"
                message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                errors.append(f"step {candidate}: {message}")
                log.warning("checkpoint %s is unreadable (%s); falling back to an older one", self.path(candidate),
                            message)
        raise CheckpointError(f"no readable checkpoint in {self.directory} ({'; '.join(errors)})")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with shardings) describing ``tree``, for restoring into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)

"""Fine-tuning: starting a run from another run's weights (``config.init_from``).

``init_from`` names a run's workdir (its best checkpoint) or one checkpoint of it
(``WORKDIR/checkpoints/STEP``). The new run takes the source's parameters and BatchNorm statistics
where the shapes agree; the classifier, when the class count differs, keeps its fresh
initialisation (reported); any other difference is a one-line error naming the first mismatching
parameter. The optimizer state and the step start fresh; once the new run has checkpoints, a rerun
resumes from them and ``init_from`` is not read again. ``freeze='backbone'`` then trains only the
classifier: the optimizer leaves every other parameter as it is (:func:`..optim.create_optimizer`)
and BatchNorm runs on its stored statistics, which stay fixed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flax import traverse_util

from resattn_jax.training.optim import HEAD

__all__ = ["merge_weights", "resolve_source"]


def resolve_source(path: str) -> tuple[str, str | int]:
    """``(workdir, checkpoint)`` of ``init_from``: ``'best'`` for a workdir, the step for a checkpoint."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
        return path, "best"
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints" and os.path.basename(path).isdigit() and os.path.isdir(path):
        return os.path.dirname(parent), int(os.path.basename(path))
    raise ValueError(f"--config.init_from={path}: not a run's workdir (config.json and checkpoints/) nor one of its "
                     "checkpoints (WORKDIR/checkpoints/STEP)")


def merge_weights(target: dict[str, Any], source: dict[str, Any], collection: str) -> tuple[dict[str, Any], list[str]]:
    """``target``'s tree with ``source``'s arrays wherever the shapes agree.

    Returns ``(merged, kept)``: ``kept`` lists the classifier leaves left at their initial values
    because their shapes differ (another class count). Any other missing, extra or differently
    shaped leaf raises a one-line ``ValueError`` naming it.
    """
    new, old = traverse_util.flatten_dict(target), traverse_util.flatten_dict(source)
    missing, extra = [k for k in new if k not in old], [k for k in old if k not in new]
    if missing or extra:
        first = (missing or extra)[0]
        where = "is not in the source run" if missing else "of the source run is not in this network"
        raise ValueError(f"--config.init_from: {collection} {'/'.join(first)} {where} (another architecture?)")
    merged, kept = {}, []
    for path, value in new.items():
        if np.shape(value) == np.shape(old[path]):
            merged[path] = old[path]
        elif path[0] == HEAD:
            merged[path] = value
            kept.append("/".join(path))
        else:
            raise ValueError(f"--config.init_from: {collection} {'/'.join(path)} has shape {tuple(np.shape(old[path]))} "
                             f"in the source run, {tuple(np.shape(value))} here")
    return traverse_util.unflatten_dict(merged), kept

"""The paper's optimisation recipe as an Optax transformation (paper-facts §4).

SGD with Nesterov momentum and L2 weight decay applied as Caffe does it: ``grad += wd * w``
*before* the momentum update (coupled L2, not decoupled AdamW-style decay).

Decayed parameters: convolution and dense **kernels** only (every parameter leaf named
``kernel``). BatchNorm scale/shift and the classifier bias are not decayed.

Learning rate: piecewise constant in *iterations* (``boundaries``, each multiplying by
``decay_factor``), optionally after a linear warm-up, optionally scaled linearly with the global
batch size (``lr * batch / base_batch_size``).
"""

from __future__ import annotations

from typing import Any

import optax
from flax import traverse_util

__all__ = ["learning_rate_schedule", "weight_decay_mask", "create_optimizer"]


def learning_rate_schedule(cfg, global_batch_size: int) -> optax.Schedule:
    """Schedule from ``cfg`` (the ``config.optimizer`` sub-config).

    Fields: ``learning_rate``, ``boundaries`` (iterations), ``decay_factor``, ``warmup_steps``,
    ``base_batch_size`` (0 disables linear batch-size scaling).
    """
    lr = float(cfg.learning_rate)
    if cfg.base_batch_size:
        lr *= global_batch_size / cfg.base_batch_size
    boundaries = sorted(int(b) for b in cfg.boundaries)
    schedule = optax.piecewise_constant_schedule(lr, {b: float(cfg.decay_factor) for b in boundaries})
    if cfg.warmup_steps:
        warmup = optax.linear_schedule(0.0, lr, int(cfg.warmup_steps))
        schedule = optax.join_schedules([warmup, schedule], [int(cfg.warmup_steps)])
    return schedule


def weight_decay_mask(params: Any) -> Any:
    """``True`` for the leaves that get L2 weight decay: every ``kernel``."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[-1] == "kernel" for path in flat})


def create_optimizer(cfg, global_batch_size: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD(momentum, nesterov) with coupled L2 decay on kernels; returns (optimizer, schedule)."""
    schedule = learning_rate_schedule(cfg, global_batch_size)
    optimizer = optax.chain(
        optax.add_decayed_weights(float(cfg.weight_decay), mask=weight_decay_mask),
        optax.sgd(schedule, momentum=float(cfg.momentum) or None, nesterov=bool(cfg.nesterov)),
    )
    return optimizer, schedule


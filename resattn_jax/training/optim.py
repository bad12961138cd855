"""The paper's optimisation recipe as an Optax transformation (docs/paper-facts.md §4).

SGD with momentum (``nesterov``: True for the CIFAR recipe, False for ImageNet's,
``configs/imagenet.py``) and L2 weight decay applied as Caffe does it: ``grad += wd * w``
*before* the momentum update (coupled L2, not decoupled AdamW-style decay).

Decayed parameters: convolution and dense **kernels** only (every parameter leaf named
``kernel``). BatchNorm scale/shift and the classifier bias are not decayed.

Learning rate (``schedule``): ``piecewise`` constant in *iterations* (``boundaries``, each
multiplying by ``decay_factor``; the paper's), or ``cosine`` decay to 0 at the last step
(Loshchilov & Hutter, 2017; ``optax.warmup_cosine_decay_schedule``, ``boundaries`` unused); either
optionally after a linear warm-up, optionally scaled linearly with the global batch size
(``lr * batch / base_batch_size``).

Fine-tuning with a frozen backbone (``config.freeze='backbone'``): the optimizer updates only the
classifier (``optax.multi_transform`` with ``optax.set_to_zero`` elsewhere).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

__all__ = ["FREEZE_OPTIONS", "SCHEDULES", "check_optimizer_config", "create_optimizer", "default_optimizer_config",
           "learning_rate_schedule", "trainable_mask", "weight_decay_mask"]

SCHEDULES = ("piecewise", "cosine")
FREEZE_OPTIONS = ("", "backbone")
HEAD = "classifier"  # the top-level module trained when the backbone is frozen


def default_optimizer_config() -> ml_collections.ConfigDict:
    """The paper's CIFAR recipe: SGD, Nesterov momentum 0.9, L2 1e-4, lr 0.1 / 10 at 64k and 96k."""
    return ml_collections.ConfigDict({
        "learning_rate": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4,
        "schedule": "piecewise",  # or 'cosine' (to 0 at the last step; boundaries unused)
        "boundaries": (64_000, 96_000), "decay_factor": 0.1,
        "warmup_steps": 0,
        "base_batch_size": 0,  # >0: scale the learning rate by global_batch_size / base_batch_size
    })


def check_optimizer_config(cfg, num_train_steps: int, prefix: str = "optimizer.") -> None:
    """Raise ``ValueError`` naming the first field of ``cfg`` (``config.optimizer``) out of its range,
    as the flag that sets it, e.g. ``--config.optimizer.learning_rate=-0.1: must be > 0``."""
    def bad(field: str, rule: str):
        value = cfg[field]
        shown = f"'{value}'" if isinstance(value, (tuple, list)) else value
        return ValueError(f"--config.{prefix}{field}={shown}: {rule}")

    if cfg.get("schedule", "piecewise") not in SCHEDULES:
        raise bad("schedule", f"choose one of {SCHEDULES}")
    if not float(cfg.learning_rate) > 0:
        raise bad("learning_rate", "must be > 0")
    if not 0 <= float(cfg.momentum) < 1:
        raise bad("momentum", "must be in [0, 1)")
    if not float(cfg.weight_decay) >= 0:
        raise bad("weight_decay", "must be >= 0")
    if not 0 < float(cfg.decay_factor) <= 1:
        raise bad("decay_factor", "must be in (0, 1]")
    if not 0 <= int(cfg.warmup_steps) < num_train_steps:
        raise bad("warmup_steps", f"must be in [0, num_train_steps={num_train_steps})")
    if int(cfg.base_batch_size) < 0:
        raise bad("base_batch_size", "must be >= 0 (0: no batch-size scaling)")
    if cfg.get("schedule", "piecewise") == "cosine":
        return  # boundaries unused
    boundaries = tuple(cfg.boundaries)
    if any(int(b) != b for b in boundaries):
        raise bad("boundaries", "must be whole steps")
    if any(b >= c for b, c in zip(boundaries, boundaries[1:])) or any(not 0 < b < num_train_steps for b in boundaries):
        raise bad("boundaries", f"must be increasing steps in (0, num_train_steps={num_train_steps}); "
                                "() for a constant learning rate")


def learning_rate_schedule(cfg, global_batch_size: int, num_train_steps: int | None = None) -> optax.Schedule:
    """Schedule from ``cfg`` (the ``config.optimizer`` sub-config).

    Fields: ``schedule``, ``learning_rate``, ``boundaries`` (iterations), ``decay_factor``,
    ``warmup_steps``, ``base_batch_size`` (0 disables linear batch-size scaling). ``cosine`` needs
    ``num_train_steps`` (it reaches 0 there).
    """
    lr = float(cfg.learning_rate)
    if cfg.base_batch_size:
        lr *= global_batch_size / cfg.base_batch_size
    if cfg.get("schedule", "piecewise") == "cosine":
        if not num_train_steps:
            raise ValueError("the cosine schedule needs num_train_steps")
        return optax.warmup_cosine_decay_schedule(0.0, lr, int(cfg.warmup_steps), int(num_train_steps), 0.0)
    boundaries = sorted(int(b) for b in cfg.boundaries)
    piecewise = optax.piecewise_constant_schedule(lr, {b: float(cfg.decay_factor) for b in boundaries})
    warmup_steps = int(cfg.warmup_steps)
    if not warmup_steps:
        return piecewise

    def schedule(step):
        # Boundaries stay absolute iterations (optax.join_schedules would restart the count after
        # the warm-up and shift every decay by warmup_steps).
        return jnp.where(step < warmup_steps, lr * step / warmup_steps, piecewise(step))

    return schedule


def weight_decay_mask(params: Any) -> Any:
    """``True`` for the leaves that get L2 weight decay: every ``kernel``."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({path: path[-1] == "kernel" for path in flat})


def trainable_mask(params: Any) -> Any:
    """``'train'`` for the classifier's leaves, ``'freeze'`` for the backbone's (``freeze='backbone'``)."""
    return {name: jax.tree.map(lambda _: "train" if name == HEAD else "freeze", subtree)  # noqa: B023 (run at once)
            for name, subtree in params.items()}


def create_optimizer(cfg, global_batch_size: int, num_train_steps: int | None = None,
                     freeze: str = "") -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD(momentum, nesterov) with coupled L2 decay on kernels; returns (optimizer, schedule).

    ``freeze='backbone'``: only the classifier is updated (the rest gets zero updates).
    """
    if freeze not in FREEZE_OPTIONS:
        raise ValueError(f"--config.freeze={freeze!r}: choose one of {FREEZE_OPTIONS}")
    schedule = learning_rate_schedule(cfg, global_batch_size, num_train_steps)
    optimizer = optax.chain(
        optax.add_decayed_weights(float(cfg.weight_decay), mask=weight_decay_mask),
        optax.sgd(schedule, momentum=float(cfg.momentum) or None, nesterov=bool(cfg.nesterov)),
    )
    if freeze == "backbone":
        optimizer = optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, trainable_mask)
    return optimizer, schedule


"""One training step: 8 devices with parallel='jit', 8 devices per-device ('pmap', BN synced),
and 1 device with the same global batch give the same parameters and batch statistics."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resattn_jax
from configs import default
from resattn_jax.training import parallel
from tiny_config import SMALL
from resattn_jax.training.optim import create_optimizer
from resattn_jax.training.loop import create_train_state, make_train_step

GLOBAL_BATCH = 16


def one_step(mode: str, devices, steps: int = 1):
    axis = parallel.AXIS if mode == "pmap" else None
    model = resattn_jax.create_model("tiny", bn_axis_name=axis, **SMALL)
    optimizer, schedule = create_optimizer(default.get_config().optimizer, GLOBAL_BATCH)
    mesh = parallel.make_mesh(devices)
    state = create_train_state(model, optimizer, (16, 16, 3), seed=0, mesh=mesh)
    step = parallel.compile_step(make_train_step(schedule, axis_name=axis), mode, mesh)
    rng = np.random.default_rng(0)
    metrics = None
    for _ in range(steps):
        batch = {"image": rng.normal(size=(GLOBAL_BATCH, 16, 16, 3)).astype(np.float32),
                 "label": rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)}
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
    return jax.device_get((state.params, state.batch_stats, state.opt_state, metrics))


@pytest.fixture(scope="module")
def single_device():
    return one_step("jit", jax.devices()[:1])


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_eight_devices_match_one_device(single_device, mode):
    assert jax.device_count() == 8
    params, stats, opt_state, metrics = one_step(mode, jax.devices())
    ref_params, ref_stats, ref_opt, ref_metrics = single_device
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    jax.tree.map(close, params, ref_params)
    jax.tree.map(close, stats, ref_stats)
    jax.tree.map(close, opt_state, ref_opt)
    for key in ("loss", "accuracy", "grad_norm"):
        close(metrics[key], ref_metrics[key])


def test_step_actually_moves_parameters(single_device):
    model = resattn_jax.create_model("tiny", **SMALL)
    optimizer, _ = create_optimizer(default.get_config().optimizer, GLOBAL_BATCH)
    mesh = parallel.make_mesh(jax.devices()[:1])
    init = create_train_state(model, optimizer, (16, 16, 3), seed=0, mesh=mesh)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), single_device[0], init.params)
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_batch_that_does_not_divide_is_rejected():
    from resattn_jax.training.loop import validate_config

    config = default.get_config()
    config.global_batch_size = 30
    with pytest.raises(ValueError, match="global_batch_size=30 does not divide by the 8 devices"):
        validate_config(config)


def test_learning_rate_schedule_counts_absolute_iterations():
    from resattn_jax.training.optim import learning_rate_schedule

    config = default.get_config().optimizer
    config.boundaries, config.warmup_steps = (100, 150), 10
    schedule = learning_rate_schedule(config, 64)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.05)
    assert [float(schedule(s)) for s in (10, 99, 100, 149, 150)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    config.base_batch_size, config.warmup_steps = 32, 0
    assert float(learning_rate_schedule(config, 64)(0)) == pytest.approx(0.2)


def test_weight_decay_applies_to_kernels_only():
    from resattn_jax.training.optim import weight_decay_mask

    params = {"conv": {"kernel": 1}, "bn": {"scale": 1, "bias": 1}, "classifier": {"kernel": 1, "bias": 1}}
    assert weight_decay_mask(params) == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False},
                                         "classifier": {"kernel": True, "bias": False}}


def _recipe_updates(optimizer_config, steps: int = 2):
    """Updates of ``create_optimizer`` for a constant gradient 0.5 at unchanged parameters 2.0."""
    params = {"conv": {"kernel": jnp.full((3,), 2.0)}, "bn": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)},
              "classifier": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full((2,), 2.0)}}
    optimizer, _ = create_optimizer(optimizer_config, GLOBAL_BATCH)
    state, grads, updates = optimizer.init(params), jax.tree.map(lambda p: jnp.full_like(p, 0.5), params), []
    for _ in range(steps):
        update, state = optimizer.update(grads, state, params)
        updates.append(update)
    return updates


@pytest.mark.parametrize("config_name,nesterov", [("configs/cifar.py", True), ("configs/imagenet.py", False),
                                                  ("configs/default.py", True)])
def test_recipe_momentum_nesterov_and_decay_mask(config_name, nesterov):
    """SGD, momentum 0.9, Nesterov for CIFAR (not ImageNet), L2 1e-4 added to the gradient of kernels only."""
    import importlib

    config = importlib.import_module(config_name[:-3].replace("/", ".")).get_config().optimizer
    assert (config.momentum, config.nesterov, config.weight_decay, config.learning_rate) == (0.9, nesterov, 1e-4, 0.1)
    config.warmup_steps = 0
    lr, mu = 0.1, 0.9
    # Nesterov: update_k = -lr * (g + mu * m_k), m_k = g + mu * m_{k-1}; heavy ball: -lr * m_k.
    factors = [1 + mu, 1 + mu + mu ** 2] if nesterov else [1.0, 1 + mu]
    for update, factor in zip(_recipe_updates(config), factors):
        decayed, plain = -lr * factor * (0.5 + 1e-4 * 2.0), -lr * factor * 0.5
        expected = {"conv": {"kernel": decayed}, "bn": {"scale": plain, "bias": plain},
                    "classifier": {"kernel": decayed, "bias": plain}}
        jax.tree.map(lambda u, e: np.testing.assert_allclose(u, np.full(u.shape, e), rtol=1e-6), update, expected)

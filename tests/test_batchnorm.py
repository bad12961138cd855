"""resattn_jax.batchnorm.BatchNorm against flax.linen.BatchNorm: variables, values, statistics, gradients."""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from resattn_jax.ops import backend
from resattn_jax.ops.batchnorm import BatchNorm, batch_norm_train, norm_relu

SHAPE = (4, 6, 5, 8)


class _Norm(nn.Module):
    """Ours (``ours=True``) or flax.linen.BatchNorm + nn.relu, the semantics ours must reproduce."""

    relu: bool
    train: bool
    axis_name: str | None = None
    dtype: object = None
    ours: bool = True

    @nn.compact
    def __call__(self, x):
        common = dict(use_running_average=not self.train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                      axis_name=self.axis_name, name="bn")
        if self.ours:
            return BatchNorm(relu=self.relu, **common)(x)
        y = nn.BatchNorm(**common)(x)
        return nn.relu(y) if self.relu else y


_Ours = functools.partial(_Norm, ours=True)
_FlaxReference = functools.partial(_Norm, ours=False)


def _data(seed=0, shape=SHAPE):
    kx, kg, ks, kb, km, kv = jax.random.split(jax.random.key(seed), 6)
    x = 3.0 * jax.random.normal(kx, shape) + 0.7  # off-centre, not unit variance
    g = jax.random.normal(kg, shape)
    c = shape[-1]
    variables = {"params": {"bn": {"scale": 1 + 0.5 * jax.random.normal(ks, (c,)), "bias": jax.random.normal(kb, (c,))}},
                 "batch_stats": {"bn": {"mean": jax.random.normal(km, (c,)),
                                        "var": 1 + jax.random.uniform(kv, (c,))}}}
    return x, g, variables


def _apply_and_grad(module, variables, x, g):
    def loss(params, x):
        y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  mutable=["batch_stats"])
        return jnp.sum(y.astype(jnp.float32) * g), (y, updates["batch_stats"])

    (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
    return y, stats, grads


def test_same_variables_as_flax():
    x = jnp.ones(SHAPE)
    ours = _Ours(relu=True, train=True).init(jax.random.key(0), x)
    theirs = _FlaxReference(relu=True, train=True).init(jax.random.key(0), x)
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), ours)
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), theirs)


@pytest.mark.parametrize("relu", [False, True])
def test_training_mode_matches_flax(relu):
    x, g, variables = _data()
    y, stats, (dparams, dx) = _apply_and_grad(_Ours(relu, True), variables, x, g)
    y_ref, stats_ref, (dparams_ref, dx_ref) = _apply_and_grad(_FlaxReference(relu, True), variables, x, g)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), stats, stats_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), dparams, dparams_ref)
    if relu:
        assert float(jnp.mean(y == 0)) > 0.2  # the ReLU's mask is exercised


@pytest.mark.parametrize("relu", [False, True])
def test_evaluation_mode_matches_flax(relu):
    x, _, variables = _data(1)
    y = _Ours(relu, False).apply(variables, x)
    y_ref = _FlaxReference(relu, False).apply(variables, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)


def test_bfloat16_output_with_float32_statistics():
    x, g, variables = _data(2)
    x = x.astype(jnp.bfloat16)
    y, stats, (_, dx) = _apply_and_grad(_Ours(True, True, dtype=jnp.bfloat16), variables, x, g)
    y_ref, stats_ref, (_, dx_ref) = _apply_and_grad(_FlaxReference(True, True, dtype=jnp.bfloat16), variables, x, g)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    assert jax.tree.map(lambda a: a.dtype, stats) == jax.tree.map(lambda a: jnp.dtype(jnp.float32), stats)
    np.testing.assert_allclose(y.astype(jnp.float32), y_ref.astype(jnp.float32), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(dx.astype(jnp.float32), dx_ref.astype(jnp.float32), rtol=5e-2, atol=5e-2)


def test_per_device_statistics_and_gradients_match_flax():
    """Under shard_map the statistics and the backward sums run over the device axis, as Flax's."""
    devices = jax.devices()[:4]
    mesh = Mesh(np.array(devices), ("data",))
    x, g, variables = _data(3, (8, 6, 5, 8))

    def per_device(module):
        def f(params, stats, x, g):
            def loss(params, x):
                y, updates = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
                return jax.lax.psum(jnp.sum(y * g), "data"), updates["batch_stats"]
            (_, new_stats), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
            return new_stats, grads
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                     out_specs=(P(), (P(), P("data")))))

    args = (variables["params"], variables["batch_stats"], x, g)
    ours = per_device(_Ours(True, True, axis_name="data"))(*args)
    theirs = per_device(_FlaxReference(True, True, axis_name="data"))(*args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours, theirs)
    # ... and equal the single-device computation on the whole batch.
    whole = _apply_and_grad(_Ours(True, True), variables, x, g)
    np.testing.assert_allclose(ours[1][1], whole[2][1], rtol=1e-4, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), ours[0], whole[1])


def test_norm_relu_falls_back_to_a_separate_relu_for_other_norms():
    class Net(nn.Module):
        norm: object

        @nn.compact
        def __call__(self, x):
            return norm_relu(self.norm, "bn")(x)

    x, _, variables = _data(4)
    theirs = Net(functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5)).apply(variables, x)
    ours = Net(functools.partial(BatchNorm, use_running_average=True, epsilon=1e-5)).apply(variables, x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    assert float(jnp.min(theirs)) == 0.0


def _far_from_zero(shape, seed=5):
    """float32 data with |mean|/std = 1000 per channel, where ``E[x^2] - E[x]^2`` loses ~all digits."""
    return 1000.0 + jax.random.normal(jax.random.key(seed), shape)


def _float64_statistics(x, axes=(0, 1, 2)):
    x = np.asarray(x, np.float64)
    return x.mean(axes), x.var(axes)


@pytest.mark.parametrize("custom_calls", [True, False])
def test_variance_keeps_float32_precision_at_mean_1000_std(custom_calls):
    x = _far_from_zero((16, 8, 8, 32))
    c = x.shape[-1]
    statistics = lambda x: batch_norm_train(x, jnp.ones(c), jnp.zeros(c), 1e-5, True, None, jnp.float32)[1:]  # noqa: E731
    with contextlib.nullcontext() if custom_calls else backend.portable():
        compiled = jax.jit(statistics).lower(x)
    assert ("resattn_bn_sums" in compiled.as_text()) == custom_calls  # the path under test is the one run
    mean, var = compiled.compile()(x)
    mean_ref, var_ref = _float64_statistics(x)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6)
    np.testing.assert_allclose(var, var_ref, rtol=1e-4)


def test_per_device_variance_keeps_precision_and_combines_exactly():
    """Devices with different local means (1000 + 0, 0.5, 1, 1.5): the all-gather combination is the
    variance of the whole batch, at |mean|/std = 1000."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    x = _far_from_zero((8, 6, 5, 16)) + jnp.repeat(0.5 * jnp.arange(4.0), 2)[:, None, None, None]
    c = x.shape[-1]

    def statistics(x):
        return batch_norm_train(x, jnp.ones(c), jnp.zeros(c), 1e-5, False, "data", jnp.float32)[1:]

    mean, var = jax.jit(jax.shard_map(statistics, mesh=mesh, in_specs=P("data"), out_specs=P()))(x)
    mean_ref, var_ref = _float64_statistics(x)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6)
    np.testing.assert_allclose(var, var_ref, rtol=1e-4)


class _FoldedConv(nn.Module):
    """BN-ReLU folded into a 1x1 convolution plus a residual (ours), or Flax's BatchNorm, ReLU, Conv and add."""

    train: bool
    features: int
    relu: bool = True
    residual: bool = True
    ours: bool = True
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, r):
        from resattn_jax.ops import Conv1x1  # noqa: PLC0415

        common = dict(use_running_average=not self.train, momentum=0.9, epsilon=1e-5, name="bn",
                      axis_name=self.axis_name)
        if self.ours:
            pre = BatchNorm(relu=self.relu, **common)(x, fold=True)
            return Conv1x1(self.features, name="conv")(pre, residual=r if self.residual else None)
        y = nn.BatchNorm(**common)(x)
        y = nn.Conv(self.features, (1, 1), use_bias=False, name="conv")(nn.relu(y) if self.relu else y)
        return y + r if self.residual else y


def _folded_data(seed, channels, features):
    x, _, variables = _data(seed, (4, 6, 5, channels))
    kw, kr, kg = jax.random.split(jax.random.key(seed + 100), 3)
    variables["params"]["conv"] = {"kernel": jax.random.normal(kw, (1, 1, channels, features)) / channels ** 0.5}
    r = jax.random.normal(kr, (4, 6, 5, features))
    return x, r, jax.random.normal(kg, (4, 6, 5, features)), variables


# Multiples of 8: the fused CPU pass (one vector of 8, 1-4 of 16); 12: XLA's formula.
@pytest.mark.parametrize("channels,features", [(16, 32), (32, 16), (8, 16), (16, 24), (12, 16), (16, 12)])
@pytest.mark.parametrize("relu,residual", [(True, True), (False, False)])
def test_folded_into_a_1x1_convolution_matches_flax(channels, features, relu, residual):
    x, r, g, variables = _folded_data(4, channels, features)
    ours, theirs = (_FoldedConv(True, features, relu, residual, ours=flag) for flag in (True, False))

    def run(module, x, r):
        def loss(params, x, r):
            y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, r,
                                      mutable=["batch_stats"])
            return jnp.sum(y * g), (y, updates["batch_stats"])
        (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(variables["params"], x, r)
        return y, stats, grads

    lowered = jax.jit(run, static_argnums=0).lower(ours, x, r).as_text()
    assert ("resattn_conv1x1_grad" in lowered) == (channels % 8 == 0 and features % 8 == 0)
    got, want = jax.jit(run, static_argnums=0)(ours, x, r), run(theirs, x, r)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, want)
    evaluated = [m.apply({**variables, "batch_stats": got[1]}, x, r) for m in (
        _FoldedConv(False, features, relu, residual, ours=True), _FoldedConv(False, features, relu, residual, ours=False))]
    np.testing.assert_allclose(evaluated[0], evaluated[1], rtol=1e-5, atol=1e-5)


def test_folded_gradients_keep_precision_at_mean_1000_std():
    """The fused backward sums ``dz * (x - mean)``, so a large mean does not cancel (like the unfused VJP)."""
    x, r, g, variables = _folded_data(5, 16, 16)
    x = 1000.0 + x
    ours, theirs = _FoldedConv(True, 16, ours=True), _FoldedConv(True, 16, ours=False)

    def grads(module, dtype):
        cast = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)  # noqa: E731
        def loss(params, x):
            y, _ = module.apply({"params": params, "batch_stats": cast(variables["batch_stats"])}, x, r.astype(dtype),
                                mutable=["batch_stats"])
            return jnp.sum(y * g.astype(dtype))
        return jax.grad(loss, (0, 1))(cast(variables["params"]), x.astype(dtype))

    jax.config.update("jax_enable_x64", True)
    try:
        want = grads(theirs, jnp.float64)
    finally:
        jax.config.update("jax_enable_x64", False)
    got = jax.jit(lambda: grads(ours, jnp.float32))()
    errors = jax.tree.map(lambda a, b: float(np.abs(a - np.asarray(b)).max() / np.abs(np.asarray(b)).max()), got, want)
    assert max(jax.tree.leaves(errors)) < 1e-4  # Flax's float32 BatchNorm: 0.17 here


def test_folded_per_device_statistics_and_gradients_match_flax():
    """Under shard_map the folded statistics run over the device axis and the cotangents of the
    replicated parameters are summed over the devices: the whole-batch gradients, as Flax's."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    x, r, g, variables = _folded_data(6, 16, 32)
    x, r, g = (jnp.concatenate([t, 0.5 * t]) for t in (x, r, g))  # batch 8: 2 per device

    def per_device(module):
        def f(params, stats, x, r, g):
            def loss(params, x, r):
                y, updates = module.apply({"params": params, "batch_stats": stats}, x, r, mutable=["batch_stats"])
                return jax.lax.psum(jnp.sum(y * g), "data"), updates["batch_stats"]
            (_, new_stats), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, r)
            return new_stats, grads
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(), P(), P("data"), P("data"), P("data")),
                                     out_specs=(P(), (P(), P("data"), P("data")))))

    args = (variables["params"], variables["batch_stats"], x, r, g)
    ours = per_device(_FoldedConv(True, 32, axis_name="data"))(*args)
    theirs = per_device(_FoldedConv(True, 32, ours=False, axis_name="data"))(*args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), ours, theirs)

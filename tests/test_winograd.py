"""Winograd 3x3 convolution: same values and gradients as XLA's convolution, chosen per backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resattn_jax.tools.flops import count_macs
from resattn_jax.ops import Conv3x3, conv3x3, conv3x3_direct
from resattn_jax.ops.cpu.winograd import conv3x3_winograd, tile_size


def _operands(shape, out_channels, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, shape, jnp.float32)
    w = jax.random.normal(kw, (3, 3, shape[-1], out_channels), jnp.float32) / np.sqrt(9 * shape[-1])
    return x, w


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape,out_channels", [((2, 8, 8, 3), 5), ((1, 9, 13, 4), 4), ((2, 5, 6, 2), 7),
                                                ((1, 3, 3, 1), 1)])
def test_winograd_matches_direct_convolution(m, shape, out_channels):
    x, w = _operands(shape, out_channels)
    ref = conv3x3_direct(x, w)
    out = conv3x3_winograd(x, w, m)
    assert out.shape == ref.shape
    assert _rel_err(out, ref) < (2e-5 if m == 4 else 2e-6)


def test_winograd_rejects_other_tile_sizes():
    x, w = _operands((1, 8, 8, 2), 2)
    with pytest.raises(ValueError, match="tile size"):
        conv3x3_winograd(x, w, 3)


def test_tile_size_rules():
    assert tile_size(8, 56, 56, 64, jnp.float32) == 4       # 8 * 14 * 14 tiles of 4x4
    assert tile_size(8, 14, 14, 256, jnp.float32) == 2      # 8 * 4 * 4 = 128 tiles of 4x4: too few
    assert tile_size(64, 16, 16, 128, jnp.float32) == 4
    assert tile_size(8, 7, 7, 512, jnp.float32) == 0
    assert tile_size(64, 32, 32, 32, jnp.float32) == 0      # too few channels
    assert tile_size(8, 56, 56, 64, jnp.bfloat16) == 0


# (shape, out channels) that select F(4, 3), F(2, 3) and the direct convolution on CPU.
_CASES = [((1, 63, 66, 64), 8), ((6, 17, 14, 64), 96), ((2, 7, 7, 64), 6)]


@pytest.mark.parametrize("shape,out_channels", _CASES)
def test_conv3x3_values_and_gradients_match_direct(shape, out_channels):
    x, w = _operands(shape, out_channels, seed=1)
    dy = jax.random.normal(jax.random.key(2), shape[:-1] + (out_channels,))
    out, vjp = jax.vjp(jax.jit(conv3x3), x, w)
    ref, ref_vjp = jax.vjp(conv3x3_direct, x, w)
    assert _rel_err(out, ref) < 2e-5
    for got, want in zip(vjp(dy), ref_vjp(dy)):
        assert got.shape == want.shape
        assert _rel_err(got, want) < 2e-5


@pytest.mark.parametrize("shape,m", [(case[0], tile_size(*case[0], jnp.float32)) for case in _CASES])
def test_cases_cover_every_choice(shape, m):
    assert m == {63: 4, 17: 2, 7: 0}[shape[1]]


def test_backend_choice_at_lowering():
    x, w = _operands((1, 64, 64, 64), 64)
    traced = jax.jit(jax.grad(lambda x, w: jnp.sum(conv3x3(x, w) ** 2), (0, 1))).trace(x, w)
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    gpu = traced.lower(lowering_platforms=("cuda",)).as_text()
    # CPU: forward and input gradient are Winograd products, the kernel gradient the wgrad kernel.
    assert cpu.count("stablehlo.convolution") == 0 and "resattn_wgrad3x3" in cpu
    # GPU: three convolutions (forward, input and kernel gradients), no Winograd products.
    assert gpu.count("stablehlo.convolution") == 3
    assert "dot_general" not in gpu


def test_bfloat16_uses_the_direct_convolution():
    x, w = _operands((1, 64, 64, 64), 4)
    text = jax.jit(conv3x3).lower(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).as_text()
    assert "stablehlo.convolution" in text and "dot_general" not in text


def test_flop_count_is_the_direct_convolution():
    x, w = _operands((1, 64, 64, 64), 8)
    direct = 64 * 64 * 8 * 9 * 64
    assert count_macs(conv3x3, x, w) == direct
    grad = jax.grad(lambda x, w: jnp.sum(conv3x3(x, w)), (0, 1))
    assert count_macs(grad, x, w) == 3 * direct


def test_module_keeps_nn_conv_parameter_layout():
    from flax import linen as nn

    x, _ = _operands((1, 8, 8, 3), 5)
    ours = Conv3x3(5).init(jax.random.key(0), x)
    theirs = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), use_bias=False).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
    y = Conv3x3(5).apply(theirs, x)
    ref = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), use_bias=False).apply(theirs, x)
    assert _rel_err(y, ref) < 2e-5


def test_second_order_gradient_matches_direct():
    x, w = _operands((4, 32, 32, 64), 4, seed=3)
    assert tile_size(*x.shape, x.dtype) == 4

    def grad_norm(conv):
        return lambda x, w: jnp.sum(jax.grad(lambda x: jnp.sum(conv(x, w) ** 2))(x) ** 2)

    got = jax.grad(grad_norm(conv3x3), 1)(x, w)
    want = jax.grad(grad_norm(conv3x3_direct), 1)(x, w)
    assert _rel_err(got, want) < 1e-4


@pytest.mark.parametrize("shape", [(3, 8, 8, 5), (2, 7, 9, 6)])
def test_strided_module_equals_nn_conv_with_gradients(shape):
    """Stride 2 (the stage transitions): the same parameters and initial values as ``nn.Conv``, the
    same outputs and gradients (its kernel gradient is the backend's: the wgrad kernel here)."""
    from flax import linen as nn

    x = jax.random.normal(jax.random.key(4), shape)
    from resattn_jax.ops import conv_init

    theirs = nn.Conv(32, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=conv_init)
    ours = Conv3x3(32, strides=2)
    variables = theirs.init(jax.random.key(0), x)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), ours.init(jax.random.key(0), x), variables)))
    loss = lambda module: lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))  # noqa: E731
    assert "resattn_wgrad3x3" in jax.jit(jax.grad(loss(ours))).lower(variables, x).as_text()
    assert _rel_err(ours.apply(variables, x), theirs.apply(variables, x)) < 1e-6
    got = jax.jit(jax.grad(loss(ours), (0, 1)))(variables, x)
    want = jax.grad(loss(theirs), (0, 1))(variables, x)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5), got, want)


# Fewer than 64 input channels and output channels a multiple of 8: the direct kernel on CPU.
@pytest.mark.parametrize("shape,out_channels", [((3, 8, 8, 16), 16), ((2, 5, 7, 3), 8), ((1, 1, 1, 4), 32),
                                                ((2, 6, 9, 20), 48), ((2, 4, 3, 8), 24)])
def test_direct_kernel_values_and_gradients_to_second_order(shape, out_channels):
    x, w = _operands(shape, out_channels, seed=5)
    assert "resattn_conv3x3" in jax.jit(conv3x3).lower(x, w).as_text()
    assert _rel_err(jax.jit(conv3x3)(x, w), conv3x3_direct(x, w)) < 1e-5

    def grad_norm(conv):
        g = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1))
        return lambda x, w: sum(jnp.sum(jnp.square(t)) for t in g(x, w))

    got = jax.jit(jax.grad(grad_norm(conv3x3), (0, 1)))(x, w)
    want = jax.grad(grad_norm(conv3x3_direct), (0, 1))(x, w)
    for a, b in zip(got, want):
        assert _rel_err(a, b) < 1e-4


def test_direct_kernel_only_where_it_applies():
    for shape, out_channels, dtype in [((2, 8, 8, 64), 16, jnp.float32), ((2, 8, 8, 16), 12, jnp.float32),
                                       ((2, 8, 8, 16), 16, jnp.bfloat16)]:
        x, w = _operands(shape, out_channels)
        assert "resattn_conv3x3" not in jax.jit(conv3x3).lower(x.astype(dtype), w.astype(dtype)).as_text()


def test_running_statistics_are_normalised_by_the_kernel():
    """A batch norm on stored statistics folded into a 3x3 layer: normalised as the kernel pads its
    input, the same as normalising first."""
    from flax import linen as nn

    from resattn_jax.ops import BatchNorm

    class Folded(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Conv3x3(16, name="conv")(BatchNorm(use_running_average=True, relu=True, name="bn")(x, fold=True))

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Conv3x3(16, name="conv")(BatchNorm(use_running_average=True, relu=True, name="bn")(x))

    x, _ = _operands((2, 6, 7, 16), 16, seed=6)
    variables = Plain().init(jax.random.key(0), x)
    variables = {"params": variables["params"], "batch_stats": {"bn": {"mean": 0.3 * x.mean((0, 1, 2)),
                                                                       "var": 0.5 + x.var((0, 1, 2))}}}
    assert "resattn_conv3x3" in jax.jit(Folded().apply).lower(variables, x).as_text()
    assert _rel_err(jax.jit(Folded().apply)(variables, x), Plain().apply(variables, x)) < 1e-5

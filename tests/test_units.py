"""Residual units: shapes, strides, shortcut rules, parameter layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from conftest import num_elements

from resattn_jax.models.units import InceptionResidual, PreActBottleneck, ResNeXtBottleneck
from resattn_jax.ops import Conv1x1

NORM = functools.partial(nn.BatchNorm, use_running_average=True)


@pytest.mark.parametrize("cls", [PreActBottleneck, ResNeXtBottleneck, InceptionResidual])
@pytest.mark.parametrize("c_in,c_out,stride,size", [(64, 64, 1, 8), (32, 64, 1, 8), (64, 128, 2, 8), (64, 128, 2, 7)])
def test_unit_shapes(cls, c_in, c_out, stride, size):
    unit = cls(c_out, NORM, strides=stride)
    x = jnp.ones((2, size, size, c_in))
    variables = unit.init(jax.random.key(0), x)
    assert unit.apply(variables, x).shape == (2, -(-size // stride), -(-size // stride), c_out)
    assert ("projection" in variables["params"]) == (stride != 1 or c_in != c_out)


def test_preact_bottleneck_parameter_count():
    # BN(C_in) + 1x1 + BN + 3x3 + BN + 1x1 (+ projection), docs/paper-facts.md §1.
    for c_in, c, proj in [(256, 256, False), (64, 256, True)]:
        b = c // 4
        expected = 2 * c_in + c_in * b + 2 * b + 9 * b * b + 2 * b + b * c + (c_in * c if proj else 0)
        params = PreActBottleneck(c, NORM).init(jax.random.key(0), jnp.ones((1, 8, 8, c_in)))["params"]
        assert num_elements(params) == expected


def test_preact_projection_reads_the_preactivated_input():
    unit = PreActBottleneck(16, NORM, strides=2)
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 8))
    variables = unit.init(jax.random.key(1), x)
    _, state = unit.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    pre = nn.relu(state["intermediates"]["bn1"]["__call__"][0])
    kernel = variables["params"]["projection"]["kernel"][0, 0]
    np.testing.assert_allclose(state["intermediates"]["projection"]["__call__"][0], pre[:, ::2, ::2] @ kernel,
                               atol=1e-5)


def test_resnext_uses_32_groups_of_4_at_256():
    params = ResNeXtBottleneck(256, NORM).init(jax.random.key(0), jnp.ones((1, 8, 8, 256)))["params"]
    assert params["conv2"]["kernel"].shape == (3, 3, 4, 128)


def test_conv1x1_matches_lax_convolution():
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 5))
    layer = Conv1x1(6, strides=2)
    variables = layer.init(jax.random.key(1), x)
    expected = jax.lax.conv_general_dilated(x, variables["params"]["kernel"], (2, 2), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(layer.apply(variables, x), expected, atol=1e-5)


@pytest.mark.parametrize("cls,last", [(PreActBottleneck, ("conv3", "kernel")), (ResNeXtBottleneck, ("bn3", "scale")),
                                      (InceptionResidual, ("expand", "kernel"))])
def test_zero_init_last_makes_the_unit_its_shortcut(cls, last):
    """Goyal et al.'s option: the residual branch starts at zero, so an identity unit is the identity."""
    from resattn_jax.ops import BatchNorm  # noqa: PLC0415 - the library's norm has scale_init

    norm = functools.partial(BatchNorm, use_running_average=True)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 64))
    plain = cls(64, norm).init(jax.random.key(1), x)
    unit = cls(64, norm, zero_init_last=True)
    variables = unit.init(jax.random.key(1), x)
    layer, leaf = last
    assert not np.any(variables["params"][layer][leaf]) and np.any(plain["params"][layer][leaf])
    expected = nn.relu(x) if cls is ResNeXtBottleneck else x  # post-activation: ReLU after the sum
    np.testing.assert_allclose(unit.apply(variables, x), expected, atol=1e-6)
    # Only that layer's initialisation changes.
    others = {k: v for k, v in variables["params"].items() if k != layer}
    jax.tree.map(np.testing.assert_array_equal, others, {k: v for k, v in plain["params"].items() if k != layer})

"""Attention activations (paper eq. 4-6), ARL vs NAL (eq. 3), the soft-mask topology."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from resattn_jax.models.attention import AttentionModule, SoftMaskBranch, attention_activation
from resattn_jax.models.units import PreActBottleneck

NORM = functools.partial(nn.BatchNorm, use_running_average=True, momentum=0.9, epsilon=1e-5)
UNIT = functools.partial(PreActBottleneck, norm=NORM)
X = jax.random.normal(jax.random.key(0), (2, 16, 16, 8)) * 3.0


def test_mixed_is_sigmoid_in_unit_interval():
    m = attention_activation(X, "mixed")
    np.testing.assert_allclose(m, jax.nn.sigmoid(X), atol=1e-6)
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0


def test_channel_has_unit_l2_norm_over_channels():
    m = attention_activation(X, "channel")
    np.testing.assert_allclose(jnp.linalg.norm(m, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(m * jnp.linalg.norm(X, axis=-1, keepdims=True), X, atol=1e-4)


def test_spatial_is_sigmoid_of_per_channel_standardised_map():
    m = attention_activation(X, "spatial")
    z = jnp.log(m) - jnp.log1p(-m)  # logit
    np.testing.assert_allclose(z.mean(axis=(1, 2)), 0.0, atol=1e-3)
    np.testing.assert_allclose(z.std(axis=(1, 2)), 1.0, atol=1e-3)
    expected = jax.nn.sigmoid((X - X.mean(axis=(1, 2), keepdims=True)) / X.std(axis=(1, 2), keepdims=True))
    np.testing.assert_allclose(m, expected, atol=1e-5)


def test_unknown_activation():
    with pytest.raises(ValueError, match="mixed"):
        attention_activation(X, "softmax")


@pytest.mark.parametrize("learning", ["arl", "nal"])
@pytest.mark.parametrize("activation", ["mixed", "channel", "spatial"])
def test_module_combines_trunk_and_mask_by_formula(learning, activation):
    # p = 0: the module output is exactly the combination of trunk and mask.
    module = AttentionModule(8, num_pools=2, unit=UNIT, norm=NORM, p=0, t=2, activation=activation,
                             learning=learning)
    variables = module.init(jax.random.key(1), X)
    out, state = module.apply(variables, X, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    trunk = inter["trunk1"]["__call__"][0]
    mask = inter["soft_mask"][0]
    expected = (1 + mask) * trunk if learning == "arl" else mask * trunk
    np.testing.assert_allclose(out, expected, atol=1e-5)
    logits = inter["mask_branch"]["__call__"][0]
    np.testing.assert_allclose(mask, attention_activation(logits, activation), atol=1e-6)


@pytest.mark.parametrize("pools,units", [(1, 2), (2, 5), (3, 8)])
def test_soft_mask_unit_counts_match_official_release(pools, units):
    branch = SoftMaskBranch(8, pools, UNIT, NORM)
    params = branch.init(jax.random.key(0), X)["params"]
    assert sum(name.startswith(("down", "skip", "up")) for name in params) == units


def test_soft_mask_adds_only_skip_branches():
    """Zeroing every skip unit's output path leaves the up-sampled lower level alone: with skip units
    whose last conv is zero and identity shortcut, the branch equals one without skip additions."""
    branch = SoftMaskBranch(8, 2, UNIT, NORM)
    variables = branch.init(jax.random.key(0), X)
    _, state = branch.apply(variables, X, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    down_lowest = inter["down1_1"]["__call__"][0]       # lowest level output, 4x4
    skip = inter["skip0"]["__call__"][0]                 # 8x8
    from resattn_jax.ops import upsample_bilinear
    up_input = upsample_bilinear(down_lowest, skip.shape[1:3]) + skip
    np.testing.assert_allclose(UNIT(8).apply({"params": variables["params"]["up1_0"],
                                              "batch_stats": variables["batch_stats"]["up1_0"]}, up_input),
                               inter["up1_0"]["__call__"][0], atol=1e-5)


def test_soft_mask_rejects_too_small_maps():
    branch = SoftMaskBranch(8, 3, UNIT, NORM)
    with pytest.raises(ValueError, match="too small"):
        branch.init(jax.random.key(0), jnp.zeros((1, 2, 2, 8)))

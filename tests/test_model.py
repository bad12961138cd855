"""The model zoo against the official release (docs/paper-facts.md §2-3) and the public API contract."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import zoo_counts
from flax import linen as nn

import resattn_jax
from resattn_jax import ops
from resattn_jax.models.attention import AttentionModule
from resattn_jax.models.network import ResidualAttentionNet

# Counted from the official Caffe prototxts (learnable parameters; BN running statistics separate;
# multiply-adds of convolutions and the classifier at 224x224): docs/paper-facts.md §2.
OFFICIAL = {"attention56": {"params": 31_810_728, "batch_stats": 72_704, "macs": 6_270_836_736},
            "attention92": {"params": 52_466_344, "batch_stats": 133_632, "macs": 10_533_789_696},
            "attentionnext56": {"params": 31_318_824, "macs": 6_419_106_816}}
# Paper: Attention-92 1.9M, Attention-236 5.1M, Attention-452 8.6M; pre-activation ResNet-164 1.7M.
CIFAR_PARAMS = {"cifar_attention92": (1.9e6, 0.10), "cifar_attention236": (5.1e6, 0.10),
                "cifar_attention452": (8.6e6, 0.20), "cifar_preact_resnet164": (1.7e6, 0.05)}


def abstract_variables(name, size, **overrides):
    model = resattn_jax.create_model(name, **overrides)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    return model, shapes


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_imagenet_networks_match_the_official_release_exactly(name):
    """Parameters, running statistics and multiply-adds (traced from the model), to the unit."""
    actual = zoo_counts(name, 224)
    assert {key: actual[key] for key in OFFICIAL[name]} == OFFICIAL[name]


def test_variables_are_params_and_batch_stats_only():
    _, variables = abstract_variables("tiny", 32)
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("name", sorted(CIFAR_PARAMS))
def test_cifar_parameter_counts_near_paper(name):
    target, tolerance = CIFAR_PARAMS[name]
    assert abs(zoo_counts(name, 32)["params"] / target - 1) < tolerance


@pytest.mark.parametrize("name", ["attention56", "attention92"])
def test_stage_outputs_nhwc_at_224(name):
    model = resattn_jax.create_model(name)
    logits, state = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros((2, 224, 224, 3)), mutable=["params", "batch_stats", "intermediates"]))
    inter = state["intermediates"]
    assert logits.shape == (2, 1000)
    assert inter["stage1"][0].shape == (2, 56, 56, 256)
    assert inter["stage2"][0].shape == (2, 28, 28, 512)
    assert inter["stage3"][0].shape == (2, 14, 14, 1024)
    assert inter["final"][0].shape == (2, 7, 7, 2048)
    # One sown soft mask per module, each the size of its trunk.
    masks = {k: v["soft_mask"][0].shape for k, v in inter.items() if "attention" in k}
    assert len(masks) == sum(model.modules_per_stage)
    assert masks["stage1_attention0"] == (2, 56, 56, 256)


@pytest.mark.parametrize("size", [256, 320, 225])
def test_any_allowed_input_size_traces(size):
    model, variables = abstract_variables("attention92", size)
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size, size, 3))), variables)
    assert logits.shape == (1, 1000)


@pytest.mark.slow
def test_attention92_runs_at_320():
    model = resattn_jax.create_model("attention92")
    images = jax.random.normal(jax.random.key(0), (1, 320, 320, 3))
    variables = jax.jit(lambda x: model.init(jax.random.key(1), x))(images)
    logits = jax.jit(lambda v, x: model.apply(v, x))(variables, images)
    assert logits.shape == (1, 1000) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("name", ["attentionnext56", "attentioninception56", "cifar_attention56"])
def test_other_variants_trace(name):
    size = 32 if name.startswith("cifar") else 224
    model, variables = abstract_variables(name, size)
    assert jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size, size, 3))), variables).shape[-1] == \
        model.num_classes


def test_train_mode_updates_batch_stats_and_eval_mode_mutates_nothing(tiny):
    model, variables, images = tiny
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"])
    assert all(jax.tree.leaves(changed))
    eval_logits = model.apply(variables, images, train=False)  # no mutable collections needed
    assert eval_logits.shape == (4, 10)
    # Train mode without a mutable batch_stats collection is Flax's error naming the first BatchNorm.
    with pytest.raises(flax.errors.ModifyScopeVariableError, match='"mean" in "/stage1_unit/bn1".*"batch_stats" '
                                                                   'is immutable'):
        model.apply(variables, images, train=True)


def test_whole_forward_jits_and_matches_eager(tiny):
    model, variables, images = tiny
    jitted = jax.jit(lambda v, x: model.apply(v, x, train=False))
    np.testing.assert_allclose(jitted(variables, images), model.apply(variables, images), atol=1e-4)


def test_bfloat16_compute_agrees_with_float32(tiny):
    model, variables, images = tiny
    bf16 = resattn_jax.create_model("tiny", dtype=jnp.bfloat16)
    assert jax.tree.map(lambda a: a.dtype, bf16.init(jax.random.key(0), images)) == \
        jax.tree.map(lambda a: a.dtype, variables)  # parameters stay float32
    for train in (False, True):
        ref = model.apply(variables, images, train=train, mutable=["batch_stats"])[0]
        low = bf16.apply(variables, images, train=train, mutable=["batch_stats"])[0]
        assert low.dtype == jnp.float32
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(low, ref, atol=0.05 * scale + 0.05)


def test_remat_changes_memory_not_results(tiny):
    model, variables, images = tiny
    remat = resattn_jax.create_model("tiny", remat=True)

    def loss(m):
        def f(params):
            logits, _ = m.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                                mutable=["batch_stats"])
            return jnp.mean(logits ** 2)
        return jax.jit(jax.value_and_grad(f))(variables["params"])

    (l1, g1), (l2, g2) = loss(model), loss(remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g1, g2)


def test_soft_masks_are_retrievable_and_in_unit_interval(tiny):
    model, variables, images = tiny
    _, state = model.apply(variables, images, mutable=["intermediates"])
    masks = [v["soft_mask"][0] for k, v in state["intermediates"].items() if "attention" in k]
    assert len(masks) == 3
    for mask in masks:
        assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0


def test_bn_axis_name_reaches_every_batchnorm():
    """``bn_axis_name`` is every BatchNorm's ``axis_name`` (which tests/test_batchnorm.py shows syncs
    the statistics and gradients over the devices exactly); ``None`` by default."""
    for axis_name in (None, "batch"):
        norms = called_modules("tiny", 32, (ops.BatchNorm,), bn_axis_name=axis_name)
        assert len(norms) > 20 and {m.axis_name for m in norms.values()} == {axis_name}


def test_flax_nnx_bridge(tiny):
    from flax import nnx
    from flax.nnx import bridge

    _, _, images = tiny
    backbone = bridge.ToNNX(resattn_jax.create_model("tiny", num_classes=5), rngs=nnx.Rngs(0))
    bridge.lazy_init(backbone, images, train=False)
    before = jax.tree.map(jnp.copy, nnx.state(backbone, nnx.BatchStat))
    assert backbone(images, train=False).shape == (4, 5)
    backbone(images, train=True, mutable=["batch_stats"])
    after = nnx.state(backbone, nnx.BatchStat)
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


@pytest.mark.parametrize("shape,match", [((32, 32, 3), "NHWC"), ((1, 32, 32, 1), "3 input channels"),
                                         ((1, 3, 32, 32), "3 input channels")])
def test_bad_input_shapes_raise_value_error(tiny, shape, match):
    model, variables, _ = tiny
    with pytest.raises(ValueError, match=match):
        model.apply(variables, jnp.zeros(shape))


def test_too_small_input_names_the_minimum():
    model = resattn_jax.create_model("attention56")
    with pytest.raises(ValueError, match="at least 17x17"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 17, 17, 3))))


def test_integer_images_are_rejected(tiny):
    model, variables, _ = tiny
    with pytest.raises(ValueError, match="floating"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3), jnp.uint8))


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="attention56.*tiny"):
        resattn_jax.create_model("resnet50")
    with pytest.raises(ValueError, match="unknown model option"):
        resattn_jax.create_model("tiny", widths=3)


@pytest.mark.parametrize("field,value", [("unit", "dense"), ("activation", "softmax"), ("learning", "xyz"),
                                         ("stem", "vit")])
def test_bad_config_values_raise_value_error(tiny, field, value):
    _, variables, images = tiny
    with pytest.raises(ValueError, match=value):
        resattn_jax.create_model("tiny", **{field: value}).init(jax.random.key(0), images)


def test_zoo_names():
    assert set(resattn_jax.list_models()) >= {
        "attention56", "attention92", "attentionnext56", "attentioninception56", "cifar_attention56",
        "cifar_attention92", "cifar_attention128", "cifar_attention164", "cifar_attention236",
        "cifar_attention452", "cifar_preact_resnet164", "tiny"}


# ------------------------------------------------------------------------------ network-level recipe
def called_modules(name: str, size: int, kinds: tuple[type, ...], **overrides) -> dict[str, nn.Module]:
    """Every module of ``kinds`` that network ``name`` calls in train mode, by path (traced abstractly)."""
    model, found = resattn_jax.create_model(name, **overrides), {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, kinds) and context.method_name == "__call__":
            found["/".join(context.module.scope.path)] = context.module
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=True))
    return found


# One network per unit kind (every zoo network binds its layers in ResidualAttentionNet).
@pytest.mark.parametrize("name,size", [("tiny", 32), ("attentionnext56", 32), ("attentioninception56", 32)])
def test_every_batchnorm_and_attention_module_follows_the_paper(name, size):
    modules = called_modules(name, size, (ops.BatchNorm, nn.BatchNorm, AttentionModule))
    norms = {path: m for path, m in modules.items() if not isinstance(m, AttentionModule)}
    attention = {path: m for path, m in modules.items() if isinstance(m, AttentionModule)}
    assert len(norms) > 20 and len(attention) == 3
    # docs/paper-facts.md §1: BatchNorm momentum 0.9, epsilon 1e-5.
    assert {(m.momentum, m.epsilon) for m in norms.values()} == {(0.9, 1e-5)}, norms
    # Attention residual learning, (1 + M) * T, is the default of every network (NAL is the ablation).
    assert {m.learning for m in attention.values()} == {"arl"}


def test_network_defaults_are_the_papers():
    defaults = ResidualAttentionNet()
    assert (defaults.learning, defaults.activation, defaults.p, defaults.t, defaults.r) == ("arl", "mixed", 1, 2, 1)


def test_arl_default_combines_as_one_plus_mask_times_trunk(tiny):
    """The default network's output is that of learning='arl' and differs from 'nal'."""
    model, variables, images = tiny
    out = {learning: resattn_jax.create_model("tiny", learning=learning).apply(variables, images)
           for learning in ("arl", "nal")}
    np.testing.assert_array_equal(model.apply(variables, images), out["arl"])
    assert float(jnp.max(jnp.abs(out["arl"] - out["nal"]))) > 1e-3


def test_convolutions_start_from_he_fan_out_normal(tiny):
    """Every convolution kernel ~ N(0, 2 / fan_out), fan_out = kh * kw * C_out (MSRA, as Caffe's
    ResNets): pooled over the tiny network's kernels, the standardised weights have std 1 +- 5 %."""
    _, variables, _ = tiny
    flat = flax.traverse_util.flatten_dict(variables["params"])
    kernels = [w for path, w in flat.items() if path[-1] == "kernel" and w.ndim == 4]
    assert len(kernels) > 20
    standardised = np.concatenate([np.ravel(w) / np.sqrt(2.0 / (w.shape[0] * w.shape[1] * w.shape[3]))
                                   for w in kernels])
    assert standardised.size > 20_000
    assert abs(np.mean(standardised)) < 0.03 and abs(np.std(standardised) - 1) < 0.05, np.std(standardised)
    # Normal, not truncated: 0.27 % of a normal sample lies beyond 3 standard deviations.
    assert 0.001 < np.mean(np.abs(standardised) > 3) < 0.006

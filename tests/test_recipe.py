"""Beyond the paper's recipe: mixup / CutMix / Cutout / label smoothing, the cosine schedule,
gradient accumulation, EMA of the weights, fine-tuning from another run, profiling.

The training runs share one tiny configuration (the persistent compilation cache of conftest.py
compiles its step once) and run a few steps each.
"""

import contextlib
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_train
from conftest import digits_config
from scipy import stats
from tiny_config import SMALL

from resattn_jax.training import data, finetune, mixing, parallel
from resattn_jax.training import workdir as workdir_lib
from resattn_jax.training import loop as train_lib
from resattn_jax.training.optim import create_optimizer, default_optimizer_config, learning_rate_schedule

RECIPE = {"label_smoothing": 0.1, "mix.mixup_alpha": 0.4, "mix.cutmix_alpha": 1.0, "mix.cutout": 8,
          "ema_decay": 0.5, "best_by": "ema"}


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def read_state(workdir, step):
    return test_train.read_state(str(workdir), step)


# ------------------------------------------------------------------------------------ mixing, on device
def draws(cfg, steps, images, labels):
    fn = jax.jit(jax.vmap(lambda s: mixing.augment_batch(cfg, s, images, labels, 10), in_axes=0))
    return fn(jnp.arange(steps))


def test_mixup_targets_sum_to_one_and_lam_follows_its_beta_distribution():
    images = jax.random.normal(jax.random.key(0), (8, 6, 6, 1))
    labels = jnp.arange(8) % 10
    cfg = mixing.MixConfig(mixup_alpha=0.4, label_smoothing=0.1, seed=3)
    mixed, targets, lam = draws(cfg, 2000, images, labels)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    assert stats.kstest(np.asarray(lam), stats.beta(0.4, 0.4).cdf).pvalue > 0.01
    # Each image is lam * itself + (1 - lam) * its partner (the batch reversed); targets likewise.
    np.testing.assert_allclose(mixed[5], lam[5] * images + (1 - lam[5]) * images[::-1], rtol=1e-5, atol=1e-6)
    smooth = mixing.soft_targets(labels, 10, 0.1)
    np.testing.assert_allclose(targets[5], lam[5] * smooth + (1 - lam[5]) * smooth[::-1], rtol=1e-5, atol=1e-7)
    # The same step draws the same; another seed draws otherwise.
    again = draws(cfg, 3, images, labels)[2]
    np.testing.assert_array_equal(again, lam[:3])
    other = draws(mixing.MixConfig(mixup_alpha=0.4, seed=4), 3, images, labels)[2]
    assert not np.array_equal(other, lam[:3])


def test_cutmix_pastes_a_box_and_weights_labels_by_its_area():
    images = jnp.broadcast_to(jnp.arange(8.0)[:, None, None, None], (8, 16, 16, 1))  # image i is all i
    labels = jnp.arange(8)
    cfg = mixing.MixConfig(cutmix_alpha=1.0, seed=1)
    mixed, targets, lam = draws(cfg, 500, images, labels)
    own = np.mean(np.asarray(mixed[:, 0]) == 0.0, axis=(1, 2, 3))  # image 0's own pixels (its partner is 7)
    np.testing.assert_allclose(own, lam, atol=1e-6)
    np.testing.assert_allclose(targets[:, 0, 0], lam, atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    # The box's area is 1 - Beta(1, 1) before clipping at the border: the weight kept is above 1/2.
    assert 0.55 < float(lam.mean()) < 0.8 and float(lam.min()) < 0.5


def test_mixing_probability_and_switch():
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    labels = jnp.arange(4)
    _, _, lam = draws(mixing.MixConfig(mixup_alpha=1.0, prob=0.3, seed=0), 2000, images, labels)
    assert abs(float(jnp.mean(lam == 1.0)) - 0.7) < 0.04
    _, _, lam = draws(mixing.MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=1.0, seed=0), 200,
                      images, labels)
    assert set(np.round(np.asarray(lam) * 64).astype(int).tolist()) <= set(range(65))  # box areas only


def test_cutout_zeroes_one_square_per_image():
    images = jnp.ones((64, 12, 12, 3))
    out, targets, lam = mixing.augment_batch(mixing.MixConfig(cutout=4, seed=0), jnp.asarray(7), images,
                                             jnp.zeros(64, jnp.int32), 10)
    zeroed = np.asarray(jnp.sum(out == 0, axis=(1, 2)))[:, 0]
    assert zeroed.max() == 16 and zeroed.min() >= 4  # 4x4, clipped by the border to at least 2x2
    assert np.all(np.asarray(out)[..., 0] == np.asarray(out)[..., 2])  # the same square in every channel
    np.testing.assert_array_equal(targets, jax.nn.one_hot(jnp.zeros(64, jnp.int32), 10))
    assert float(lam) == 1.0


def test_cosine_schedule_warms_up_then_decays_to_zero():
    cfg = default_optimizer_config()
    cfg.schedule, cfg.warmup_steps, cfg.learning_rate = "cosine", 10, 0.2
    schedule = learning_rate_schedule(cfg, 64, 110)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.1)
    assert float(schedule(10)) == pytest.approx(0.2)
    assert float(schedule(60)) == pytest.approx(0.1, rel=1e-5)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- gradient accumulation
def test_accumulating_four_micro_batches_equals_one_batch_of_four_times_the_size():
    """BatchNorm on its stored statistics (as a BN-free network): then K x B/K is one step of B."""
    config = digits_config(4, parallel="jit")
    config.model.update(SMALL)
    info = data.dataset_info(config.data)
    mesh = parallel.make_mesh()
    optimizer, schedule = create_optimizer(config.optimizer, 32, 4)
    batch = parallel.shard_batch(next(data.train_batches(config.data, 32, seed=0)), mesh)
    params = {}
    for accumulate, mode in ((1, "jit"), (4, "jit"), (4, "pmap")):
        config.parallel = mode
        model = train_lib.build_model(config, info)
        state = train_lib.create_train_state(model, optimizer, info.image_shape, 0, mesh)
        initial = leaves(state.params)  # (the step donates the state)
        options = train_lib.StepOptions(info.num_classes, grad_accum_steps=accumulate, train_batch_norm=False)
        step = parallel.compile_step(train_lib.make_train_step(schedule, parallel.AXIS if mode == "pmap" else None,
                                                               options), mode, mesh)
        new, metrics = step(state, batch)
        params[accumulate, mode] = leaves(new.params)
        assert np.isfinite(float(metrics["loss"]))
    for key in ((4, "jit"), (4, "pmap")):
        for got, want in zip(params[key], params[1, "jit"]):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    changed = [not np.array_equal(a, b) for a, b in zip(params[1, "jit"], initial)]
    assert sum(changed) > len(changed) // 2  # the step moved the weights


# ------------------------------------------------------------------- EMA, exact resume, profile (one run)
@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """4 steps with every regulariser, EMA and a profile of step 2; a checkpoint every step."""
    workdir = tmp_path_factory.mktemp("recipe")
    config = digits_config(4, checkpoint_every_steps=1, keep_checkpoints=10, profile_steps=(2, 1), **RECIPE)
    console = io.StringIO()
    with contextlib.redirect_stderr(console):
        summary = train_lib.train_and_evaluate(config, str(workdir))
    return workdir, summary, console.getvalue()


def test_ema_is_the_closed_form_average_of_the_weight_history(recipe_run):
    workdir, summary, _ = recipe_run
    history = [read_state(workdir, step) for step in range(1, 5)]
    decay = RECIPE["ema_decay"]
    initial = history[0]["ema_params"]  # after step 1: decay * p0 + (1 - decay) * p1
    p1 = history[0]["params"]
    p0 = jax.tree.map(lambda e, p: (e - (1 - decay) * p) / decay, initial, p1)
    expected = jax.tree.map(lambda p: decay**4 * p, p0)
    for i, state in enumerate(history, start=1):
        expected = jax.tree.map(lambda e, p, w=(1 - decay) * decay ** (4 - i): e + w * p, expected, state["params"])
    for got, want in zip(leaves(history[-1]["ema_params"]), leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert summary["weights"] == "ema" and 0 <= summary["test_ema_accuracy"] <= 1
    assert summary["test_accuracy"] == summary["test_ema_accuracy"]
    ema = train_lib.load_trained(str(workdir), "ema")
    best = read_state(workdir, summary["best_step"])
    for got, want in zip(leaves(ema.variables["params"]), leaves(best["ema_params"])):
        np.testing.assert_array_equal(got, want)


def test_resume_reproduces_the_mixed_batches_exactly(recipe_run, tmp_path):
    workdir, _, _ = recipe_run
    resumed = tmp_path / "resumed"
    config = digits_config(2, checkpoint_every_steps=1, keep_checkpoints=10, **RECIPE)
    with contextlib.redirect_stderr(io.StringIO()):
        train_lib.train_and_evaluate(config, str(resumed))
        config.num_train_steps = 4  # a resume may lengthen the run
        train_lib.train_and_evaluate(config, str(resumed))
    straight, again = read_state(workdir, 4), read_state(resumed, 4)
    for key in ("params", "batch_stats", "ema_params", "opt_state"):
        for got, want in zip(leaves(again[key]), leaves(straight[key])):
            np.testing.assert_array_equal(got, want)


def test_profile_trace_of_the_requested_steps(recipe_run):
    workdir, _, console = recipe_run
    traces = [os.path.join(root, name) for root, _, names in os.walk(workdir / "tensorboard" / "plugins" / "profile")
              for name in names if name.endswith(".xplane.pb")]
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0  # one trace: step 2 only
    assert "profiled steps 2-2" in console


# ------------------------------------------------------------------------------------------ fine-tuning
@pytest.fixture(scope="module")
def five_digits(tmp_path_factory):
    """Digits 0-4 as an image folder (train / validation / test): a 5-class task."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("five_digits")
    cfg = data.data_preset("digits")
    mean, std = data.normalisation(cfg)
    for split in ("train", "validation", "test"):
        cfg.test_split = split  # read each split whole and in order, as evaluation does
        batch = next(data.eval_batches(cfg, "test", 2000))
        images = np.round(batch["image"][batch["mask"]] * std + mean).clip(0, 255).astype(np.uint8)
        for i, (image, label) in enumerate(zip(images, batch["label"][batch["mask"]])):
            if label < 5:
                path = root / split / str(label) / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                tf.io.write_file(str(path), tf.io.encode_png(image))
    return str(root)


def finetune_config(root, steps, **overrides):
    config = digits_config(steps, **overrides)
    config.data = data.data_preset(f"folder:{root}")
    return config


def test_finetune_reinitialises_the_head_and_keeps_a_frozen_backbone(recipe_run, five_digits, tmp_path):
    source, _, _ = recipe_run
    source_state = train_lib.load_trained(str(source), "best")
    console = io.StringIO()
    with contextlib.redirect_stderr(console):
        summary = train_lib.train_and_evaluate(
            finetune_config(five_digits, 3, init_from=str(source), freeze="backbone"), str(tmp_path / "frozen"))
    assert "classifier (classifier/bias, classifier/kernel) re-initialised for 5 classes (the source has 10)" \
        in console.getvalue()
    tuned = read_state(tmp_path / "frozen", 3)
    for collection in ("params", "batch_stats"):
        source_tree = dict(source_state.variables[collection])
        tuned_tree = dict(tuned[collection])
        source_head, tuned_head = source_tree.pop("classifier", None), tuned_tree.pop("classifier", None)
        for got, want in zip(leaves(tuned_tree), leaves(source_tree)):
            np.testing.assert_array_equal(got, want)  # the backbone, bit for bit
        if collection == "params":
            assert tuned_head["kernel"].shape[-1] == 5 and source_head["kernel"].shape[-1] == 10
    assert summary["test_examples"] == len([1 for _, _, files in os.walk(os.path.join(five_digits, "test"))
                                            for _ in files])


def test_finetune_starts_from_the_source_weights_and_rejects_other_architectures(recipe_run, five_digits):
    source, _, _ = recipe_run
    config = finetune_config(five_digits, 3, init_from=str(source))
    info = data.dataset_info(config.data)
    mesh = parallel.make_mesh()
    optimizer, _ = create_optimizer(config.optimizer, 16, 3)
    state = train_lib.create_train_state(train_lib.build_model(config, info), optimizer, info.image_shape, 1, mesh)
    with contextlib.redirect_stderr(io.StringIO()):
        started = train_lib._init_from(state, str(source / "checkpoints" / "2"), mesh, True)
    source_state = read_state(source, 2)
    assert int(started.step) == 0
    for name in source_state["params"]:
        if name != "classifier":
            for got, want in zip(leaves(started.params[name]), leaves(source_state["params"][name])):
                np.testing.assert_array_equal(got, want)
    for got, want in zip(leaves(started.params["classifier"]), leaves(state.params["classifier"])):
        np.testing.assert_array_equal(got, want)  # the 5-class head: its own initialisation

    config.model.update(SMALL)  # another architecture
    other = train_lib.create_train_state(train_lib.build_model(config, info), optimizer, info.image_shape, 1, mesh)
    with pytest.raises(ValueError, match=r"--config.init_from: parameter \S+ (has shape|is not in)"):
        train_lib._init_from(other, str(source), mesh, True)


@pytest.mark.parametrize("overrides,match", [
    ({"grad_accum_steps": 3}, r"--config.grad_accum_steps=3: global_batch_size=16 must divide into 3 micro-batches"),
    ({"grad_accum_steps": 0}, r"--config.grad_accum_steps=0: must be >= 1"),
    ({"ema_decay": 1.0}, r"--config.ema_decay=1.0: must be in \[0, 1\)"),
    ({"best_by": "ema"}, r"--config.best_by='ema' needs --config.ema_decay > 0"),
    ({"freeze": "backbone"}, r"--config.freeze='backbone' needs --config.init_from"),
    ({"freeze": "head"}, r"--config.freeze='head': choose one of"),
    ({"init_from": "/no/such/run"}, r"--config.init_from=/no/such/run: not a run's workdir"),
    ({"profile_steps": (5, 3)}, r"--config.profile_steps='\(5, 3\)': must be"),
    ({"label_smoothing": 1.0}, r"--config.label_smoothing=1.0: must be in \[0, 1\)"),
    ({"mix.prob": 1.5}, r"--config.mix.prob=1.5: must be in \[0, 1\]"),
    ({"mix.mixup_alpha": -1.0}, r"--config.mix.mixup_alpha=-1.0: must be >= 0"),
    ({"optimizer.schedule": "linear"}, r"--config.optimizer.schedule=linear: choose one of \('piecewise', 'cosine'\)"),
])
def test_recipe_fields_are_checked_before_anything_is_written(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        train_lib.train_and_evaluate(digits_config(6, **overrides), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_cosine_run_keeps_its_length_on_resume():
    """The cosine schedule reaches 0 at num_train_steps: lengthening it is a change, not a resume."""
    for schedule, fixed in (("cosine", True), ("piecewise", False)):
        stored = json.loads(digits_config(6, **{"optimizer.schedule": schedule}).to_json_best_effort())
        longer = digits_config(8, **{"optimizer.schedule": schedule})
        changed, allowed = workdir_lib.config_changes(stored, longer)
        assert (changed, allowed) == ((["num_train_steps: 6 -> 8"], []) if fixed else ([], ["num_train_steps: 6 -> 8"]))
        same = workdir_lib.config_fingerprint(stored) == workdir_lib.config_fingerprint(longer)
        assert same != fixed


def test_finetune_source_paths():
    with pytest.raises(ValueError, match="not a run's workdir"):
        finetune.resolve_source("/")


def test_modern_config_resolves():
    from configs import cifar_modern

    config = cifar_modern.get_config("cifar100,attention56")
    assert (config.optimizer.schedule, config.mix.cutout, config.best_by) == ("cosine", 8, "ema")
    train_lib._check_recipe_config(config, 1)
    assert json.loads(config.to_json())["label_smoothing"] == 0.1

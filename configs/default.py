"""Base configuration: the paper's CIFAR-10 recipe for Attention-56 (docs/paper-facts.md §4).

Every experiment config derives from this one; any field can be overridden on the command line,
e.g. ``--config.global_batch_size=128 --config.model.remat=True``.
"""

import ml_collections

from resattn_jax.training import mixing, optim
from resattn_jax.training.data import data_preset


def get_config():
    config = ml_collections.ConfigDict()

    # Network: a zoo name plus overrides of its ResidualAttentionNet fields.
    config.model = ml_collections.ConfigDict({"name": "cifar_attention56", "activation": "mixed",
                                              "learning": "arl", "remat": False,
                                              # Goyal et al.'s zero-initialised last layer of each
                                              # residual branch (not in the paper; README "GPU and TPU").
                                              "zero_init_residual": False})

    # Data through tensorflow-datasets. The validation split is held out from the training data and
    # selects the best checkpoint; the test split is only reported.
    config.data = data_preset("cifar10")  # train[5000:] / train[:5000] / test, pad-4 crop + flip

    # Optimisation: SGD, Nesterov momentum 0.9, L2 1e-4 on kernels, batch 64,
    # lr 0.1 divided by 10 at 64k and 96k iterations, 160k iterations.
    config.global_batch_size = 64
    config.eval_batch_size = 256
    config.num_train_steps = 160_000
    config.optimizer = optim.default_optimizer_config()

    # Beyond the paper (all off: README "Fine-tuning and the modern recipe"; configs/cifar_modern.py).
    config.label_smoothing = 0.0  # targets (1 - eps) * onehot + eps / classes
    config.mix = mixing.default_mix_config()  # mixup / CutMix / Cutout on the device, by seed and step
    config.grad_accum_steps = 1  # > 1: the global batch in this many micro-batches (BatchNorm per micro-batch)
    config.ema_decay = 0.0       # > 0: an exponential moving average of the weights, evaluated and saved too
    config.best_by = "model"     # 'ema': the best checkpoint (and the test) by the EMA weights' accuracy
    config.init_from = ""        # a run's workdir (its best checkpoint) or WORKDIR/checkpoints/STEP
    config.freeze = ""           # 'backbone': train only the classifier (init_from required)
    config.profile_steps = ()    # (start, count): a jax.profiler trace of those steps in WORKDIR/tensorboard

    # System.
    config.seed = 0
    config.parallel = "jit"     # 'jit' (sharded global step) or 'pmap' (per-device step, BN synced)
    config.dtype = "float32"    # compute dtype; 'bfloat16' keeps float32 parameters
    config.nan_policy = "stop"  # 'stop' at a non-finite loss/gradient, or 'skip' the update and count it
    config.max_skipped_fraction = 0.1  # with 'skip': stop (status 3) once more of the steps were skipped
    config.allow_config_change = False  # resume even if fields other than lengths/intervals changed

    # Logging, evaluation, checkpoints (in iterations).
    config.log_every_steps = 100
    config.eval_every_steps = 2_000
    config.checkpoint_every_steps = 2_000
    config.keep_checkpoints = 3  # the latest few, plus the best by validation accuracy
    config.progress_bar = True
    return config

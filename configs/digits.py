"""Offline default: a small attention network on scikit-learn's handwritten digits.

The data (1,797 real 8x8 scans, up-sampled to 32x32 grey images; fixed 1,257 / 180 / 360
train / validation / test splits) ships inside scikit-learn, so this runs without internet:

    python train.py --config configs/digits.py --workdir /tmp/digits

A CIFAR-layout Attention-56 at half width trains to >= 95 % test accuracy in a few minutes on
2 CPU cores.
"""

from configs import default
from resattn_jax.training.data import data_preset


def get_config():
    config = default.get_config()
    config.model.name = "cifar_attention56"
    config.model.stem_width = 16
    config.model.stage_widths = (32, 64, 128)
    config.model.final_width = 128

    config.data = data_preset("digits")  # 2-pixel padding, no flips (a mirrored digit is another symbol)

    config.global_batch_size = 64
    config.eval_batch_size = 128
    config.num_train_steps = 400  # about 20 epochs
    config.optimizer.learning_rate = 0.05
    config.optimizer.boundaries = (260, 340)
    config.optimizer.warmup_steps = 50
    config.log_every_steps = 20
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    return config

"""Paper Table 1: soft-mask activation type, CIFAR-10, Attention-56.

    python train.py --config configs/attention_type.py:spatial --workdir runs/a56_spatial

Argument: ``mixed`` (eq. 4), ``channel`` (eq. 5) or ``spatial`` (eq. 6).
Paper error (%): mixed 5.52, channel 6.24, spatial 6.33.
"""

from configs import cifar, default


def get_config(arg: str = "mixed"):
    config = default.get_config()
    config.model.activation = cifar.parse(arg, ("mixed", "channel", "spatial"), "attention activation")
    return config

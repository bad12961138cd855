"""Paper Table 4: robustness to label noise, CIFAR-10, Attention-92 vs pre-activation ResNet-164.

    python train.py --config configs/label_noise.py:attention92,0.3 --workdir runs/noise30

Argument ``NETWORK,NOISE``: ``attention92`` or ``resnet164``; noise 0.1, 0.3, 0.5 or 0.7 (the
fraction of training labels corrupted through the confusion matrix; clean-label ratio
r = 1 - noise). Validation and test labels stay clean.
Paper error (%): ResNet-164 5.93 / 6.61 / 8.35 / 17.21; Attention-92 5.15 / 5.79 / 7.27 / 15.75.
"""

from configs import cifar, default

NETWORKS = {"attention92": "cifar_attention92", "resnet164": "cifar_preact_resnet164"}


def get_config(arg: str = "attention92,0.1"):
    network, noise = (arg.split(",") + [""])[:2]
    config = default.get_config()
    config.model.name = NETWORKS[cifar.parse(network, tuple(NETWORKS), "network")]
    config.data.label_noise = float(cifar.parse(noise, ("0.1", "0.3", "0.5", "0.7"), "noise level"))
    config.data.label_noise_seed = 0
    return config

"""Paper Table 2: attention residual learning vs naive attention learning, CIFAR-10.

    python train.py --config configs/arl_vs_nal.py:nal,attention164 --workdir runs/nal164

Argument ``LEARNING,NETWORK``: ``arl`` or ``nal``; ``attention56``, ``attention92``,
``attention128`` or ``attention164``.
Paper error (%): ARL 5.52 / 4.99 / 4.44 / 4.31; NAL 5.89 / 5.35 / 5.57 / 7.18.
"""

from configs import cifar, default


def get_config(arg: str = "arl,attention56"):
    learning, network = (arg.split(",") + [""])[:2]
    config = default.get_config()
    config.model.learning = cifar.parse(learning, ("arl", "nal"), "attention learning")
    config.model.name = "cifar_" + cifar.parse(network, cifar.NETWORKS[:4], "network")
    return config

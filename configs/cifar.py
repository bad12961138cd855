"""Paper Table 5-6 rows: CIFAR-10/100 with Attention-56/92/128/164/236/452.

    python train.py --config configs/cifar.py:cifar10,attention92 --workdir runs/c10_a92

Argument ``DATASET,NETWORK``: ``cifar10`` or ``cifar100``; ``attention56``, ``attention92``,
``attention128``, ``attention164``, ``attention236``, ``attention452``.
Paper error (%): Attention-92 4.99 / 21.71, Attention-236 4.14 / 21.16, Attention-452 3.90 / 20.45.
"""

from configs import default
from resattn_jax.training.data import data_preset

NETWORKS = ("attention56", "attention92", "attention128", "attention164", "attention236", "attention452")


def parse(arg, choices, what):
    if arg not in choices:
        raise ValueError(f"unknown {what} {arg!r}; choose one of {', '.join(choices)}")
    return arg


def get_config(arg: str = "cifar10,attention56"):
    dataset, network = (arg.split(",") + [""])[:2]
    config = default.get_config()
    config.data = data_preset(parse(dataset, ("cifar10", "cifar100"), "dataset"))
    config.model.name = "cifar_" + parse(network, NETWORKS, "network")
    return config

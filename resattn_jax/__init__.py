"""resattn_jax: the Residual Attention Network (Wang et al., CVPR 2017) in JAX/Flax.

Layers (each imports only the ones before it; docs/architecture.md):

* :mod:`resattn_jax.ops` — convolution, batch norm, pooling, up-sampling; backend choices inside.
* :mod:`resattn_jax.models` — the paper's units, attention module, network and model zoo.
* :mod:`resattn_jax.training` — data, optimiser, parallelism, checkpoints, metrics, the loop.
* :mod:`resattn_jax.tools` — train CLI, bench, FLOPs, inference, visualize, analyze, export.
"""

import importlib

from resattn_jax.models import (AttentionModule, InceptionResidual, MODELS, PreActBottleneck, ResNeXtBottleneck,
                                ResidualAttentionNet, SoftMaskBranch, attention_activation, create_model,
                                list_models)
from resattn_jax.ops import max_pool_3x3s2, upsample_bilinear

__version__ = "0.1.0"

__all__ = [
    "AttentionModule",
    "InceptionResidual",
    "MODELS",
    "PreActBottleneck",
    "ResNeXtBottleneck",
    "ResidualAttentionNet",
    "SoftMaskBranch",
    "attention_activation",
    "create_model",
    "list_models",
    "max_pool_3x3s2",
    "upsample_bilinear",
]

#: Module names of the flat layout before the layers, as ``from resattn_jax import NAME`` (loaded on
#: first use, so ``import resattn_jax`` stays light).
_MOVED = {
    "units": "resattn_jax.models.units", "attention": "resattn_jax.models.attention",
    "model": "resattn_jax.models.network", "zoo": "resattn_jax.models.zoo", "batchnorm": "resattn_jax.ops.batchnorm",
    "data": "resattn_jax.training.data", "optim": "resattn_jax.training.optim",
    "parallel": "resattn_jax.training.parallel", "checkpoint": "resattn_jax.training.checkpoint",
    "metrics": "resattn_jax.training.metrics", "train_lib": "resattn_jax.training.loop",
    "inference": "resattn_jax.tools.inference", "flops": "resattn_jax.tools.flops",
    "figures": "resattn_jax.tools.figures",
}


def __getattr__(name: str):
    if name in _MOVED:
        return importlib.import_module(_MOVED[name])
    raise AttributeError(f"module 'resattn_jax' has no attribute {name!r}")

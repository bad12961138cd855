"""resattn_jax: the Residual Attention Network (Wang et al., CVPR 2017) in JAX/Flax."""

from resattn_jax.attention import AttentionModule, SoftMaskBranch, attention_activation
from resattn_jax.model import ResidualAttentionNet
from resattn_jax.resample import max_pool_3x3s2, upsample_bilinear
from resattn_jax.units import InceptionResidual, PreActBottleneck, ResNeXtBottleneck
from resattn_jax.zoo import MODELS, create_model, list_models

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

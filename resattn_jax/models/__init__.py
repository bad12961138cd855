"""The paper's networks: residual units, the attention module, the network and the model zoo.

Plain Flax (Linen) modules that read like the paper; every numerical layer comes from
:mod:`resattn_jax.ops`, which makes any backend-specific choice itself.
"""

from resattn_jax.models.attention import ACTIVATIONS, LEARNING, AttentionModule, SoftMaskBranch, attention_activation
from resattn_jax.models.network import ResidualAttentionNet
from resattn_jax.models.units import UNITS, InceptionResidual, PreActBottleneck, ResNeXtBottleneck
from resattn_jax.models.zoo import MODELS, create_model, list_models

__all__ = ["ACTIVATIONS", "LEARNING", "MODELS", "UNITS", "AttentionModule", "InceptionResidual", "PreActBottleneck",
           "ResNeXtBottleneck", "ResidualAttentionNet", "SoftMaskBranch", "attention_activation", "create_model",
           "list_models"]

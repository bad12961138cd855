"""Alias of :mod:`resattn_jax.tools.visualize` (``python -m resattn_jax.visualize``)."""
from resattn_jax._alias import alias

alias(__name__, "resattn_jax.tools.visualize")

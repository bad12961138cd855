"""Alias of :mod:`resattn_jax.tools.evaluate` (``python -m resattn_jax.evaluate``)."""
from resattn_jax._alias import alias

alias(__name__, "resattn_jax.tools.evaluate")

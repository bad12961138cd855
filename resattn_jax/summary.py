"""Alias of :mod:`resattn_jax.tools.summary` (``python -m resattn_jax.summary``)."""
from resattn_jax._alias import alias

alias(__name__, "resattn_jax.tools.summary")

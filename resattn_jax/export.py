"""Alias of :mod:`resattn_jax.tools.export` (``python -m resattn_jax.export``)."""
from resattn_jax._alias import alias

alias(__name__, "resattn_jax.tools.export")

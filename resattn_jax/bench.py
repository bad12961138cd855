"""Alias of :mod:`resattn_jax.tools.bench` (``python -m resattn_jax.bench``)."""
from resattn_jax._alias import alias

alias(__name__, "resattn_jax.tools.bench")

"""Alias of :mod:`resattn_jax.tools.analyze` (``python -m resattn_jax.analyze``)."""
from resattn_jax._alias import alias

alias(__name__, "resattn_jax.tools.analyze")

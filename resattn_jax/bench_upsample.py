"""Alias of :mod:`resattn_jax.tools.bench_upsample` (``python -m resattn_jax.bench_upsample``)."""
from resattn_jax._alias import alias

alias(__name__, "resattn_jax.tools.bench_upsample")

"""``python -m resattn_jax.checkpoint verify WORKDIR`` runs :mod:`resattn_jax.tools.checkpoint`;
``import resattn_jax.checkpoint`` is :mod:`resattn_jax.training.checkpoint`, as before the layers."""
import sys

from resattn_jax._alias import alias

if __name__ == "__main__":
    from resattn_jax.tools.checkpoint import main

    sys.exit(main())
alias(__name__, "resattn_jax.training.checkpoint")

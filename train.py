"""Train a Residual Attention Network: ``python train.py --config configs/digits.py --workdir /tmp/digits``.

The CLI lives in :mod:`resattn_jax.tools.train` (also installed as ``resattn-train``); see its
docstring for the flags and exit statuses.
"""

from resattn_jax.tools.train import run

if __name__ == "__main__":
    run()

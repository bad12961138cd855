"""Short module paths: ``python -m resattn_jax.bench`` (and ``bench_upsample``, ``evaluate``, ``summary``,
``visualize``, ``analyze``, ``export``) and ``import resattn_jax.export`` run or return the module under ``tools/``."""

from __future__ import annotations

import importlib
import sys


def alias(name: str, target: str) -> None:
    """Make module ``name`` the module ``target``: run its ``main()`` when ``name`` is ``__main__``
    (``python -m``), else replace ``name`` in ``sys.modules`` by ``target`` (one module object)."""
    module = importlib.import_module(target)
    if name == "__main__":
        sys.exit(module.main())
    sys.modules[name] = module

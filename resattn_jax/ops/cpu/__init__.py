"""CPU-only kernels: Winograd 3x3 convolutions, OpenBLAS and batch-norm-sum custom calls (C++ in
``csrc/``, built at install), host-memory and XLA:CPU compiler settings. Used only through
:mod:`resattn_jax.ops.backend`."""

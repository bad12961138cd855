"""What a CPU run sets outside the traced program: glibc's allocator and XLA:CPU's compiler options.

Both are applied by :mod:`resattn_jax.ops.backend` only when the run's devices are CPUs.
"""

from __future__ import annotations

import ctypes
from typing import Any

__all__ = ["COMPILER_OPTIONS", "STEP_COMPILER_OPTIONS", "retain_host_memory"]

#: XLA:CPU options applied to every step this library compiles. The default YNNPACK path runs
#: convolutions (forward and both gradients) at about half the speed of XLA's Eigen path on 3x3
#: windows and on the 56x56 maps; routing only reduce fusions to YNNPACK sends convolutions and
#: matrix products back to Eigen (docs/benchmarks.md).
COMPILER_OPTIONS: dict[str, Any] = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}

#: Per step kind, XLA:CPU options that replace those of :data:`COMPILER_OPTIONS`. A training step
#: also gives its matrix products to YNNPACK: its backward pass's products (transposed operands,
#: Winograd-sized batches) run faster there, 3-6 % of the step measured side by side, while the
#: forward-only evaluation step runs 3-5 % faster on Eigen's (docs/benchmarks.md).
STEP_COMPILER_OPTIONS: dict[str, dict[str, Any]] = {
    "train": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "eval": {},
}


def retain_host_memory() -> bool:
    """Have glibc keep freed host memory for reuse instead of returning it to the OS.

    XLA:CPU allocates each step's temporaries afresh; glibc serves large blocks with ``mmap`` and
    unmaps them on free, so every step re-faults its whole working set (470,000 page faults per
    Attention-56 train step at batch 8, about 12 % of its time). With one malloc arena, no
    ``mmap`` for large blocks and no trimming, the second step onwards reuses the same pages.
    "No trimming" is a threshold of ``-1``, which glibc stores as the largest ``size_t``: the
    largest ``int`` (2 GiB) is not enough, since a step whose temporaries exceed it (3.1 GB for
    cifar_attention92 at batch 128) frees them into a top chunk above the threshold, which glibc
    then hands back to the OS, and the next step faults in every page again (772,000 faults and
    1.1 s of system time per step, docs/benchmarks.md).
    The price: the process keeps its peak host memory, and threads share one arena, which
    fragments (the default digits run peaks at 5.0 GB instead of 2.2 GB) and makes threads take
    turns (the in-memory input pipeline 1.4x slower; docs/benchmarks.md). Only
    effective before JAX starts its backend. Returns whether the settings were applied (``False``
    off glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    never = -1  # mallopt takes an int; glibc converts it to size_t: SIZE_MAX, no top chunk reaches it
    return all(mallopt(option, value) == 1 for option, value in
               ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, never)))

"""Measure the bilinear (align_corners=True) up-sampling options on the current backend.

    python -m resattn_jax.bench_upsample [--batch 8] [--channels 256] [--repeats 20]

Compares, forward plus backward (as in a train step), at the soft-mask sizes of ImageNet stage 1:

* ``library`` — :func:`resattn_jax.ops.upsample_bilinear` (weighted gathers, gather VJP);
* ``matrices`` — dense interpolation-matrix products as batched GEMMs on NHWC memory;
* ``gather``   — the same weighted gathers with JAX's automatic VJP (a scatter-add);
* ``jax_image`` — ``jax.image.scale_and_translate`` with the align_corners scale and translation.

The three agree to float32 round-off (tested in ``tests/test_resample.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from resattn_jax.ops.upsample import interpolation_matrix, upsample_bilinear


def _neighbours(size_in: int, size_out: int):
    scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    src = np.arange(size_out) * scale
    lo = np.minimum(np.floor(src).astype(np.int32), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def upsample_gather(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """align_corners bilinear up-sampling through gathers and per-pixel weights. ``[N,H,W,C]``."""
    lo, hi, frac = _neighbours(x.shape[1], size[0])
    f = jnp.asarray(frac, x.dtype)[None, :, None, None]
    x = x[:, lo] * (1 - f) + x[:, hi] * f
    lo, hi, frac = _neighbours(x.shape[2], size[1])
    f = jnp.asarray(frac, x.dtype)[None, None, :, None]
    return x[:, :, lo] * (1 - f) + x[:, :, hi] * f


def upsample_matrices(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """align_corners bilinear up-sampling as two batched GEMMs with interpolation matrices. ``[N,H,W,C]``."""
    n, h_in, w_in, c = x.shape
    h_out, w_out = size
    a_h = jnp.broadcast_to(jnp.asarray(interpolation_matrix(h_in, h_out), x.dtype), (n, h_out, h_in))
    a_w = jnp.broadcast_to(jnp.asarray(interpolation_matrix(w_in, w_out), x.dtype), (n * h_out, w_out, w_in))
    batched = (((2,), (1,)), ((0,), (0,)))
    y = jax.lax.dot_general(a_h, x.reshape(n, h_in, w_in * c), batched)
    y = jax.lax.dot_general(a_w, y.reshape(n * h_out, w_in, c), batched)
    return y.reshape(n, h_out, w_out, c)


def upsample_jax_image(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """align_corners bilinear up-sampling with ``jax.image.scale_and_translate``. ``[N,H,W,C]``."""
    (h_in, w_in), (h_out, w_out) = x.shape[1:3], size
    scale = jnp.array([(h_out - 1) / (h_in - 1), (w_out - 1) / (w_in - 1)], jnp.float32)
    # Output pixel centre o + 0.5 must map to input pixel centre o / scale + 0.5.
    translation = 0.5 - 0.5 * scale
    return jax.image.scale_and_translate(x, (x.shape[0], h_out, w_out, x.shape[3]), (1, 2), scale, translation,
                                         method="linear", antialias=False)


IMPLEMENTATIONS = {"library": upsample_bilinear, "matrices": upsample_matrices, "gather": upsample_gather,
                   "jax_image": upsample_jax_image}


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    sizes = [(7, 14), (14, 28), (28, 56)]
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} batch={args.batch} "
          f"channels={args.channels}; median ms, forward/backward (VJP)")
    print(f"{'size':>10} " + " ".join(f"{name:>16}" for name in IMPLEMENTATIONS))
    for s_in, s_out in sizes:
        x = jax.random.normal(jax.random.key(0), (args.batch, s_in, s_in, args.channels))
        cotangent = jax.random.normal(jax.random.key(1), (args.batch, s_out, s_out, args.channels))
        row = []
        for impl in IMPLEMENTATIONS.values():
            forward = jax.jit(lambda v, impl=impl: impl(v, (s_out, s_out)))
            backward = jax.jit(lambda v, g, impl=impl: jax.vjp(lambda u: impl(u, (s_out, s_out)), v)[1](g))
            row.append(f"{_time(forward, x, repeats=args.repeats) * 1e3:7.2f}/"
                       f"{_time(backward, x, cotangent, repeats=args.repeats) * 1e3:<7.2f}")
        print(f"{s_in:>4}->{s_out:<5} " + " ".join(f"{cell:>16}" for cell in row))

if __name__ == "__main__":
    main()

"""The one place where this library chooses by backend: CPU fast paths, compiler options, host memory.

Every other module asks here; nothing outside :mod:`resattn_jax.ops` imports :mod:`resattn_jax.ops.cpu`.

* **Kernels.** Each function below computes one operation of the network with XLA's portable
  formula, and on CPU in float32 with a faster path (:mod:`.cpu.winograd` for stride-1 3x3
  convolutions, the OpenBLAS / batch-norm-sum custom calls of :mod:`.cpu.custom_calls`). The
  choice is ``lax.platform_dependent``, resolved when the program is lowered, so a GPU or TPU
  program contains XLA's formula only. Where the process's default backend is not the CPU, the CPU
  path is not even traced and the custom calls are never loaded.
* **Compiler options** (:func:`compiler_options`): per platform and step kind; only XLA:CPU gets any.
* **Host memory** (:func:`tune_host_memory`): glibc settings that make XLA:CPU steps faster at a
  price in host memory (docs/benchmarks.md) and would serialise an accelerator host's decoding
  threads, applied only when the run's devices will be CPUs, decided before JAX starts a backend
  (:func:`cpu_only_run`).

Switches: ``RESATTN_JAX_CPU_BLAS=0`` turns the custom calls off; ``RESATTN_JAX_RETAIN_HOST_MEMORY=0``
or ``1`` skips or forces the host-memory setting; ``RESATTN_JAX_XLA_DEFAULTS=1``
turns off the custom calls, the compiler options and the host-memory settings (Winograd stays:
it is plain JAX); :func:`portable` traces without the custom calls, e.g. for exports.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import pkgutil
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp

from resattn_jax.ops.cpu import custom_calls, host, winograd
from resattn_jax.ops.varying import sum_like

__all__ = ["STEP_KINDS", "batched_products", "bn_grad_sums", "bn_sums", "compiler_options", "conv3x3_forward",
           "conv1x1_normalized", "conv3x3_normalized", "conv3x3_weight_gradient", "cpu_only_run", "max_pool_grad", "native_available", "portable",
           "tune_host_memory", "upsample_bilinear", "weight_gradient"]

STEP_KINDS = ("train", "eval")
_state = threading.local()
_TN = (((0,), (0,)), ((), ()))


def _xla_defaults_requested() -> bool:
    return os.environ.get("RESATTN_JAX_XLA_DEFAULTS") == "1"


@contextlib.contextmanager
def portable():
    """Trace without the custom calls (this thread), for programs run in another process, e.g.
    exports: everything traced is plain StableHLO (Winograd, being plain JAX, stays on CPU).

    It changes what is traced inside the block; a function that ``jax.jit`` already traced with the
    same arguments keeps its program, so export fresh functions (as :mod:`resattn_jax.tools.export` does).
    """
    previous = getattr(_state, "portable", False)
    _state.portable = True
    try:
        yield
    finally:
        _state.portable = previous


def _cpu_paths() -> bool:
    """Whether what is traced now may contain CPU fast paths (inside ``platform_dependent``)."""
    return jax.default_backend() == "cpu"


def native_available() -> bool:
    """Whether the custom calls are used for what is traced now (CPU process, extension built and
    loaded, not switched off, not :func:`portable`)."""
    if os.environ.get("RESATTN_JAX_CPU_BLAS") == "0" or _xla_defaults_requested():
        return False
    return not getattr(_state, "portable", False) and _cpu_paths() and custom_calls.load()


def _on_cpu(fast: Callable, xla: Callable, *operands, when: bool = True):
    """``fast(*operands)`` when the program is lowered for CPU (and ``when``), else ``xla(*operands)``."""
    if not when:
        return xla(*operands)
    return jax.lax.platform_dependent(*operands, cpu=fast, default=xla)


def _native(native: Callable, xla: Callable, *operands):
    """The custom call ``native`` on CPU for float32 operands where available, else ``xla``."""
    float32 = all(x.dtype == jnp.float32 for x in operands)
    return _on_cpu(native, xla, *operands, when=float32 and native_available())


# ----------------------------------------------------------------------------------------- kernels
def weight_gradient(rows: jax.Array, dy: jax.Array) -> jax.Array:
    """``rows^T dy``, ``[M, C_in] x [M, C_out] -> [C_in, C_out]`` (a 1x1 convolution's weight gradient):
    this package's kernel (or OpenBLAS) on CPU in float32 (XLA:CPU's runs this shape at a third to
    half the speed), else XLA's."""
    return _native(custom_calls.matmul_tn, lambda a, b: jax.lax.dot_general(a, b, _TN), rows, dy)


def conv3x3_weight_gradient(x: jax.Array, dy: jax.Array, stride: int = 1) -> jax.Array:
    """The kernel gradient of a padding-1 3x3 convolution with ``stride``, ``x [N, H, W, C_in]``,
    ``dy [N, Ho, Wo, C_out]`` -> ``[3, 3, C_in, C_out]``: this package's kernel on CPU in float32 where
    ``C_out`` is a multiple of 8 (XLA:CPU transposes both operands first), else XLA's."""
    xla = functools.partial(custom_calls.wgrad3x3_xla, stride=stride)
    if dy.shape[-1] % custom_calls.WGRAD_MULTIPLE:
        return xla(x, dy)
    return _native(functools.partial(custom_calls.wgrad3x3, stride=stride), xla, x, dy)


def batched_products(v: jax.Array, u: jax.Array) -> jax.Array:
    """``v[i] @ u[i]``, ``[B, T, K] x [B, K, N] -> [B, T, N]`` (Winograd's products): OpenBLAS on CPU in
    float32 (1.1-2x XLA:CPU's speed on these small products), else XLA's."""
    return _native(custom_calls.batched_matmul, winograd.batched_dot, v, u)


def bn_sums(x: jax.Array) -> jax.Array:
    """``[sum(d), sum(d^2)]`` over rows, ``d = x - x[0]`` (shifted sums), ``[M, C] -> [2, C]``: one pass on
    CPU in float32, else XLA's."""
    return _native(custom_calls.bn_sums, custom_calls.bn_sums_xla, x)


def bn_grad_sums(dy, x, mean, mul, bias, relu: bool) -> jax.Array:
    """``[sum(dz), sum(dz * (x - mean))]`` over rows, ``dz`` the ReLU-masked ``dy`` (``relu``):
    ``dy, x [M, C]``, ``mean, mul, bias [C]`` -> ``[2, C]``; one pass on CPU in float32, else XLA's."""
    return _native(functools.partial(custom_calls.bn_grad_sums, relu=relu),
                   functools.partial(custom_calls.bn_grad_sums_xla, relu=relu), dy, x, mean, mul, bias)


def conv1x1_normalized(x, center, mul, bias, kernel, residual, relu: bool, xla: Callable) -> jax.Array:
    """``relu?((x - center) * mul + bias) @ kernel (+ residual)`` over rows ``x [M, K]`` (a batch norm
    and the 1x1 convolution that reads it): on CPU in float32 with ``K`` and ``N`` multiples of 8 one
    fused pass each way (:func:`.cpu.custom_calls.conv1x1` and its gradient: the normalised rows never
    reach memory), else ``xla(x, center, mul, bias, kernel, residual)`` (differentiated by autodiff)."""
    operands = (x, center, mul, bias, kernel) + (() if residual is None else (residual,))
    if not (all(v.dtype == jnp.float32 for v in operands) and x.shape[1] % custom_calls.WGRAD_MULTIPLE == 0
            and kernel.shape[1] % custom_calls.WGRAD_MULTIPLE == 0 and native_available()):
        return xla(x, center, mul, bias, kernel, residual)
    return _folded_conv1x1(x, center, mul, bias, kernel, residual, relu)


# One custom VJP around the platform choice (not a choice between two differentiated programs, which
# JAX would linearise branch by branch: half a second of tracing per network stage): forward and
# backward each pick the custom call on CPU and XLA's formula of the same float32 maths elsewhere.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _folded_conv1x1(x, center, mul, bias, kernel, residual, relu):
    return jax.lax.platform_dependent(x, center, mul, bias, kernel, residual,
                                      cpu=functools.partial(custom_calls.conv1x1, relu=relu),
                                      default=functools.partial(custom_calls.conv1x1_xla, relu=relu))


def _folded_conv1x1_fwd(x, center, mul, bias, kernel, residual, relu):
    return (_folded_conv1x1(x, center, mul, bias, kernel, residual, relu),
            (x, center, mul, bias, kernel, None if residual is None else ()))


def _folded_conv1x1_bwd(relu, res, g):
    x, center, mul, bias, kernel, had_residual = res
    dz, sums, dw = jax.lax.platform_dependent(x, center, mul, bias, kernel, g,
                                              cpu=functools.partial(custom_calls.conv1x1_grad, relu=relu),
                                              default=functools.partial(custom_calls.conv1x1_grad_xla, relu=relu))
    # dz: the cotangent of (x - center) * mul + bias; inside shard_map a replicated operand's is
    # summed over the devices.
    return (dz * mul, sum_like(-mul * sums[0], center), sum_like(sums[1], mul), sum_like(sums[0], bias),
            sum_like(dw, kernel), None if had_residual is None else g)


_folded_conv1x1.defvjp(_folded_conv1x1_fwd, _folded_conv1x1_bwd)


def max_pool_grad(first: jax.Array, grad: jax.Array, geometry: tuple[int, int, int, int],
                  xla: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """The 3x3 / stride-2 max-pool's input gradient from ``first`` (int8 window index of each output's
    first maximum) and ``grad``, ``geometry = (h, w, pad_h, pad_w)``: one pass in C++ on CPU in float32
    (XLA:CPU fuses the producers of both into its 9 shifted reads and computes them 9 times), else
    ``xla(first, grad)``."""
    native = functools.partial(custom_calls.max_pool_grad, geometry=tuple(int(v) for v in geometry))
    return _on_cpu(native, xla, first, grad, when=grad.dtype == jnp.float32 and native_available())


def upsample_bilinear(x: jax.Array, size: tuple[int, int], xla: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Bilinear up-sampling (align_corners=True) of ``x [N, h, w, C]`` to ``size``: one pass in C++ on
    CPU in float32 (XLA:CPU gathers through transposed copies of the map), else ``xla(x)``."""
    sizes = (int(x.shape[1]), int(x.shape[2]), int(size[0]), int(size[1]))
    native = functools.partial(custom_calls.upsample, sizes=sizes)
    return _on_cpu(native, xla, x, when=x.dtype == jnp.float32 and native_available())


#: Input channels below which the direct 3x3 kernel runs instead of XLA:CPU's convolution (where
#: Winograd does not apply; docs/benchmarks.md).
DIRECT_3X3_MAX_CHANNELS = 64


def _direct_3x3_native(x: jax.Array, kernel: jax.Array) -> bool:
    return (x.shape[-1] < DIRECT_3X3_MAX_CHANNELS and kernel.shape[-1] % custom_calls.CONV3X3_MULTIPLE == 0
            and x.dtype == kernel.dtype == jnp.float32 and native_available())


def conv3x3_forward(x: jax.Array, kernel: jax.Array, direct: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """A stride-1, padding-1 3x3 convolution: on CPU in float32 Winograd where
    :func:`.cpu.winograd.tile_size` says it pays, else this package's direct kernel for fewer than
    :data:`DIRECT_3X3_MAX_CHANNELS` input channels (XLA's runs an im2col copy and a packed GEMM), else
    ``direct(x, kernel)`` (XLA's convolution)."""
    m = winograd.tile_size(*x.shape, x.dtype)
    if m > 0:
        fast = functools.partial(winograd.conv3x3_winograd, m=m, product=batched_products)
        return _on_cpu(fast, direct, x, kernel, when=kernel.dtype == x.dtype and _cpu_paths())
    return _on_cpu(custom_calls.conv3x3, direct, x, kernel, when=_direct_3x3_native(x, kernel))


def conv3x3_normalized(x: jax.Array, center, mul, bias, kernel: jax.Array, relu: bool, xla: Callable) -> jax.Array:
    """A stride-1, padding-1 3x3 convolution of ``relu?((x - center) * mul + bias)`` (a batch norm on
    stored statistics): the direct kernel reading the normalised input on the fly on CPU in float32
    where it applies (as :func:`conv3x3_forward`), else ``xla(x, center, mul, bias, kernel)``."""
    native = functools.partial(lambda x, c, m, b, k: custom_calls.conv3x3(x, k, c, m, b, relu))
    when = _direct_3x3_native(x, kernel) and winograd.tile_size(*x.shape, x.dtype) == 0
    return _on_cpu(native, xla, x, center, mul, bias, kernel, when=when)


# ----------------------------------------------------------------------------------------- compiling
def _devices(mesh_or_devices) -> list:
    if isinstance(mesh_or_devices, jax.sharding.Mesh):
        return list(mesh_or_devices.devices.flat)
    return list(mesh_or_devices if mesh_or_devices is not None else jax.devices())


@functools.cache
def _supported_options(platform: str, kind: str) -> tuple[tuple[str, Any], ...]:
    """The options for steps of ``kind`` on ``platform`` that this jaxlib accepts."""
    if platform != "cpu" or _xla_defaults_requested():
        return ()
    wanted = {**host.COMPILER_OPTIONS, **host.STEP_COMPILER_OPTIONS[kind]}
    supported = []
    for key, value in wanted.items():
        try:  # A jaxlib that does not know the option rejects it at compile time: probe once.
            probe = jax.device_put(jnp.zeros((), jnp.float32), jax.devices(platform)[0])
            jax.jit(jnp.negative, compiler_options={key: value}).lower(probe).compile()
        except Exception:  # noqa: BLE001 - any rejection means "not supported here"
            continue
        supported.append((key, value))
    return tuple(supported)


def compiler_options(mesh_or_devices=None, kind: str = "eval") -> dict[str, Any]:
    """XLA options for steps of ``kind`` (``'train'``: forward and backward; ``'eval'``: forward
    only) that run on ``mesh_or_devices`` (a mesh, devices, or all devices). Empty off CPU."""
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}; choose one of {STEP_KINDS}")
    return dict(_supported_options(_devices(mesh_or_devices)[0].platform, kind))


# ----------------------------------------------------------------------------------------- host memory
def _accelerator_plugins() -> list[str]:
    """Installed PJRT plugins that could give JAX a non-CPU default backend, found the way JAX finds
    them (``jax_plugins`` namespace packages and entry points, ``libtpu``), without importing them."""
    found = []
    try:
        import jax_plugins  # noqa: PLC0415 - namespace package, present only with plugins installed

        found += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    found += [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    if importlib.util.find_spec("libtpu") is not None:
        found.append("libtpu")
    return found


def cpu_only_run() -> bool:
    """Whether this process's JAX devices will be CPUs, decided before any backend starts:
    ``JAX_PLATFORMS`` (or ``jax_platforms``) names ``cpu`` first, or no accelerator plugin is installed."""
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS") or ""
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not _accelerator_plugins()


def tune_host_memory() -> bool:
    """:func:`.cpu.host.retain_host_memory` when :func:`cpu_only_run` (call it before JAX starts its
    backend, as the CLIs do); nothing on accelerator hosts, whose input pipelines decode on many
    threads, or with ``RESATTN_JAX_XLA_DEFAULTS=1``. ``RESATTN_JAX_RETAIN_HOST_MEMORY=1`` (``0``)
    applies (skips) it whatever the devices. Returns whether the settings were applied."""
    forced = os.environ.get("RESATTN_JAX_RETAIN_HOST_MEMORY")
    if forced not in (None, "", "0", "1"):
        raise ValueError(f"RESATTN_JAX_RETAIN_HOST_MEMORY must be 0 or 1, got {forced!r}")
    if forced == "0" or _xla_defaults_requested() or (forced != "1" and not cpu_only_run()):
        return False
    return host.retain_host_memory()

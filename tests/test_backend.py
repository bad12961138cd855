"""The backend choices made outside traced programs: XLA:CPU compiler options and host memory."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from resattn_jax.ops import backend
from resattn_jax.ops.cpu import host


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_cpu_steps_compile_convolutions_on_the_eigen_path(monkeypatch):
    options = backend.compiler_options()
    assert options == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    x, w = jnp.ones((1, 32, 32, 64)), jnp.ones((3, 3, 64, 64))
    assert "__ynn_fusion" in jax.jit(_conv).lower(x, w).compile().as_text()
    assert "__ynn_fusion" not in jax.jit(_conv, compiler_options=options).lower(x, w).compile().as_text()
    # Training steps also hand their matrix products to YNNPACK; convolutions stay on Eigen.
    train = backend.compiler_options(kind="train")
    assert train["xla_cpu_experimental_ynn_fusion_type"].split(",") == ["LIBRARY_FUSION_TYPE_REDUCE",
                                                                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"]
    assert "__ynn_fusion" not in jax.jit(_conv, compiler_options=train).lower(x, w).compile().as_text()
    with pytest.raises(ValueError, match="unknown step kind"):
        backend.compiler_options(kind="infer")
    monkeypatch.setenv("RESATTN_JAX_XLA_DEFAULTS", "1")
    backend._supported_options.cache_clear()
    try:
        assert backend.compiler_options() == {}
    finally:
        backend._supported_options.cache_clear()


def test_unknown_compiler_options_are_dropped(monkeypatch):
    monkeypatch.setattr(host, "COMPILER_OPTIONS", {"xla_no_such_option_anywhere": 1})
    backend._supported_options.cache_clear()
    try:
        assert backend.compiler_options() == {}
    finally:
        backend._supported_options.cache_clear()


def test_no_compiler_options_off_cpu():
    assert backend._supported_options("cuda", "train") == () and backend._supported_options("tpu", "eval") == ()


def _host_memory_in_fresh_process(tmp_path, **env) -> list[str]:
    """``[tuned, cpu_only_run, backend started]`` printed by a fresh process."""
    ours = ("RESATTN_JAX_XLA_DEFAULTS", "RESATTN_JAX_RETAIN_HOST_MEMORY", "JAX_PLATFORMS")
    env = {**{k: v for k, v in os.environ.items() if k not in ours}, **env}
    script = ("import jax; from resattn_jax.ops import backend; from jax._src import xla_bridge; "
              "print(backend.tune_host_memory(), backend.cpu_only_run(), bool(xla_bridge._backends))")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True,
                          cwd=tmp_path).stdout.split()


@pytest.mark.parametrize("env,tuned", [({}, True), ({"JAX_PLATFORMS": "cpu"}, True),
                                       ({"RESATTN_JAX_XLA_DEFAULTS": "1"}, False), ({"JAX_PLATFORMS": "cuda"}, False),
                                       ({"JAX_PLATFORMS": "tpu,cpu"}, False),
                                       ({"RESATTN_JAX_RETAIN_HOST_MEMORY": "0"}, False),
                                       ({"JAX_PLATFORMS": "cuda", "RESATTN_JAX_RETAIN_HOST_MEMORY": "1"}, True)])
def test_host_memory_is_tuned_only_for_cpu_runs(tmp_path, env, tuned):
    """Decided in a fresh process before any backend starts (the effect on step time and memory is a
    benchmark figure, docs/benchmarks.md); this machine has no accelerator plugin installed."""
    out = _host_memory_in_fresh_process(tmp_path, **env)
    assert out[0] == str(tuned)
    assert out[2] == "False"  # deciding started no backend


def test_an_installed_accelerator_plugin_means_no_host_tuning(tmp_path):
    # A PJRT plugin is found as JAX finds it: a module of the jax_plugins namespace package.
    (tmp_path / "jax_plugins" / "xpu_plugin").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xpu_plugin" / "__init__.py").write_text("")
    out = _host_memory_in_fresh_process(tmp_path, PYTHONPATH=str(tmp_path))
    assert out[:2] == ["False", "False"]
    assert _host_memory_in_fresh_process(tmp_path, PYTHONPATH=str(tmp_path), JAX_PLATFORMS="cpu")[:2] == ["True", "True"]


_HEAP_AFTER_FREE = """
import ctypes, sys
from resattn_jax.ops.cpu import host
if sys.argv[1] == "1":
    assert host.retain_host_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
if sys.argv[1] == "0":  # glibc's defaults but no mmap: the block comes from the heap too
    assert libc.mallopt(-4, 0) == 1
block = libc.malloc(5 << 29)  # 2.5 GiB, above the largest int; its pages are never touched
assert block
top = libc.sbrk(0)
libc.free(block)
print("kept" if libc.sbrk(0) == top else "trimmed")
"""


@pytest.mark.parametrize("retain,expected", [("1", "kept"), ("0", "trimmed")])
def test_retained_heap_keeps_blocks_above_2_gib(tmp_path, retain, expected):
    """A step's temporaries can exceed the largest ``int`` (cifar_attention92's train step at batch
    128: 3.1 GB): freed, they must stay in the heap, or every step faults them in again. Measured on
    the program break, without touching the pages (so it costs no page faults)."""
    out = subprocess.run([sys.executable, "-c", _HEAP_AFTER_FREE, retain], capture_output=True, text=True,
                         check=True, cwd=tmp_path).stdout.split()
    assert out == [expected]

"""CPU custom calls (OpenBLAS products, batch-norm sums): values and gradients equal XLA's; off switches; fallbacks."""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from resattn_jax.ops import backend
from resattn_jax.ops.cpu import custom_calls as cpu_blas

TN = (((0,), (0,)), ((), ()))
BATCHED = (((2,), (1,)), ((0,), (0,)))


def _normal(seed, *shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.fixture(autouse=True, scope="module")
def _loaded():
    """The custom calls are registered by the backend's first use (so that any test runs alone)."""
    assert backend.native_available()


def test_custom_calls_are_built_and_loaded_here():
    # The machines this project runs on have a C++ compiler and scipy-openblas64: a failure to build
    # must show up here rather than as a silent fallback.
    assert backend.native_available()


# The wgrad kernel takes N % 8 == 0 (K > N with K % 16 == 0 computes the transpose); the rest OpenBLAS.
@pytest.mark.parametrize("m,k,n", [(37, 5, 11), (64, 48, 16), (300, 7, 129), (1, 3, 2), (1000, 64, 16),
                                   (700, 16, 48), (2000, 100, 32), (255, 25, 64), (513, 32, 160), (3, 1, 16), (900, 8, 8), (64, 32, 24)])
def test_matmul_tn_equals_xla(m, k, n):
    a, b = _normal(0, m, k), _normal(1, m, n)
    out = jax.jit(cpu_blas.matmul_tn)(a, b)
    np.testing.assert_allclose(out, jax.lax.dot_general(a, b, TN), rtol=1e-5, atol=1e-4)


# Every tap's boundary (H or W of 1 and 2), input channels that are no block multiple, 16 to 64
# output channels (one to four vectors per block), several images per thread.
@pytest.mark.parametrize("shape,c_out", [((3, 5, 1, 7), 16), ((2, 1, 1, 3), 32), ((5, 2, 9, 20), 48),
                                         ((4, 8, 8, 16), 64), ((1, 3, 4, 30), 16), ((9, 6, 7, 13), 32),
                                         ((4, 6, 6, 8), 8), ((2, 5, 5, 3), 24)])
def test_wgrad3x3_equals_xla(shape, c_out):
    x, dy = _normal(19, *shape), _normal(20, *shape[:-1], c_out)
    out = jax.jit(cpu_blas.wgrad3x3)(x, dy)
    np.testing.assert_allclose(out, cpu_blas.wgrad3x3_xla(x, dy), rtol=1e-5, atol=1e-4)


def test_wgrad3x3_differentiates_like_xla():
    x, dy = _normal(21, 2, 5, 6, 3), _normal(22, 2, 5, 6, 16)
    loss = lambda wgrad: lambda x, dy: jnp.sum(jnp.sin(wgrad(x, dy)))  # noqa: E731
    ours = jax.grad(loss(cpu_blas.wgrad3x3), (0, 1))(x, dy)
    ref = jax.grad(loss(cpu_blas.wgrad3x3_xla), (0, 1))(x, dy)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-4), ours, ref)


@pytest.mark.parametrize("c_out,dtype,native", [(16, jnp.float32, True), (8, jnp.float32, True), (12, jnp.float32, False),
                                                (16, jnp.bfloat16, False)])
def test_conv3x3_weight_gradient_takes_the_kernel_where_it_applies(c_out, dtype, native):
    x, dy = _normal(23, 2, 4, 4, 8).astype(dtype), _normal(24, 2, 4, 4, c_out).astype(dtype)
    lowered = jax.jit(lambda x, dy: backend.conv3x3_weight_gradient(x, dy)).lower(x, dy)
    assert ("resattn_wgrad3x3" in lowered.as_text()) == native
    out = lowered.compile()(x, dy)
    np.testing.assert_allclose(out.astype(jnp.float32), cpu_blas.wgrad3x3_xla(x, dy).astype(jnp.float32),
                               rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-1 if dtype == jnp.bfloat16 else 1e-4)


@pytest.mark.parametrize("batch,t,k,n", [(16, 9, 5, 7), (36, 33, 8, 3), (1, 1, 1, 1)])
def test_batched_matmul_equals_xla(batch, t, k, n):
    a, b = _normal(2, batch, t, k), _normal(3, batch, k, n)
    out = jax.jit(cpu_blas.batched_matmul)(a, b)
    np.testing.assert_allclose(out, jax.lax.dot_general(a, b, BATCHED), rtol=1e-5, atol=1e-4)


def test_gradients_equal_xla_to_second_order():
    a, b = _normal(4, 20, 6), _normal(5, 20, 9)
    f = lambda op: lambda a, b: jnp.sum(jnp.sin(op(a, b)))  # noqa: E731
    xla_tn = lambda a, b: jax.lax.dot_general(a, b, TN)  # noqa: E731
    for order in (1, 2):
        ours, ref = f(cpu_blas.matmul_tn), f(xla_tn)
        for _ in range(order):
            ours, ref = (lambda g: lambda a, b: jnp.sum(g(a, b)[0] ** 2))(jax.grad(ours, (0, 1))), \
                (lambda g: lambda a, b: jnp.sum(g(a, b)[0] ** 2))(jax.grad(ref, (0, 1)))
        np.testing.assert_allclose(jax.jit(ours)(a, b), ref(a, b), rtol=1e-4)
    x, y = _normal(6, 4, 5, 3), _normal(7, 4, 3, 6)
    ours = jax.grad(lambda x, y: jnp.sum(jnp.sin(cpu_blas.batched_matmul(x, y))), (0, 1))(x, y)
    ref = jax.grad(lambda x, y: jnp.sum(jnp.sin(jax.lax.dot_general(x, y, BATCHED))), (0, 1))(x, y)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-5), ours, ref)


@pytest.mark.parametrize("m,c", [(37, 5), (1000, 64), (3, 1)])
def test_bn_sums_equal_xla_and_differentiate(m, c):
    x = 3.0 * _normal(12, m, c) + 1.5  # off-centre: E[x^2] dominated by the mean
    np.testing.assert_allclose(jax.jit(cpu_blas.bn_sums)(x), cpu_blas.bn_sums_xla(x), rtol=1e-5, atol=1e-3)
    g = _normal(13, 2, c)
    loss = lambda sums: lambda x: jnp.sum(g * sums(x) / m + (sums(x) / m) ** 2)  # noqa: E731 - well conditioned
    ours, ref = jax.grad(loss(cpu_blas.bn_sums))(x), jax.grad(loss(cpu_blas.bn_sums_xla))(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("relu", [True, False])
def test_bn_grad_sums_equal_xla_and_differentiate(relu):
    dy, x = _normal(14, 300, 7), _normal(15, 300, 7)
    mean, mul, bias = _normal(16, 7) * 0.1, 1 + 0.3 * _normal(17, 7), _normal(18, 7) * 0.2
    args = (dy, x, mean, mul, bias)
    out = jax.jit(lambda *a: cpu_blas.bn_grad_sums(*a, relu))(*args)
    np.testing.assert_allclose(out, cpu_blas.bn_grad_sums_xla(*args, relu), rtol=1e-5, atol=1e-4)
    ours = jax.grad(lambda *a: jnp.sum(cpu_blas.bn_grad_sums(*a, relu) ** 2), (0, 1, 2, 3, 4))(*args)
    ref = jax.grad(lambda *a: jnp.sum(cpu_blas.bn_grad_sums_xla(*a, relu) ** 2), (0, 1, 2, 3, 4))(*args)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-3), ours, ref)


def test_inside_shard_map_with_a_replicated_operand():
    """Per device ``a``, replicated ``w``: the custom VJP's cotangent of ``w`` is what autodiff gives
    for XLA's product there (summed over the devices), i.e. the gradient over the whole of ``a``."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    a, w = _normal(8, 4, 16, 5), _normal(9, 4, 5, 3)   # a: per device; w: replicated
    xla = lambda a, w: jax.lax.dot_general(a, w, BATCHED)  # noqa: E731

    def f(a, w):
        grad = lambda product: jax.grad(lambda w: jnp.sum(product(a, w) ** 2))(w)  # noqa: E731
        return cpu_blas.batched_matmul(a, w), grad(cpu_blas.batched_matmul), grad(xla)

    y, g, g_autodiff = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(None, "data"), P()),
                                             out_specs=(P(None, "data"), P(), P())))(a, w)
    np.testing.assert_allclose(y, xla(a, w), rtol=1e-5, atol=1e-5)
    g_whole = jax.grad(lambda w: jnp.sum(xla(a, w) ** 2))(w)
    np.testing.assert_allclose(g_autodiff, g_whole, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(g, g_whole, rtol=1e-5, atol=1e-4)


def _conv1x1_operands(seed, m, k, n):
    x, c, mul, b = _normal(seed, m, k), 0.1 * _normal(seed + 1, k), 1 + 0.2 * _normal(seed + 2, k), _normal(seed + 3, k)
    return x, c, mul, 0.1 * b, _normal(seed + 4, k, n) / k ** 0.5, _normal(seed + 5, m, n)


def _conv1x1_xla(x, c, mul, b, w, r, relu):
    z = (x - c) * mul + b
    y = (jnp.maximum(z, 0.0) if relu else z) @ w
    return y if r is None else y + r


def _fused_conv1x1(x, c, mul, b, w, r, relu):
    """The backend's fused path (the custom calls inside one custom VJP)."""
    return backend.conv1x1_normalized(x, c, mul, b, w, r, relu, lambda *v: pytest.fail("took XLA's formula"))


# Rows: fewer than a chunk, several chunks and pieces, one; 16 to 64 channels either way.
@pytest.mark.parametrize("m,k,n", [(37, 16, 32), (3000, 64, 16), (1, 32, 48), (700, 48, 64), (500, 8, 32), (90, 32, 8)])
@pytest.mark.parametrize("relu,residual", [(True, True), (False, False)])
def test_fused_conv1x1_and_its_gradient_equal_xla(m, k, n, relu, residual):
    x, c, mul, b, w, r = _conv1x1_operands(27, m, k, n)
    r = r if residual else None
    lowered = jax.jit(jax.grad(lambda x: jnp.sum(_fused_conv1x1(x, c, mul, b, w, r, relu)))).lower(x).as_text()
    assert "resattn_conv1x1" in lowered and "resattn_conv1x1_grad" in lowered
    np.testing.assert_allclose(jax.jit(_fused_conv1x1, static_argnums=6)(x, c, mul, b, w, r, relu),
                               _conv1x1_xla(x, c, mul, b, w, r, relu), rtol=1e-5, atol=1e-4)
    dy = _normal(33, m, n)
    got = jax.jit(cpu_blas.conv1x1_grad, static_argnums=6)(x, c, mul, b, w, dy, relu)
    want = cpu_blas.conv1x1_grad_xla(x, c, mul, b, w, dy, relu)
    for g, h in zip(got, want):  # (a borderline z flips its ReLU mask in one rounding and not the other: none here)
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-3)
    loss = lambda f: lambda *v: jnp.sum(jnp.sin(f(*v, r, relu)))  # noqa: E731
    ours = jax.jit(jax.grad(loss(_fused_conv1x1), (0, 1, 2, 3, 4)))(x, c, mul, b, w)
    ref = jax.grad(loss(_conv1x1_xla), (0, 1, 2, 3, 4))(x, c, mul, b, w)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-3), ours, ref)


def test_fused_conv1x1_second_order_gradient():
    x, c, mul, b, w, r = _conv1x1_operands(40, 50, 16, 16)
    def grad_norm(f):
        g = jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, c, mul, b, w, r, True))), (0, 1))
        return lambda x, w: jnp.sum(jnp.square(g(x, w)[0])) + jnp.sum(jnp.square(g(x, w)[1]))
    ours = jax.jit(jax.grad(grad_norm(_fused_conv1x1), (0, 1)))(x, w)
    ref = jax.grad(grad_norm(_conv1x1_xla), (0, 1))(x, w)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=1e-3), ours, ref)


def test_conv3x3_kernel_gradient_inside_shard_map():
    """Per-device images, a replicated kernel: the kernel's cotangent (the wgrad kernel's, summed over
    the devices) is the gradient over the whole batch."""
    from resattn_jax.ops import conv3x3, conv3x3_direct  # noqa: PLC0415

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    x, w = _normal(25, 8, 6, 6, 5), _normal(26, 3, 3, 5, 16)
    grad = lambda conv: lambda x, w: jax.grad(lambda w: jnp.sum(conv(x, w) ** 2))(w)  # noqa: E731
    g = jax.jit(jax.shard_map(grad(conv3x3), mesh=mesh, in_specs=(P("data"), P()), out_specs=P()))(x, w)
    assert "resattn_wgrad3x3" in jax.jit(grad(conv3x3)).lower(x, w).as_text()
    np.testing.assert_allclose(g, grad(conv3x3_direct)(x, w), rtol=1e-5, atol=1e-3)


def test_portable_traces_xla_products_only():
    a, b = _normal(10, 8, 4), _normal(11, 8, 3)

    # (What is traced inside the block: jit reuses traces of one function object, so fresh ones here.)
    with backend.portable():
        assert not backend.native_available()
        text = jax.jit(lambda a, b: backend.weight_gradient(a, b)).lower(a, b).as_text()
    assert "resattn_matmul_tn" not in text
    assert backend.native_available()
    assert "resattn_matmul_tn" in jax.jit(lambda a, b: backend.weight_gradient(a, b)).lower(a, b).as_text()


def _fresh_process(code: str, cwd=None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


def test_switch_and_missing_extension_fall_back_to_xla(tmp_path):
    code = """
        import os, warnings, jax, jax.numpy as jnp
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from resattn_jax.ops import backend
            ok = backend.native_available()
            a = jnp.ones((6, 2)); b = jnp.ones((6, 3))
            assert (jax.jit(backend.weight_gradient)(a, b) == 6).all()
            assert backend.native_available() == ok  # asked again: no second warning
        print(ok, [str(w.message) for w in caught if "resattn_jax" in str(w.message)], backend.__file__)
    """
    off = _fresh_process(code, RESATTN_JAX_CPU_BLAS="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.startswith("False []")
    # The package without its compiled extension (as a source checkout never built), and a fresh
    # $HOME: XLA's products, one warning, nothing compiled and nothing written under $HOME.
    copy = tmp_path / "src"
    shutil.copytree(os.path.dirname(os.path.dirname(backend.__file__)), copy / "resattn_jax",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    home = tmp_path / "home"
    home.mkdir()
    missing = _fresh_process(code, cwd=tmp_path, PYTHONPATH=str(copy), HOME=str(home), CXX="/bin/false")
    assert missing.returncode == 0, missing.stderr
    assert missing.stdout.startswith("False"), missing.stdout
    warned = [line for line in missing.stdout.split("', '") if "CPU custom calls unavailable" in line]
    assert len(warned) == 1 and "was not built at install time" in missing.stdout, missing.stdout
    assert missing.stdout.strip().endswith(str(copy / "resattn_jax" / "ops" / "backend.py"))  # the copy ran
    assert not list(home.iterdir())


def _damaged_copies(directory):
    """Copies of the built library, each with the original build record next to it: truncated to
    half (which the dynamic loader maps and crashes on: SIGBUS), and with one byte flipped."""
    library = cpu_blas.native_library()
    record = library.with_name(library.name + ".sha256")
    data = library.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    copies = {}
    for kind, content in [("truncated", data[:len(data) // 2]), ("flipped", bytes(flipped))]:
        (directory / kind).mkdir()
        copies[kind] = directory / kind / library.name
        copies[kind].write_bytes(content)
        shutil.copyfile(record, directory / kind / record.name)
    return copies


def test_verify_native_accepts_the_built_library_and_rejects_damaged_copies(tmp_path):
    library = cpu_blas.native_library()
    cpu_blas.verify_native(library)                     # the build record written by setup.py
    copies = _damaged_copies(tmp_path)
    damaged = r"does not match its build record .*\({}\): the file is damaged"
    with pytest.raises(RuntimeError, match=damaged.format(rf"size {len(copies['truncated'].read_bytes())} != \d+")):
        cpu_blas.verify_native(copies["truncated"])
    with pytest.raises(RuntimeError, match=damaged.format("sha256 [0-9a-f]{64} != [0-9a-f]{64}")):
        cpu_blas.verify_native(copies["flipped"])
    copies["flipped"].with_name(library.name + ".sha256").unlink()
    with pytest.raises(RuntimeError, match="has no build record"):
        cpu_blas.verify_native(copies["flipped"])
    copies["truncated"].with_name(library.name + ".sha256").write_text("{\"size\": 1")
    with pytest.raises(RuntimeError, match="is unreadable"):
        cpu_blas.verify_native(copies["truncated"])


def test_truncated_library_is_skipped_not_loaded(tmp_path):
    truncated = _damaged_copies(tmp_path)["truncated"]
    # Loaded unchecked, this copy crashes the process (SIGBUS) or at least fails to load.
    assert subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(truncated)!r})"],
                          capture_output=True, timeout=60).returncode != 0
    code = f"""
        import warnings, jax, jax.numpy as jnp
        from pathlib import Path
        from resattn_jax.ops.cpu import custom_calls
        custom_calls.native_library = lambda: Path({str(truncated)!r})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from resattn_jax.ops import backend
            ok = custom_calls.load()
            assert not backend.native_available()
            a = jnp.ones((6, 2)); b = jnp.ones((6, 3))
            assert (jax.jit(backend.weight_gradient)(a, b) == 6).all()
            assert "resattn_matmul_tn" not in jax.jit(lambda a, b: backend.weight_gradient(a, b)).lower(a, b).as_text()
        print(ok)
        for w in caught:
            if "resattn_jax" in str(w.message):
                print(w.message)
    """
    run = _fresh_process(code)
    assert run.returncode == 0, (run.returncode, run.stderr)
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "False" and len(lines) == 2, run.stdout
    assert "CPU custom calls unavailable" in lines[1] and "the file is damaged" in lines[1], run.stdout
    assert f"{truncated} does not match its build record" in lines[1], run.stdout

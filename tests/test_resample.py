"""Up-sampling (align_corners=True) and Caffe-style max pooling against independent references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from resattn_jax.tools.bench_upsample import upsample_gather, upsample_jax_image, upsample_matrices
from resattn_jax.ops import interpolation_matrix, max_pool_3x3s2, pooled_size, upsample_bilinear


def reference_upsample(x: np.ndarray, h_out: int, w_out: int) -> np.ndarray:
    """Pixel-by-pixel align_corners bilinear interpolation (PyTorch's/Caffe Interp's definition)."""
    n, h_in, w_in, c = x.shape
    out = np.zeros((n, h_out, w_out, c), np.float64)
    for i in range(h_out):
        sy = i * (h_in - 1) / (h_out - 1) if h_out > 1 else 0.0
        y0 = min(int(np.floor(sy)), h_in - 1)
        y1 = min(y0 + 1, h_in - 1)
        fy = sy - y0
        for j in range(w_out):
            sx = j * (w_in - 1) / (w_out - 1) if w_out > 1 else 0.0
            x0 = min(int(np.floor(sx)), w_in - 1)
            x1 = min(x0 + 1, w_in - 1)
            fx = sx - x0
            out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                            + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
    return out


SIZES = [((7, 7), (14, 14)), ((4, 6), (7, 11)), ((13, 13), (25, 25)), ((2, 3), (9, 4)), ((5, 5), (5, 5)), ((3, 3), (1, 1))]


@pytest.mark.parametrize("size_in,size_out", SIZES)
def test_upsample_matches_pixel_reference(size_in, size_out):
    x = np.random.default_rng(0).normal(size=(2, *size_in, 3)).astype(np.float32)
    got = np.asarray(upsample_bilinear(jnp.asarray(x), size_out))
    assert got.shape == (2, *size_out, 3)
    np.testing.assert_allclose(got, reference_upsample(x, *size_out), atol=1e-5)


def test_upsample_corners_are_preserved():
    x = jax.random.normal(jax.random.key(0), (1, 7, 7, 4))
    y = upsample_bilinear(x, (14, 14))
    for (i, j), (k, l) in [((0, 0), (0, 0)), ((0, -1), (0, -1)), ((-1, 0), (-1, 0)), ((-1, -1), (-1, -1))]:
        np.testing.assert_allclose(y[0, i, j], x[0, k, l], atol=1e-6)


@pytest.mark.parametrize("impl", [upsample_matrices, upsample_gather, upsample_jax_image])
def test_benchmark_alternatives_agree(impl):
    x = jax.random.normal(jax.random.key(2), (2, 7, 7, 5))
    np.testing.assert_allclose(impl(x, (14, 14)), upsample_bilinear(x, (14, 14)), atol=1e-5)


@pytest.mark.parametrize("size_in,size_out", [((7, 7), (14, 14)), ((4, 6), (7, 11)), ((13, 13), (25, 25))])
def test_upsample_custom_vjp_is_the_transpose(size_in, size_out):
    """The gather-based backward equals A_h^T g A_w computed with dense matrices."""
    x = jax.random.normal(jax.random.key(3), (2, *size_in, 3))
    g = jax.random.normal(jax.random.key(4), (2, *size_out, 3))
    _, vjp = jax.vjp(lambda v: upsample_bilinear(v, size_out), x)
    a_h = interpolation_matrix(size_in[0], size_out[0])
    a_w = interpolation_matrix(size_in[1], size_out[1])
    expected = np.einsum("oh,pw,nopc->nhwc", a_h, a_w, np.asarray(g, np.float64))
    np.testing.assert_allclose(vjp(g)[0], expected, atol=1e-5)


def test_upsample_second_order_gradient():
    """Reverse-over-reverse (e.g. a gradient-norm penalty) works and matches dense matrices."""
    x = jax.random.normal(jax.random.key(5), (1, 4, 4, 2))

    def grad_norm(impl):
        f = lambda v: jnp.sum(jnp.sin(impl(v, (7, 7))))
        return jax.grad(lambda v: jnp.sum(jax.grad(f)(v) ** 2))(x)

    np.testing.assert_allclose(grad_norm(upsample_bilinear), grad_norm(upsample_matrices), atol=1e-5)


def test_upsample_keeps_bfloat16():
    x = jax.random.normal(jax.random.key(6), (1, 7, 7, 8)).astype(jnp.bfloat16)
    y = upsample_bilinear(x, (14, 14))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), reference_upsample(np.asarray(x, np.float32), 14, 14),
                               atol=3e-2)


def test_interpolation_matrix_rows_sum_to_one():
    for a, b in [(7, 14), (3, 10), (10, 3), (1, 5)]:
        np.testing.assert_allclose(interpolation_matrix(a, b).sum(axis=1), 1.0)


def caffe_max_pool(x: np.ndarray) -> np.ndarray:
    """Caffe ceil-mode 3x3/2 max pooling without padding: windows start at 0, the last one clipped."""
    n, h, w, c = x.shape
    ho, wo = -(-(h - 3) // 2) + 1, -(-(w - 3) // 2) + 1
    out = np.empty((n, ho, wo, c), x.dtype)
    for i in range(ho):
        for j in range(wo):
            out[:, i, j] = x[:, 2 * i: min(2 * i + 3, h), 2 * j: min(2 * j + 3, w)].max(axis=(1, 2))
    return out


@pytest.mark.parametrize("size", [4, 8, 14, 28, 56])
def test_max_pool_reproduces_caffe_on_even_sizes(size):
    x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    np.testing.assert_array_equal(max_pool_3x3s2(jnp.asarray(x)), caffe_max_pool(x))


@pytest.mark.parametrize("size", [3, 7, 25])
def test_max_pool_odd_sizes_use_same_convention(size):
    x = jnp.zeros((1, size, size, 1))
    assert max_pool_3x3s2(x).shape[1] == pooled_size(size) == -(-size // 2)


def caffe_max_pool_grad(x: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Caffe's backward: each output's gradient goes to the first maximum of its window (row-major)."""
    n, h, w, c = x.shape
    out = np.zeros_like(x)
    for b in range(n):
        for ch in range(c):
            for i in range(grad.shape[1]):
                for j in range(grad.shape[2]):
                    window = x[b, 2 * i: min(2 * i + 3, h), 2 * j: min(2 * j + 3, w), ch]
                    di, dj = np.unravel_index(np.argmax(window), window.shape)  # first maximum
                    out[b, 2 * i + di, 2 * j + dj, ch] += grad[b, i, j, ch]
    return out


@pytest.mark.parametrize("size", [2, 6, 8])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_gradient_routes_to_the_first_maximum(size, ties):
    rng = np.random.default_rng(size)
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    if ties:  # rounded values: most windows hold several equal maxima
        x = np.round(x)
    grad = rng.normal(size=(2, size // 2, size // 2, 3)).astype(np.float32)
    _, vjp = jax.vjp(max_pool_3x3s2, jnp.asarray(x))
    np.testing.assert_allclose(vjp(jnp.asarray(grad))[0], caffe_max_pool_grad(x, grad), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 4), (1, 1, 1, 2)])
def test_max_pool_gradient_matches_xla_reduce_window(shape):
    """Odd sizes included: the custom VJP agrees with autodiff of XLA's SAME reduce_window pooling."""
    x = jnp.asarray(np.round(np.random.default_rng(1).normal(size=shape)).astype(np.float32))
    reference = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2), padding="SAME")
    y_ref, vjp_ref = jax.vjp(reference, x)
    y, vjp = jax.vjp(max_pool_3x3s2, x)
    np.testing.assert_array_equal(y, y_ref)
    grad = jnp.asarray(np.random.default_rng(2).normal(size=y.shape).astype(np.float32))
    np.testing.assert_allclose(vjp(grad)[0], vjp_ref(grad)[0], rtol=1e-6, atol=1e-6)


def _lowered_text(f, *args):
    return jax.jit(f).lower(*args).as_text()


def test_cpu_float32_resampling_runs_the_custom_calls():
    """On CPU in float32 the pool's gradient and both directions of the up-sampling are the C++
    calls (the tests above check their values); bfloat16 and portable traces keep XLA's formulas."""
    from resattn_jax.ops import backend  # noqa: PLC0415

    x = jax.random.normal(jax.random.key(7), (2, 8, 8, 4))
    pool_grad = lambda v: jax.grad(lambda u: jnp.sum(jnp.sin(max_pool_3x3s2(u))))(v)  # noqa: E731
    up_grad = lambda v: jax.grad(lambda u: jnp.sum(jnp.sin(upsample_bilinear(u, (15, 15)))))(v)  # noqa: E731
    text = _lowered_text(pool_grad, x) + _lowered_text(up_grad, x)
    assert all(t in text for t in ("resattn_max_pool_grad", "resattn_upsample", "resattn_upsample_grad"))
    assert "resattn_" not in _lowered_text(pool_grad, x.astype(jnp.bfloat16)) + _lowered_text(up_grad, x.astype(jnp.bfloat16))
    with backend.portable():
        pool_xla = lambda v: jax.grad(lambda u: jnp.sum(jnp.sin(max_pool_3x3s2(u))))(v)  # noqa: E731
        up_xla = lambda v: jax.grad(lambda u: jnp.sum(jnp.sin(upsample_bilinear(u, (15, 15)))))(v)  # noqa: E731
        assert "resattn_" not in _lowered_text(pool_xla, x) + _lowered_text(up_xla, x)
        ref_pool, ref_up = jax.jit(pool_xla)(x), jax.jit(up_xla)(x)
    np.testing.assert_allclose(jax.jit(pool_grad)(x), ref_pool, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(up_grad)(x), ref_up, rtol=1e-5, atol=1e-5)


def test_max_pool_second_order_gradient():
    """Reverse-over-reverse through the pool's custom-call gradient matches autodiff of XLA's
    reduce_window pooling (distinct values: no ties)."""
    x = jax.random.normal(jax.random.key(8), (2, 6, 7, 3))
    reference = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2), padding="SAME")

    def grad_norm(pool):
        f = lambda v: jnp.sum(jnp.sin(pool(v)) * jnp.cos(v[:, ::2, ::2]))  # noqa: E731
        return jax.grad(lambda v: jnp.sum(jnp.sin(jax.grad(f)(v))))(x)

    np.testing.assert_allclose(jax.jit(lambda: grad_norm(max_pool_3x3s2))(), grad_norm(reference), rtol=1e-5, atol=1e-5)

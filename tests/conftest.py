"""Shared test set-up: 8 host CPU devices (for data-parallel tests) and shared compiled models."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import resattn_jax  # noqa: E402


def num_elements(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="session")
def tiny():
    """The tiny network with initialised variables and a fixed batch, shared across tests."""
    model = resattn_jax.create_model("tiny")
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3), jnp.float32)
    variables = model.init(jax.random.key(0), images, train=False)
    return model, variables, images

"""Shared test set-up: 8 host CPU devices (for data-parallel tests) and shared compiled models."""

import contextlib
import functools
import os
import signal
import subprocess


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a process this suite starts: ``devices`` host CPU devices (default: one)."""
    return f"--xla_force_host_platform_device_count={devices}" if devices else ""


def child_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a process this suite starts (train.py runs, exports, 2-process runs):
    ``devices`` host CPU devices (default: one, as a plain run), TensorFlow's start-up lines off, and,
    inherited from this process, the shared compilation cache."""
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Image-folder scans are cached here (inherited by the runs tests start), not in ~/.cache.
os.environ.setdefault("RESATTN_JAX_CACHE", __import__("tempfile").mkdtemp(prefix="resattn-jax-folders-"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import resattn_jax  # noqa: E402

# Identical computations recompile in every fresh train_and_evaluate call and in every process a
# test starts (train.py runs, 2-process runs, exports): share compiled executables through JAX's
# persistent cache for this test session, in this process (config) and in its children (environment).
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="resattn-jax-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def num_elements(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=None)
def zoo_counts(name: str, size: int) -> dict[str, int]:
    """Parameters, BatchNorm statistics and multiply-adds of a zoo network at ``size`` (traced, never
    compiled; cached for the session: test_model.py and test_docs.py ask for the same networks)."""
    from resattn_jax.tools.flops import model_macs

    model = resattn_jax.create_model(name)
    shape = (1, size, size, model.in_channels)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    return {"params": num_elements(variables["params"]), "batch_stats": num_elements(variables["batch_stats"]),
            "macs": model_macs(model, variables, shape)}


def digits_config(workdir_steps: int = 6, network: str = "micro", **overrides):
    """``tests/tiny_config.py`` (digits, a few steps of ``network``: micro, small or tiny) with
    dotted-path overrides."""
    import tiny_config

    config = tiny_config.get_config(f"{workdir_steps},{network}")
    for key, value in overrides.items():
        target = config
        *path, leaf = key.split(".")
        for part in path:
            target = target[part]
        target[leaf] = value
    return config


@pytest.fixture(scope="session")
def tiny():
    """The tiny network with initialised variables and a fixed batch, shared across tests."""
    model = resattn_jax.create_model("tiny")
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)
    return model, variables, images


@pytest.fixture(scope="session")
def digits_workdir(tmp_path_factory) -> str:
    """A finished 4-step digits run of the tiny network (three stages; checkpoints at steps 2 and 4),
    shared by the session."""
    from resattn_jax.training import loop as train_lib

    workdir = str(tmp_path_factory.mktemp("digits_run"))
    train_lib.train_and_evaluate(digits_config(4, network="tiny"), workdir)
    return workdir


class ChildProcesses:
    """Processes a test starts, each leading its own process group (a new session), killed with all
    their descendants when the block ends, whether the test passed or failed: no ``train.py`` child
    keeps training after a failed assertion (``kill_all`` runs in ``__exit__``)."""

    def __init__(self):
        self.started: list[subprocess.Popen] = []

    def popen(self, command, **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(command, start_new_session=True, **kwargs)
        self.started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.communicate(timeout=30)  # reaps it and closes its pipes

    def __enter__(self) -> "ChildProcesses":
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()


def live_group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` still alive (zombies awaiting their reaper left out)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited meanwhile
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(int(entry))
    return members


@pytest.fixture
def child_processes():
    """A :class:`ChildProcesses` whose processes are killed when the test ends."""
    with ChildProcesses() as children:
        yield children

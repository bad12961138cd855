"""Seconds per checkpoint save: Orbax's default array handler against ours (training/checkpoint.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/checkpoint_save.py [--rounds 3]

The train state of the tiny network (670 leaves), replicated over every device, saved five times
asynchronously and waited for, by each writer in turn (interleaved rounds): Orbax's standard handler
(replica-parallel for every array on CPU) and :class:`resattn_jax.training.checkpoint.Checkpoints`
(only arrays of at least ``MIN_REPLICA_SLICE_BYTES`` per replica are split). Prints the median.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]  # configs/ and the tests' tiny config
from tiny_config import get_config  # noqa: E402
from flax import serialization  # noqa: E402

from resattn_jax.training import loop, parallel  # noqa: E402
from resattn_jax.training.checkpoint import Checkpoints  # noqa: E402

SAVES = 5


def orbax_default(directory: str, state) -> float:
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=None),
                                    item_names=("state",))
    start = time.perf_counter()
    for step in range(1, SAVES + 1):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
    manager.wait_until_finished()
    seconds = (time.perf_counter() - start) / SAVES
    manager.close()
    return seconds


def ours(directory: str, state) -> float:
    checkpoints = Checkpoints(directory, keep=SAVES)
    start = time.perf_counter()
    for step in range(1, SAVES + 1):
        checkpoints.save(step, state, {"step": step})
    checkpoints.wait()
    seconds = (time.perf_counter() - start) / SAVES
    checkpoints.close()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = get_config("4,tiny")
    info = loop.validate_config(config)
    model = loop.build_model(config, info)
    optimizer, _ = loop.create_optimizer(config.optimizer, config.global_batch_size)
    state = serialization.to_state_dict(loop.create_train_state(model, optimizer, info.image_shape, 0, parallel.make_mesh()))
    print(f"{len(jax.tree.leaves(state))} leaves on {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"{SAVES} saves per round")
    times = {"orbax default": [], "resattn_jax": []}
    for _ in range(args.rounds):
        for name, writer in (("orbax default", orbax_default), ("resattn_jax", ours)):
            times[name].append(writer(tempfile.mkdtemp(prefix="ckpt-bench-"), state))
    for name, values in times.items():
        print(f"{name:14s} {statistics.median(values):.2f} s per save (rounds: {', '.join(f'{v:.2f}' for v in values)})")
    print(f"ratio {statistics.median(times['orbax default']) / statistics.median(times['resattn_jax']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

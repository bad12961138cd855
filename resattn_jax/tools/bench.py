"""Compiled step throughput: a benchmark whose figures can be trusted and compared.

    python -m resattn_jax.bench --model attention56 --image-size 224 --batch-size 8 \\
        [--dtype float32|bfloat16] [--parallel jit|pmap] [--mode train|eval] [--remat] \\
        [--steps 10] [--warmup 2] [--input synthetic|pipeline] [--peak-tflops X] [--profile DIR] [--json]

Method: the step (train: forward, backward and the SGD-Nesterov update of :mod:`resattn_jax.training.loop`; eval: the
library's evaluation step, ``loop.make_eval_step``: the forward pass in evaluation mode and
the masked loss / top-1 / top-5 sums, the state neither donated nor returned) is compiled once, ahead of time, and the compile time reported
separately; ``--warmup`` steps run untimed; then each of ``--steps`` steps is timed on its own,
blocking on its result. ``--input synthetic`` keeps one batch on the devices; ``--input pipeline``
feeds every step from the real input pipeline (in-memory digits, resized as asked), so the figure
includes host work and the transfer.

FLOPs per step: 2 x the multiply-adds of every convolution and matrix product in the traced step
itself (forward, and for a train step the backward pass too), read from its jaxpr by
:mod:`resattn_jax.tools.flops`; with ``--remat`` the recomputed forward is not counted (model FLOPs, the
usual MFU convention; XLA's figure includes it). Beside it: the analytic figure (2 x the forward multiply-adds, x3 for a
train step) and XLA's cost analysis of the compiled step (all devices; it also counts elementwise
work). MFU = achieved FLOP/s over the devices' peak dense FLOP/s for the compute dtype (table below,
or ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import resource
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from resattn_jax.models import create_model
from resattn_jax.ops import backend
from resattn_jax.tools.flops import count_macs, model_macs
from resattn_jax.training import loop, parallel
from resattn_jax.training.optim import create_optimizer, default_optimizer_config

__all__ = ["PEAK_TFLOPS", "run_benchmark", "main"]

#: Peak dense TFLOP/s per device by (device kind substring, compute dtype), from vendor data sheets.
PEAK_TFLOPS = {
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 67.0,
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 67.0,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 19.5,
    ("L4", "bfloat16"): 121.0, ("L4", "float32"): 30.3,
    ("V100", "bfloat16"): 125.0, ("V100", "float32"): 15.7,
    ("TPU v4", "bfloat16"): 275.0, ("TPU v5 lite", "bfloat16"): 197.0, ("TPU v5e", "bfloat16"): 197.0,
    ("TPU v5p", "bfloat16"): 459.0, ("TPU v6", "bfloat16"): 918.0,
}


def _peak(device_kind: str, dtype: str) -> float | None:
    for (kind, peak_dtype), value in PEAK_TFLOPS.items():
        if kind.lower() in device_kind.lower() and peak_dtype == dtype:
            return value
    return None


def _peak_memory(devices) -> int | None:
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    return max(peaks) if peaks and all(p is not None for p in peaks) else None


def _compiled_peak_memory(compiled) -> int | None:
    """Peak device memory of one call of ``compiled`` per device, from XLA's buffer assignment (unlike
    the allocator's process-wide peak, it belongs to this step alone); None where not reported."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend/jaxlib implements it
        return None
    peak = getattr(stats, "peak_memory_in_bytes", None)
    return int(peak) if peak else None


def _peak_host_rss() -> int:
    """Peak resident host memory of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


MODES = ("train", "eval", "input")


def run_benchmark(model: str = "attention56", image_size: int = 224, batch_size: int = 8, dtype: str = "float32",
                  parallel_mode: str = "jit", mode: str = "train", remat: bool = False, steps: int = 10,
                  warmup: int = 2, input_kind: str = "synthetic", peak_tflops: float | None = None,
                  num_classes: int = 1000, devices=None, dataset: str = "digits",
                  mock_examples: int | None = None, profile_dir: str | None = None, profile_steps: int = 3) -> dict:
    """Compile and time one step of ``model``; returns the figures as a JSON-able dict.

    ``mode='input'`` times the input pipeline alone (``dataset`` at its own image size: host
    augmentation, batching and the transfer to the devices); ``mock_examples`` runs it over
    ``tfds.testing.mock_data`` with that many random examples per split instead of prepared files.
    ``profile_dir``: after the timed steps, ``profile_steps`` more run under ``jax.profiler.trace``
    writing there (view with TensorBoard's profile plugin or Perfetto).
    """
    if dtype not in loop.DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {tuple(loop.DTYPES)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if input_kind not in ("synthetic", "pipeline"):
        raise ValueError(f"unknown input {input_kind!r}; choose 'synthetic' or 'pipeline'")
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    if profile_dir is not None and profile_steps < 1:
        raise ValueError(f"need profile_steps >= 1, got {profile_steps}")
    if profile_dir is not None and mode == "input":
        raise ValueError("--profile traces model steps; it does not apply to --mode input")
    if mock_examples is not None and mock_examples < 1:
        raise ValueError(f"--mock-examples must be positive, got {mock_examples}")
    devices = list(devices if devices is not None else jax.devices())
    if batch_size % len(devices):
        raise ValueError(f"batch size {batch_size} does not divide by the {len(devices)} devices")
    mesh = parallel.make_mesh(devices)
    source = contextlib.nullcontext()
    if mock_examples is not None:
        import tensorflow_datasets as tfds  # noqa: PLC0415

        source = tfds.testing.mock_data(num_examples=mock_examples)
    with source:
        return _run(model, image_size, batch_size, dtype, parallel_mode, mode, remat, steps, warmup, input_kind,
                    peak_tflops, num_classes, devices, mesh, dataset, profile_dir, profile_steps)


def _time_steps(run_one: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``run_one`` (which blocks on its result) after ``warmup``."""
    for _ in range(warmup):
        run_one()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_one()
        times.append(time.perf_counter() - start)
    return times


def _run(model, image_size, batch_size, dtype, parallel_mode, mode, remat, steps, warmup, input_kind,
         peak_tflops, num_classes, devices, mesh, dataset, profile_dir=None, profile_steps=3) -> dict:
    figures = {"compile_s": 0.0, "flops_per_step": None, "analytic_flops_per_step": None,
               "xla_flops_per_step": None, "flops_source": None, "compiled_peak_memory_bytes": None,
               "profile_dir": profile_dir, "profile_error": None, "params": None, "macs_per_image": None}
    if mode == "input":
        batches = _pipeline_batches(dataset, batch_size, None, num_classes, mesh)
        image_size = next(batches)["image"].shape[1]
        times = _time_steps(lambda: jax.block_until_ready(next(batches)), steps, warmup)
        model, input_kind = None, "pipeline"
    else:
        axis = parallel.AXIS if parallel_mode == "pmap" else None
        net = create_model(model, num_classes=num_classes, dtype=loop.DTYPES[dtype], remat=remat, bn_axis_name=axis)
        optimizer, schedule = create_optimizer(default_optimizer_config(), batch_size)
        image_shape = (image_size, image_size, 3)
        state = loop.create_train_state(net, optimizer, image_shape, 0, mesh)
        if mode == "train":
            step = parallel.compile_step(loop.make_train_step(schedule, axis), parallel_mode, mesh)
        else:  # the library's evaluation step: masked loss / top-1 / top-5 sums, no state returned
            step = parallel.compile_eval_step(loop.make_eval_step(axis), parallel_mode, mesh)
        if input_kind == "synthetic":
            batches = _synthetic_batches(batch_size, image_shape, num_classes, mesh)
        else:
            batches = _pipeline_batches(dataset, batch_size, image_shape, num_classes, mesh)
        first = next(batches)
        start = time.perf_counter()
        compiled = step.lower(state, first).compile()
        figures["compile_s"] = time.perf_counter() - start
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        # XLA counts one device.
        figures["xla_flops_per_step"] = float(cost.get("flops", 0.0)) * len(devices) if cost else None
        figures["compiled_peak_memory_bytes"] = _compiled_peak_memory(compiled)
        # The traced step on the global batch (the 'jit' form: per-device steps compute the same
        # math), without remat: model FLOPs, recomputation not counted (the usual MFU convention).
        global_state = state.replace(apply_fn=net.clone(bn_axis_name=None, remat=False).apply)
        traced = loop.make_train_step(schedule) if mode == "train" else loop.make_eval_step()
        figures["flops_per_step"] = 2.0 * count_macs(traced, global_state, first)
        figures["flops_source"] = "2 x conv/matmul multiply-adds of the traced step (remat recomputation not counted)"
        macs = model_macs(net, jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, *image_shape)))),
                          (batch_size, *image_shape))
        figures["analytic_flops_per_step"] = 2.0 * macs * (3 if mode == "train" else 1)
        figures["macs_per_image"] = macs // batch_size
        figures["params"] = sum(x.size for x in jax.tree.leaves(state.params))
        current = {"state": state, "batch": first}

        def run_one():
            if mode == "train":
                current["state"], out = compiled(current["state"], current["batch"])
            else:
                out = compiled(current["state"], current["batch"])
            jax.block_until_ready(out)
            if input_kind == "pipeline":
                current["batch"] = next(batches)

        times = _time_steps(run_one, steps, warmup)
        if profile_dir is not None:  # a failed trace (no CUPTI, say) costs the trace, not the figures
            try:
                with jax.profiler.trace(profile_dir):
                    for _ in range(profile_steps):
                        run_one()
            except Exception as e:  # noqa: BLE001
                figures["profile_error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"

    median = statistics.median(times)
    flops = figures["flops_per_step"]
    achieved = flops / median / 1e12 if flops else None
    device_kind = devices[0].device_kind
    peak = peak_tflops if peak_tflops is not None else _peak(device_kind, dtype)
    peak_total = peak * len(devices) if peak else None
    return {
        "model": model, "image_size": image_size, "batch_size": batch_size, "dtype": dtype, "mode": mode,
        "parallel": parallel_mode, "remat": remat, "input": input_kind,
        "dataset": dataset if input_kind == "pipeline" else None, "steps": steps, "warmup": warmup,
        "images_per_sec": batch_size / median, "images_per_sec_per_device": batch_size / median / len(devices),
        "step_ms_median": median * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
        "step_ms_stdev": statistics.pstdev(times) * 1e3, **figures, "tflops_per_sec": achieved,
        "peak_tflops_per_device": peak, "mfu": achieved / peak_total if achieved and peak_total else None,
        "peak_memory_bytes": _peak_memory(devices), "device_kind": device_kind, "num_devices": len(devices),
        "backend": jax.default_backend(), "jax_version": jax.__version__, "jaxlib_version": jax.lib.__version__,
        "compiler_options": backend.compiler_options(devices, "train" if mode == "train" else "eval"),
        "peak_host_rss_bytes": _peak_host_rss(),
    }


def _synthetic_batches(batch_size: int, image_shape, num_classes: int, mesh):
    """One random batch generated on the devices, yielded forever (it never leaves them)."""
    sharding = parallel.batch_sharded(mesh)
    images = jax.jit(lambda k: jax.random.normal(k, (batch_size, *image_shape)), out_shardings=sharding)(
        jax.random.key(0))
    labels = jax.jit(lambda k: jax.random.randint(k, (batch_size,), 0, num_classes), out_shardings=sharding)(
        jax.random.key(1))
    mask = jax.device_put(np.ones((batch_size,), bool), sharding)
    while True:
        yield {"image": images, "label": labels, "mask": mask}


def _pipeline_batches(dataset: str, batch_size: int, image_shape, num_classes: int, mesh):
    """Augmented training batches of ``dataset`` from the library's input pipeline, on the devices.

    With ``image_shape`` given, images are tiled and cropped to it (e.g. 32x32 digits to 224x224x3
    for an ImageNet network); with ``None`` they keep the dataset's own shape.
    """
    from resattn_jax.training import data  # noqa: PLC0415 - the input pipeline imports TensorFlow

    cfg = data.data_preset(dataset)
    for batch in data.train_batches(cfg, batch_size, seed=0):
        images = batch["image"]
        if image_shape is not None and images.shape[1:] != tuple(image_shape):
            size = image_shape[0]
            reps = (1, -(-size // images.shape[1]), -(-size // images.shape[2]),
                    -(-image_shape[2] // images.shape[3]))
            images = np.tile(images, reps)[:, :size, :size, : image_shape[2]]
        yield parallel.shard_batch({"image": images, "label": batch["label"] % num_classes,
                                    "mask": np.ones(len(images), bool)}, mesh)


def _format(result: dict) -> str:
    def num(value, fmt):
        return format(value, fmt) if value is not None else "n/a"
    size = f"{result['image_size']}x{result['image_size']}"
    if result["mode"] == "input":
        title = (f"{result['dataset']} input pipeline alone: augmented {size} training batches of "
                 f"{result['batch_size']}, delivered to the devices")
    else:
        title = (f"{result['model']} {result['mode']} {size} batch {result['batch_size']} {result['dtype']} "
                 f"parallel={result['parallel']} remat={result['remat']} input={result['input']}"
                 + (f" ({result['dataset']})" if result["dataset"] else ""))
    lines = [
        title,
        f"device: {result['num_devices']} x {result['device_kind']} ({result['backend']}), "
        f"jax {result['jax_version']} / jaxlib {result['jaxlib_version']}, "
        f"compiler options {result['compiler_options'] or 'none'}, host memory retained "
        f"{result.get('host_memory_retained', 'n/a')}",
        f"compile: {result['compile_s']:.1f} s",
        f"step: median {result['step_ms_median']:.1f} ms (min {result['step_ms_min']:.1f}, max "
        f"{result['step_ms_max']:.1f}, stdev {result['step_ms_stdev']:.1f}) over {result['steps']} steps",
        f"throughput: {result['images_per_sec']:.2f} images/s ({result['images_per_sec_per_device']:.2f} per device)",
    ]
    if result["flops_per_step"] is not None:
        lines.append(
            f"FLOPs/step: {result['flops_per_step']:.4g} ({result['flops_source']}; analytic "
            f"{result['analytic_flops_per_step']:.4g}, XLA {num(result['xla_flops_per_step'], '.4g')}) -> "
            f"{result['tflops_per_sec']:.3f} TFLOP/s, MFU "
            f"{num(result['mfu'], '.1%')} (peak {num(result['peak_tflops_per_device'], '.1f')} TFLOP/s/device)")
    step_peak = result.get("compiled_peak_memory_bytes")
    lines.append(f"peak memory: {num(result['peak_memory_bytes'] and result['peak_memory_bytes'] / 2**30, '.2f')} GiB "
                 f"on the device (this step alone, XLA's buffer assignment: {num(step_peak and step_peak / 2**30, '.2f')}"
                 f" GiB), {result['peak_host_rss_bytes'] / 2**30:.2f} GiB resident on the host")
    if result.get("profile_dir"):
        lines.append(f"profile: {result['profile_error'] or 'trace of the steps after the timed ones'} "
                     f"({result['profile_dir']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resattn_jax.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="attention56")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=tuple(loop.DTYPES))
    parser.add_argument("--parallel", default="jit", choices=parallel.PARALLEL_MODES)
    parser.add_argument("--mode", default="train", choices=MODES,
                        help="'input': time the input pipeline alone (no model), at the dataset's image size")
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--input", default="synthetic", choices=("synthetic", "pipeline"))
    parser.add_argument("--dataset", default="digits",
                        help="dataset of --input pipeline / --mode input (a data preset: digits, cifar10, ...)")
    parser.add_argument("--mock-examples", type=int, default=None,
                        help="read the dataset from tfds.testing.mock_data with this many examples per split")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s per device, for MFU")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after the timed steps, trace --profile-steps more with jax.profiler into DIR")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = parser.parse_args(argv)
    try:
        retained = backend.tune_host_memory()  # before JAX starts its backend threads (CPU runs only)
        result = run_benchmark(args.model, args.image_size, args.batch_size, args.dtype, args.parallel, args.mode,
                               args.remat, args.steps, args.warmup, args.input, args.peak_tflops, args.num_classes,
                               dataset=args.dataset, mock_examples=args.mock_examples, profile_dir=args.profile,
                               profile_steps=args.profile_steps)
    except ValueError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    result["host_memory_retained"] = retained
    print(json.dumps(result) if args.json else _format(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

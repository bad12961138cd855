"""Compiled step throughput: a benchmark whose figures can be trusted and compared.

    python -m resattn_jax.bench --model attention56 --image-size 224 --batch-size 8 \\
        [--dtype float32|bfloat16] [--parallel jit|pmap] [--mode train|eval] [--remat] \\
        [--steps 10] [--warmup 2] [--input synthetic|pipeline] [--peak-tflops X] [--json]

Method: the step (train: forward, backward and the SGD-Nesterov update of ``train_lib``; eval: the
forward pass in evaluation mode) is compiled once, ahead of time, and the compile time reported
separately; ``--warmup`` steps run untimed; then each of ``--steps`` steps is timed on its own,
blocking on its result. ``--input synthetic`` keeps one batch on the devices; ``--input pipeline``
feeds every step from the real input pipeline (in-memory digits, resized as asked), so the figure
includes host work and the transfer.

FLOPs per step: 2 x the multiply-adds of every convolution and matrix product in the traced step
itself (forward, and for a train step the backward pass too), read from its jaxpr by
:mod:`resattn_jax.flops`. Beside it: the analytic figure (2 x the forward multiply-adds, x3 for a
train step) and XLA's cost analysis of the compiled step (all devices; it also counts elementwise
work). MFU = achieved FLOP/s over the devices' peak dense FLOP/s for the compute dtype (table below,
or ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from resattn_jax import parallel
from resattn_jax.flops import count_macs, model_macs
from resattn_jax.optim import create_optimizer, default_optimizer_config
from resattn_jax.zoo import create_model

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
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _peak(device_kind: str, dtype: str) -> float | None:
    for (kind, peak_dtype), value in PEAK_TFLOPS.items():
        if kind.lower() in device_kind.lower() and peak_dtype == dtype:
            return value
    return None


def _peak_memory(devices) -> int | None:
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    return max(peaks) if peaks and all(p is not None for p in peaks) else None


def run_benchmark(model: str = "attention56", image_size: int = 224, batch_size: int = 8, dtype: str = "float32",
                  parallel_mode: str = "jit", mode: str = "train", remat: bool = False, steps: int = 10,
                  warmup: int = 2, input_kind: str = "synthetic", peak_tflops: float | None = None,
                  num_classes: int = 1000, devices=None) -> dict:
    """Compile and time one step of ``model``; returns the figures as a JSON-able dict."""
    from resattn_jax import train_lib  # noqa: PLC0415

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {tuple(DTYPES)}")
    if mode not in ("train", "eval"):
        raise ValueError(f"unknown mode {mode!r}; choose 'train' or 'eval'")
    if input_kind not in ("synthetic", "pipeline"):
        raise ValueError(f"unknown input {input_kind!r}; choose 'synthetic' or 'pipeline'")
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    devices = list(devices if devices is not None else jax.devices())
    if batch_size % len(devices):
        raise ValueError(f"batch size {batch_size} does not divide by the {len(devices)} devices")
    mesh = parallel.make_mesh(devices)
    axis = parallel.AXIS if parallel_mode == "pmap" else None
    net = create_model(model, num_classes=num_classes, dtype=DTYPES[dtype], remat=remat, bn_axis_name=axis)
    optimizer, schedule = create_optimizer(default_optimizer_config(), batch_size)
    image_shape = (image_size, image_size, 3)
    state = train_lib.create_train_state(net, optimizer, image_shape, 0, mesh)

    if mode == "train":
        step = parallel.compile_step(train_lib.make_train_step(schedule, axis), parallel_mode, mesh)
    else:
        step = parallel.compile_step(_eval_forward(axis), parallel_mode, mesh, donate=False)

    batches = _batches(input_kind, batch_size, image_shape, num_classes, mesh)
    first = next(batches)
    start = time.perf_counter()
    compiled = step.lower(state, first).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) * len(devices) if cost else None  # XLA counts one device
    # The traced step on the global batch (the 'jit' form: per-device steps compute the same math).
    global_state = state.replace(apply_fn=net.clone(bn_axis_name=None).apply)
    traced = train_lib.make_train_step(schedule) if mode == "train" else _eval_forward(None)
    flops = 2.0 * count_macs(traced, global_state, first)
    macs = model_macs(net, jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, *image_shape)))),
                      (batch_size, *image_shape))
    analytic_flops = 2.0 * macs * (3 if mode == "train" else 1)

    batch = first
    for _ in range(warmup):
        state, out = compiled(state, batch)
        jax.block_until_ready(out)
        batch = next(batches) if input_kind == "pipeline" else batch
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        if input_kind == "pipeline":
            batch = next(batches)
        state, out = compiled(state, batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)

    median = statistics.median(times)
    achieved = flops / median / 1e12
    device_kind = devices[0].device_kind
    peak = peak_tflops if peak_tflops is not None else _peak(device_kind, dtype)
    peak_total = peak * len(devices) if peak else None
    return {
        "model": model, "image_size": image_size, "batch_size": batch_size, "dtype": dtype, "mode": mode,
        "parallel": parallel_mode, "remat": remat, "input": input_kind, "steps": steps, "warmup": warmup,
        "images_per_sec": batch_size / median, "images_per_sec_per_device": batch_size / median / len(devices),
        "step_ms_median": median * 1e3, "step_ms_min": min(times) * 1e3, "step_ms_max": max(times) * 1e3,
        "step_ms_stdev": statistics.pstdev(times) * 1e3, "compile_s": compile_s,
        "flops_per_step": flops, "flops_source": "2 x conv/matmul multiply-adds of the traced step",
        "analytic_flops_per_step": analytic_flops, "xla_flops_per_step": xla_flops, "tflops_per_sec": achieved,
        "peak_tflops_per_device": peak, "mfu": achieved / peak_total if peak_total else None,
        "peak_memory_bytes": _peak_memory(devices), "device_kind": device_kind, "num_devices": len(devices),
        "backend": jax.default_backend(), "jax_version": jax.__version__, "jaxlib_version": jax.lib.__version__,
    }


def _eval_forward(axis: str | None):
    """``(state, batch) -> (state, {'logits_sum'})``: the evaluation-mode forward pass."""

    def forward(state, batch):
        logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, batch["image"],
                                train=False)
        total = jnp.sum(logits)
        return state, {"logits_sum": jax.lax.pmean(total, axis) if axis else total}

    return forward


def _batches(kind: str, batch_size: int, image_shape, num_classes: int, mesh):
    if kind == "synthetic":  # generated on the devices, never leaves them
        sharding = parallel.batch_sharded(mesh)
        images = jax.jit(lambda k: jax.random.normal(k, (batch_size, *image_shape)), out_shardings=sharding)(
            jax.random.key(0))
        labels = jax.jit(lambda k: jax.random.randint(k, (batch_size,), 0, num_classes), out_shardings=sharding)(
            jax.random.key(1))
        while True:
            yield {"image": images, "label": labels}
    from resattn_jax import data  # noqa: PLC0415

    cfg = data.data_preset("digits")
    size = image_shape[0]
    for batch in data.train_batches(cfg, batch_size, seed=0):
        images = batch["image"]
        if images.shape[1:] != image_shape:  # digits are 32x32x1: tile to the asked shape
            reps = (1, -(-size // images.shape[1]), -(-size // images.shape[2]), image_shape[2] // images.shape[3])
            images = np.tile(images, reps)[:, :size, :size]
        yield parallel.shard_batch({"image": images, "label": batch["label"] % num_classes}, mesh)


def _format(result: dict) -> str:
    def num(value, fmt):
        return format(value, fmt) if value is not None else "n/a"
    return "\n".join([
        f"{result['model']} {result['mode']} {result['image_size']}x{result['image_size']} batch "
        f"{result['batch_size']} {result['dtype']} parallel={result['parallel']} remat={result['remat']} "
        f"input={result['input']}",
        f"device: {result['num_devices']} x {result['device_kind']} ({result['backend']}), "
        f"jax {result['jax_version']} / jaxlib {result['jaxlib_version']}",
        f"compile: {result['compile_s']:.1f} s",
        f"step: median {result['step_ms_median']:.1f} ms (min {result['step_ms_min']:.1f}, max "
        f"{result['step_ms_max']:.1f}, stdev {result['step_ms_stdev']:.1f}) over {result['steps']} steps",
        f"throughput: {result['images_per_sec']:.2f} images/s ({result['images_per_sec_per_device']:.2f} per device)",
        f"FLOPs/step: {result['flops_per_step']:.4g} ({result['flops_source']}; analytic "
        f"{result['analytic_flops_per_step']:.4g}, XLA {num(result['xla_flops_per_step'], '.4g')}) -> "
        f"{result['tflops_per_sec']:.3f} TFLOP/s, MFU "
        f"{num(result['mfu'], '.1%')} (peak {num(result['peak_tflops_per_device'], '.1f')} TFLOP/s/device)",
        f"peak memory: {num(result['peak_memory_bytes'] and result['peak_memory_bytes'] / 2**30, '.2f')} GiB",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resattn_jax.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="attention56")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--parallel", default="jit", choices=parallel.PARALLEL_MODES)
    parser.add_argument("--mode", default="train", choices=("train", "eval"))
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--input", default="synthetic", choices=("synthetic", "pipeline"))
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s per device, for MFU")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = parser.parse_args(argv)
    try:
        result = run_benchmark(args.model, args.image_size, args.batch_size, args.dtype, args.parallel, args.mode,
                               args.remat, args.steps, args.warmup, args.input, args.peak_tflops, args.num_classes)
    except ValueError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else _format(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

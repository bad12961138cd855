"""The whole GPU story in one run: numerics against the host CPU, Attention-56 step figures, per-op choices.

    python benchmarks/device_check.py --out DIR [--profile] [--budget-s 450]   # on one GPU (or TPU)
    python benchmarks/device_check.py --dry-run --out DIR [--profile]           # the same on this CPU, micro network

Writes ``DIR/results.jsonl`` (one JSON object per measurement, written as it is made, so a run cut
short keeps what it measured) and ``DIR/summary.md`` (the same as Markdown tables, rewritten after
every measurement, whole). Sections, in this order:

1. ``numerics``: one float32 training step of a small CIFAR network (``cifar_attention56``, batch
   32) from the same initial state and batch on the accelerator and on the host CPU (traced without
   the CPU custom calls, i.e. XLA's formulas; matrix products at ``highest`` precision, so that no
   TF32 enters). Parameters, batch statistics and loss must agree within 1e-4 relative
   (``||a - b|| / ||b||`` over each whole vector), and the parameter *updates* (the gradients, which
   the parameters dilute) within 1e-2: where two forward passes differ in the last bit, a near-tie
   in a max-pool window routes a gradient the other way (both valid subgradients), which moved the
   update by 4.7e-3 between the CPU custom calls and XLA's formulas on one CPU; a wrong custom VJP
   (max-pooling, up-sampling, batch norm) moves it by far more. The worst single leaf is reported.
2. ``train``: Attention-56 at 224x224 through :func:`resattn_jax.tools.bench.run_benchmark`
   (synthetic batches on the device), bfloat16 train at batch 32, 64, 128, 256, stopping at the
   first out-of-memory: images/s, step ms, compile s, TFLOP/s, MFU, the step's own peak memory
   (XLA's buffer assignment) and the allocator's peak so far.
3. ``op``: per-op alternatives at Attention-56's shapes in bfloat16 (batch 256, so that kernels,
   not dispatch, are timed), forward + backward (one jitted VJP), about ``--op-seconds`` each: our
   up-sampling against a dense interpolation-matrix product and ``jax.image``; our max-pool VJP
   against ``lax.reduce_window`` autodiff; our batch norm (+ReLU) against ``flax.linen.BatchNorm``;
   1x1 convolution as ``dot_general`` (ours) against ``lax.conv_general_dilated``. ``speedup`` is
   ours / theirs in time (> 1: the alternative is faster).
4. ``train`` / ``eval`` again: float32 train at 64 (TF32 at JAX's default precision on a GPU),
   bfloat16 eval at 256, and the fastest bfloat16 batch with ``remat``.
5. ``profile`` (with ``--profile``), last: 2 bfloat16 train steps of the fastest batch traced by
   ``python -m resattn_jax.bench --profile`` in a child process (a profiler crash costs nothing
   measured), gzipped, flat in ``DIR`` as ``profile-b<batch>-*.gz``, trimmed to 16 MiB.

The clock starts with the script; a measurement that would end after ``--budget-s`` (estimated
from the longest step benchmark so far) is recorded as skipped instead, so one call fits a
15-minute device lease with time to rerun. ``--dry-run`` runs the same code on the CPU with the
micro network and tiny batches (CI runs it: tests/test_device_check.py). Exit status 1 if the
numerics disagree or a measurement failed (out-of-memory is a result, not a failure).
"""

from __future__ import annotations

import time

START = time.perf_counter()  # the budget counts the imports and the backend's start-up too

import argparse
import datetime
import gc
import gzip
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree, not an installed copy

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from resattn_jax import ops  # noqa: E402
from resattn_jax.models import create_model  # noqa: E402
from resattn_jax.ops import backend  # noqa: E402
from resattn_jax.tools import bench  # noqa: E402
from resattn_jax.tools.bench_upsample import upsample_jax_image, upsample_matrices  # noqa: E402
from resattn_jax.training import loop, parallel  # noqa: E402
from resattn_jax.training.optim import create_optimizer, default_optimizer_config  # noqa: E402

STATUSES = ("ok", "oom", "fail", "error", "skipped")
SECTIONS = ("environment", "numerics", "train", "eval", "op", "profile")
TOLERANCE = 1e-4
#: Parameter updates (one SGD step): XLA:CPU's fast paths against its portable formulas on the same
#: CPU differ by 4.7e-3 (tiny network, batch 4: a max-pool near-tie routed the other way); a wrong
#: VJP moves them by far more.
UPDATE_TOLERANCE = 1e-2
PROFILE_LIMIT_BYTES = 16 * 2**20

#: What each run measures: the full plan on an accelerator, the micro network's for ``--dry-run``.
PLANS = {
    "device": {
        "numerics": {"model": "cifar_attention56", "image_size": 32, "batch_size": 32, "num_classes": 10},
        "bench": {"model": "attention56", "image_size": 224, "num_classes": 1000, "steps": 10, "warmup": 2},
        "train_batches": (32, 64, 128, 256), "float32_batch": 64, "eval_batch": 256,
        # Batch 256 for the ops: small shapes at 64 would time the dispatch, not the kernels.
        "op_batch": 256, "op_seconds": 0.3,
        # (input shape without the batch, output size or channels) at Attention-56 / 224.
        "upsample": [((28, 28, 256), 56), ((14, 14, 512), 28), ((7, 7, 1024), 14)],
        "maxpool": [(112, 112, 64), (56, 56, 256), (28, 28, 512)],
        "batchnorm": [(56, 56, 64), (56, 56, 256), (28, 28, 512), (14, 14, 1024)],
        "conv1x1": [((56, 56, 256), 64), ((56, 56, 64), 256), ((14, 14, 1024), 256)],
    },
    "dry-run": {
        "numerics": {"model": "micro", "image_size": 32, "batch_size": 4, "num_classes": 10},
        "bench": {"model": "micro", "image_size": 32, "num_classes": 10, "steps": 2, "warmup": 1},
        "train_batches": (2,), "float32_batch": 2, "eval_batch": 2,
        "op_batch": 2, "op_seconds": 0.01,
        "upsample": [((4, 4, 16), 8)],
        "maxpool": [(8, 8, 16)],
        "batchnorm": [(8, 8, 16)],
        "conv1x1": [((8, 8, 16), 8)],
    },
}


class Report:
    """Appends records to ``results.jsonl`` and keeps ``summary.md`` current; prints one line each."""

    def __init__(self, out: Path, dry_run: bool, budget_s: float):
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.dry_run, self.budget_s = out, dry_run, budget_s
        self.start = START
        self.records: list[dict] = []
        self.longest_step_s = 0.0  # the longest step benchmark so far: the estimate of the next one
        self.jsonl = out / "results.jsonl"
        self.jsonl.write_text("")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, estimate_s: float = 0.0) -> bool:
        """Whether something expected to take ``estimate_s`` would end past the budget."""
        return self.elapsed() + estimate_s > self.budget_s

    def add(self, section: str, name: str, status: str, **fields) -> dict:
        assert section in SECTIONS and status in STATUSES, (section, status)
        record = {"section": section, "name": name, "status": status, "elapsed_s": round(self.elapsed(), 2),
                  "dry_run": self.dry_run, **fields}
        self.records.append(record)
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
        partial = self.out / "summary.md.partial"  # replaced whole: a kill mid-write leaves the last table
        partial.write_text(render_markdown(self.records), encoding="utf-8")
        os.replace(partial, self.out / "summary.md")
        detail = f" ({fields['error']})" if "error" in fields else ""
        print(f"[{record['elapsed_s']:7.1f} s] {section:<11} {name:<40} {status}{detail}", flush=True)
        return record

    def skip(self, section: str, name: str, estimate_s: float = 0.0) -> None:
        self.add(section, name, "skipped", error=f"would end past the time budget of {self.budget_s:.0f} s "
                                                 f"(now {self.elapsed():.0f} s, about {estimate_s:.0f} s needed)")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}"
    return any(sign in text for sign in ("RESOURCE_EXHAUSTED", "ALLOC_FAILED", "Failed to allocate")) or \
        "out of memory" in text.lower()


def _one_line(error: BaseException) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:300]}"


# ----------------------------------------------------------------------------------------- environment
def environment(report: Report) -> None:
    devices = jax.devices()
    versions = {}
    for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    report.add("environment", "environment", "ok", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               platform=devices[0].platform, device_kind=devices[0].device_kind, num_devices=len(devices),
               versions=versions, python=platform.python_version(), host_cpus=os.cpu_count(),
               xla_flags=os.environ.get("XLA_FLAGS", ""),
               mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))


# ----------------------------------------------------------------------------------------- numerics
def _global_error(a, b) -> float:
    """``||a - b|| / ||b||`` over all leaves of two pytrees of the same structure (the whole vector)."""
    diff = sum(float(np.sum(np.square(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    norm = sum(float(np.sum(np.square(np.asarray(y, np.float64)))) for y in jax.tree.leaves(b))
    return float(np.sqrt(diff / norm)) if norm > 0 else float(np.sqrt(diff))


def _leaf_errors(a, b) -> dict[str, float]:
    """``{leaf path: max |a - b| / max |b|}`` over two pytrees of the same structure (host arrays)."""
    errors = {}
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = np.max(np.abs(y)) if y.size else 0.0
        errors[jax.tree_util.keystr(path)] = float(np.max(np.abs(x - y)) / scale) if scale > 0 else float(
            np.max(np.abs(x - y), initial=0.0))
    return errors


def _worst(errors: dict[str, float]) -> tuple[float, str]:
    leaf = max(errors, key=errors.get)
    return errors[leaf], leaf


def numerics(report: Report, plan: dict) -> bool:
    """One train step on the accelerator and on the host CPU from the same state and batch."""
    cfg = plan["numerics"]
    name = f"{cfg['model']} float32 train step, batch {cfg['batch_size']}: accelerator vs host CPU"
    accel, host = jax.devices()[0], jax.devices("cpu")[0]
    net = create_model(cfg["model"], num_classes=cfg["num_classes"])
    optimizer, schedule = create_optimizer(default_optimizer_config(), cfg["batch_size"])
    image_shape = (cfg["image_size"], cfg["image_size"], 3)
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((cfg["batch_size"], *image_shape), np.float32),
             "label": rng.integers(0, cfg["num_classes"], cfg["batch_size"]).astype(np.int32),
             "mask": np.ones(cfg["batch_size"], bool)}
    host_mesh, accel_mesh = parallel.make_mesh([host]), parallel.make_mesh([accel])
    with backend.portable():  # the host's reference: XLA's formulas, no CPU custom calls
        initial = jax.device_get(loop.create_train_state(net, optimizer, image_shape, 0, host_mesh))
    results = {}
    with jax.default_matmul_precision("highest"):
        for where, mesh in (("accelerator", accel_mesh), ("host", host_mesh)):
            state = jax.device_put(initial, parallel.replicated(mesh))
            step = parallel.compile_step(loop.make_train_step(schedule), "jit", mesh, donate=False)
            if where == "host":
                with backend.portable():
                    new_state, metrics = step(state, parallel.shard_batch(batch, mesh))
            else:
                new_state, metrics = step(state, parallel.shard_batch(batch, mesh))
            results[where] = jax.device_get((new_state.params, new_state.batch_stats, metrics["loss"]))
    (p_a, s_a, loss_a), (p_h, s_h, loss_h) = results["accelerator"], results["host"]
    update = lambda p: jax.tree.map(lambda new, old: np.asarray(new, np.float64) - old, p, initial.params)  # noqa: E731
    errors = {"params": _global_error(p_a, p_h), "batch_stats": _global_error(s_a, s_h),
              "loss": abs(float(loss_a) - float(loss_h)) / abs(float(loss_h)),
              "update": _global_error(update(p_a), update(p_h))}
    leaves = {"params": _worst(_leaf_errors(p_a, p_h)), "batch_stats": _worst(_leaf_errors(s_a, s_h)),
              "update": _worst(_leaf_errors(update(p_a), update(p_h)))}
    passed = all(errors[k] <= TOLERANCE for k in ("params", "batch_stats", "loss")) and \
        errors["update"] <= UPDATE_TOLERANCE
    report.add("numerics", name, "ok" if passed else "fail", model=cfg["model"], batch_size=cfg["batch_size"],
               accelerator=accel.device_kind, host=host.device_kind, loss_accelerator=float(loss_a),
               loss_host=float(loss_h), tolerance=TOLERANCE, update_tolerance=UPDATE_TOLERANCE, passed=passed,
               rel_error=errors,
               worst_leaf_rel_error={k: v[0] for k, v in leaves.items()},
               worst_leaf={k: v[1] for k, v in leaves.items()})
    return passed


# ----------------------------------------------------------------------------------------- step benchmarks
def _bench(report: Report, plan: dict, section: str, label: str, **kwargs) -> dict:
    cfg = plan["bench"]
    name = f"{cfg['model']} {label}"
    estimate = report.longest_step_s * (1.5 if kwargs.get("remat") else 1.2)
    if report.over_budget(estimate):
        report.skip(section, name, estimate)
        return {"status": "skipped"}
    started = time.perf_counter()
    try:
        result = bench.run_benchmark(cfg["model"], cfg["image_size"], steps=cfg["steps"], warmup=cfg["warmup"],
                                     num_classes=cfg["num_classes"], devices=jax.devices()[:1], **kwargs)
    except Exception as e:  # noqa: BLE001 - record and go on: one failure must not cost the lease
        gc.collect()  # drop what the failed step held before the next one allocates
        return report.add(section, name, "oom" if _is_oom(e) else "error", error=_one_line(e), **kwargs)
    finally:
        report.longest_step_s = max(report.longest_step_s, time.perf_counter() - started)
    if result.get("dtype") == "float32" and result.get("backend") == "gpu":
        # XLA:GPU runs float32 convolutions and products in TF32 at JAX's default precision.
        result["note"] = "float32 at JAX's default precision: TF32 tensor cores; MFU against the FP32 peak"
    return report.add(section, name, "ok", **result)


def bf16_sweep(report: Report, plan: dict) -> dict | None:
    """bfloat16 train steps at growing batches up to the first out-of-memory; returns the fastest."""
    best = None
    for batch in plan["train_batches"]:
        record = _bench(report, plan, "train", f"bfloat16 train batch {batch}", batch_size=batch, dtype="bfloat16")
        if record["status"] != "ok":
            break
        if best is None or record["images_per_sec"] > best["images_per_sec"]:
            best = record
    return best


def other_steps(report: Report, plan: dict, best: dict | None) -> None:
    """float32 train, bfloat16 eval, and the fastest bfloat16 batch again with remat."""
    _bench(report, plan, "train", f"float32 train batch {plan['float32_batch']}", batch_size=plan["float32_batch"],
           dtype="float32")
    _bench(report, plan, "eval", f"bfloat16 eval batch {plan['eval_batch']}", batch_size=plan["eval_batch"],
           dtype="bfloat16", mode="eval")
    if best is not None:
        _bench(report, plan, "train", f"bfloat16 train batch {best['batch_size']} remat", batch_size=best["batch_size"],
               dtype="bfloat16", remat=True)


def profile(report: Report, plan: dict, out: Path, batch: int) -> None:
    """Trace 2 steps at ``batch`` in a child process (a profiler crash there costs nothing measured
    here), last of all; keep the trace gzipped, flat in ``out`` and under 16 MiB."""
    cfg = plan["bench"]
    name = f"{cfg['model']} bfloat16 train batch {batch}: 2 steps traced"
    estimate = report.longest_step_s * 1.2 + 15
    if report.over_budget(estimate):
        report.skip("profile", name, estimate)
        return
    trace = out / "profile.tmp"
    shutil.rmtree(trace, ignore_errors=True)
    command = [sys.executable, "-m", "resattn_jax.bench", "--model", cfg["model"], "--image-size",
               str(cfg["image_size"]), "--batch-size", str(batch), "--dtype", "bfloat16", "--steps", "1",
               "--warmup", "1", "--num-classes", str(cfg["num_classes"]), "--profile", str(trace),
               "--profile-steps", "2", "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=max(report.budget_s - report.elapsed(), 60))
        result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        proc, result = None, {"profile_error": _one_line(e)}
    error = result.get("profile_error") or (None if proc is None or proc.returncode == 0 else
                                            f"exit status {proc.returncode}: {proc.stderr.strip()[-300:]}")
    kept, dropped = _fit_profile(trace, PROFILE_LIMIT_BYTES) if trace.exists() else ({}, [])
    files = []
    for relative in sorted(kept):  # flat beside results.jsonl: the device tool brings back shallow files only
        target = out / f"profile-b{batch}-{Path(relative).name}"
        (trace / relative).rename(target)
        files.append(target.name)
    shutil.rmtree(trace, ignore_errors=True)
    if error or not files:
        report.add("profile", name, "error", error=error or "the trace wrote no file under 16 MiB", dropped=dropped)
        return
    report.add("profile", name, "ok", path=str(out), bytes=sum(kept.values()), files=files, dropped=dropped)


def _fit_profile(root: Path, limit: int) -> tuple[dict[str, int], list[str]]:
    """Gzip the trace's files, then drop the largest until the rest fit in ``limit`` bytes."""
    for path in [p for p in root.rglob("*") if p.is_file() and p.suffix != ".gz"]:
        with path.open("rb") as src, gzip.open(f"{path}.gz", "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()
    files = {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}
    dropped = []
    while files and sum(files.values()) > limit:
        largest = max(files, key=files.get)
        (root / largest).unlink()
        dropped.append(largest)
        del files[largest]
    return files, dropped


# ----------------------------------------------------------------------------------------- per-op alternatives
def _module_op(module: nn.Module, x: jax.Array, mutable: bool = False):
    """``(params, fn)`` with ``fn(params, x) -> y`` applying ``module`` (batch statistics taken and dropped)."""
    variables = module.init(jax.random.key(0), x)
    rest = {k: v for k, v in variables.items() if k != "params"}

    def fn(params, x):
        out = module.apply({"params": params, **rest}, x, mutable=list(rest) if mutable else False)
        return out[0] if mutable else out

    return variables["params"], fn


def _alternatives(plan: dict, dtype) -> list[tuple[str, tuple, dict[str, Callable]]]:
    """``(op, input shape, {implementation: make(x) -> (params, fn)})``; the first implementation is ours."""
    b = plan["op_batch"]
    cases = []
    for shape, size in plan["upsample"]:
        cases.append(("upsample", (b, *shape), {
            "ours (weighted gathers, custom VJP)":
                lambda x, s=size: ({}, lambda p, v: ops.upsample_bilinear(v, (s, s))),
            "interpolation-matrix products": lambda x, s=size: ({}, lambda p, v: upsample_matrices(v, (s, s))),
            "jax.image.scale_and_translate": lambda x, s=size: ({}, lambda p, v: upsample_jax_image(v, (s, s))),
        }))
    for shape in plan["maxpool"]:
        cases.append(("maxpool 3x3/2", (b, *shape), {
            "ours (custom VJP)": lambda x: ({}, lambda p, v: ops.max_pool_3x3s2(v)),
            "lax.reduce_window autodiff": lambda x: ({}, lambda p, v: nn.max_pool(v, (3, 3), (2, 2), padding="SAME")),
        }))
    for shape in plan["batchnorm"]:
        cases.append(("batchnorm+relu (train)", (b, *shape), {
            "ours (custom VJP, fused ReLU)": lambda x: _module_op(ops.BatchNorm(
                use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype, relu=True), x, mutable=True),
            "flax.linen.BatchNorm + relu": lambda x: _module_op(nn.Sequential([nn.BatchNorm(
                use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype), nn.relu]), x, mutable=True),
        }))
    for shape, features in plan["conv1x1"]:
        cases.append((f"conv1x1 -> {features}", (b, *shape), {
            "ours (dot_general)": lambda x, f=features: _module_op(ops.Conv1x1(f, dtype=dtype), x),
            "lax.conv_general_dilated": lambda x, f=features: _module_op(
                nn.Conv(f, (1, 1), use_bias=False, dtype=dtype), x),
        }))
    return cases


def _time_per_call(fn: Callable, args: tuple, seconds: float) -> float:
    """Median seconds per call of ``fn(*args)``, dispatched back to back in rounds of ~``seconds / 5``."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    n, spent = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        spent = time.perf_counter() - start
        if spent >= seconds / 5 or n >= 4096:
            break
        n *= 4
    rounds = [spent / n]
    for _ in range(4):
        start = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        rounds.append((time.perf_counter() - start) / n)
    return statistics.median(rounds)


def op_alternatives(report: Report, plan: dict, seconds: float) -> None:
    dtype = jnp.bfloat16
    for op, shape, impls in _alternatives(plan, dtype):
        ours_ms, ours_y = None, None
        for index, (impl, make) in enumerate(impls.items()):
            name = f"{op} {'x'.join(map(str, shape))}: {impl}"
            if report.over_budget(seconds + 5):
                report.skip("op", name, seconds + 5)
                continue
            try:
                x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
                params, fn = make(x)
                y_shape = jax.eval_shape(fn, params, x)
                cotangent = jax.random.normal(jax.random.key(1), y_shape.shape, jnp.float32).astype(y_shape.dtype)

                @jax.jit
                def forward_backward(params, x, g, fn=fn):
                    y, vjp = jax.vjp(fn, params, x)
                    return y, vjp(g)

                ms = _time_per_call(forward_backward, (params, x, cotangent), seconds) * 1e3
                y = np.asarray(forward_backward(params, x, cotangent)[0], np.float32)
                if index == 0:
                    ours_ms, ours_y = ms, y
                compared = ours_y is not None and ours_y.shape == y.shape
                diff = float(np.max(np.abs(y - ours_y)) / max(float(np.max(np.abs(ours_y))), 1e-30)) \
                    if compared else None
            except Exception as e:  # noqa: BLE001
                gc.collect()
                report.add("op", name, "oom" if _is_oom(e) else "error", op=op, impl=impl, shape=list(shape),
                           error=_one_line(e))
                continue
            # Without our own figure (skipped or failed) there is nothing to compare against.
            report.add("op", name, "ok", op=op, impl=impl, shape=list(shape), dtype="bfloat16", ms=ms,
                       speedup=ours_ms / ms if ours_ms is not None else None, rel_diff_vs_ours=diff)


# ----------------------------------------------------------------------------------------- summary
def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value / scale, spec)


def render_markdown(records: list[dict]) -> str:
    """The records as Markdown: environment line, then one table per kind of measurement."""
    lines = ["# Device check", ""]
    for r in records:
        if r["section"] == "environment":
            v = r["versions"]
            lines += [f"{r['date'][:10]}: {r['num_devices']} x {r['device_kind']} ({r['platform']}), jax {v['jax']}, "
                      f"jaxlib {v['jaxlib']}, flax {v['flax']}, optax {v['optax']}, Python {r['python']}; "
                      f"XLA_FLAGS={r['xla_flags']!r}, XLA_PYTHON_CLIENT_MEM_FRACTION={r['mem_fraction']}"
                      + (" (dry run)" if r["dry_run"] else ""), ""]
    numeric = [r for r in records if r["section"] == "numerics"]
    if numeric:
        lines += ["| numerics (relative error; tolerance 1e-4, updates 1e-2) | status | params | batch stats | loss | "
                  "updates | worst update leaf (info) |", "|---|---|---|---|---|---|---|"]
        for r in numeric:
            e, w = r.get("rel_error", {}), r.get("worst_leaf_rel_error", {})
            lines.append(f"| {r['name']} | {r['status']} | {_fmt(e.get('params'), '.2e')} | "
                         f"{_fmt(e.get('batch_stats'), '.2e')} | {_fmt(e.get('loss'), '.2e')} | "
                         f"{_fmt(e.get('update'), '.2e')} | {_fmt(w.get('update'), '.2e')} "
                         f"{r.get('worst_leaf', {}).get('update', '')} |")
        lines.append("")
    steps = [r for r in records if r["section"] in ("train", "eval")]
    if steps:
        lines += ["| step | status | step ms | images/s | compile s | TFLOP/s | MFU | step memory GiB | "
                  "process peak GiB so far |", "|---|---|---|---|---|---|---|---|---|"]
        for r in steps:
            lines.append(f"| {r['name']} | {r['status']} | {_fmt(r.get('step_ms_median'), '.1f')} | "
                         f"{_fmt(r.get('images_per_sec'), ',.0f')} | {_fmt(r.get('compile_s'), '.1f')} | "
                         f"{_fmt(r.get('tflops_per_sec'), '.1f')} | {_fmt(r.get('mfu'), '.1%')} | "
                         f"{_fmt(r.get('compiled_peak_memory_bytes'), '.2f', 2**30)} | "
                         f"{_fmt(r.get('peak_memory_bytes'), '.2f', 2**30)} |")
        lines.append("")
    op_records = [r for r in records if r["section"] == "op"]
    if op_records:
        lines += ["| op | shape | implementation | status | ms (fwd+bwd) | ours / this | rel. diff vs ours |",
                  "|---|---|---|---|---|---|---|"]
        for r in op_records:
            lines.append(f"| {r.get('op', '')} | {'x'.join(map(str, r.get('shape', [])))} | {r.get('impl', r['name'])} "
                         f"| {r['status']} | {_fmt(r.get('ms'), '.3f')} | {_fmt(r.get('speedup'), '.2f')} | "
                         f"{_fmt(r.get('rel_diff_vs_ours'), '.1e')} |")
        lines.append("")
    for r in records:
        if r["section"] == "profile":
            lines.append(f"Profile: {r['status']}, {_fmt(r.get('bytes'), '.1f', 2**20)} MiB in {r.get('path')}"
                         + (f", dropped {r['dropped']}" if r.get("dropped") else ""))
    failed = [r["name"] for r in records if r["status"] in ("fail", "error")]
    lines += ["", f"Failures: {', '.join(failed) if failed else 'none'}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for results.jsonl and summary.md")
    parser.add_argument("--dry-run", action="store_true", help="the tiny plan on the CPU (what CI runs)")
    parser.add_argument("--profile", action="store_true",
                        help="last, trace 2 train steps of the fastest batch into OUT/profile-* (< 16 MiB)")
    parser.add_argument("--op-seconds", type=float, default=None,
                        help="timing per op alternative (default 0.3 on a device, 0.01 in the dry run)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="start no measurement after this many seconds (default 450: 7.5 minutes)")
    parser.add_argument("--sections", default="numerics,steps,ops",
                        help="comma-separated subset of numerics, steps, ops (default: all)")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    if not sections <= {"numerics", "steps", "ops"}:
        parser.error(f"unknown sections {sorted(sections - {'numerics', 'steps', 'ops'})}")
    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"  # this process and the profiling child
        jax.config.update("jax_platforms", "cpu")
        # Its figures mean nothing, its compiles are most of its time: skip LLVM's optimisations.
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    elif jax.default_backend() == "cpu":
        parser.error("no accelerator here: the CPU runs the tiny plan only (--dry-run)")
    plan = PLANS["dry-run" if args.dry_run else "device"]
    # A compilation cache for this run only: programs compiled twice (the initialisation of one
    # network for every batch size, say) compile once; no step is compiled twice and XLA's own
    # (autotuning) caches stay off, so compile_s is each step's compile in this process (XLA:GPU's
    # in-memory autotuning results may still be shared), and a rerun starts cold.
    cache = tempfile.mkdtemp(prefix="device-check-cache-")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")  # no autotune results kept between steps
    try:
        return _run_plan(args, plan)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _run_plan(args: argparse.Namespace, plan: dict) -> int:
    sections = set(args.sections.split(","))
    report = Report(args.out, args.dry_run, args.budget_s)
    environment(report)
    passed = True
    if "numerics" in sections:
        try:
            passed = numerics(report, plan)
        except Exception as e:  # noqa: BLE001
            report.add("numerics", "numerics", "error", error=_one_line(e))
            passed = False
    best = bf16_sweep(report, plan) if "steps" in sections else None
    if "ops" in sections:  # before the remaining steps: the backend choices need them most
        op_alternatives(report, plan, args.op_seconds if args.op_seconds is not None else plan["op_seconds"])
    if "steps" in sections:
        other_steps(report, plan, best)
    if args.profile:
        profile(report, plan, args.out, best["batch_size"] if best else plan["train_batches"][0])
    failed = [r for r in report.records if r["status"] in ("fail", "error")]
    print(f"wrote {report.jsonl} and {args.out / 'summary.md'} in {report.elapsed():.0f} s; "
          f"{len(failed)} failed", flush=True)
    return 0 if passed and not failed else 1


if __name__ == "__main__":
    sys.exit(main())

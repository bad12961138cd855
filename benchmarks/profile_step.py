"""Where a compiled step's milliseconds go on XLA:CPU: per-op time from a ``jax.profiler`` trace.

    python benchmarks/profile_step.py --model cifar_attention56 --image-size 32 --batch-size 128 \\
        --mode train [--steps 3] [--top 30] [--json]

Compiles and times the step as ``python -m resattn_jax.bench`` does (same options), traces
``--steps`` more steps, and reads the trace (``jax.profiler.ProfileData``): every op XLA:CPU runs
(a fusion, a library call such as a YNNPACK or Eigen product, a copy, one of our custom calls) is
an event with its duration on the thread that ran it. The report gives per step

* the wall time and each XLA thread's busy time (the rest is idle: waiting for work or for a
  dependency, i.e. what the step's parallelism leaves unused);
* time per kind of op (the op name without its ``.N`` suffix: ``convolution``, ``ynn_fusion``,
  ``ffi_call`` for the custom calls, ``add_select_fusion`` ...) with op counts;
* the ``--top`` single ops by time, and the count of ops shorter than 20 microseconds with their
  total (per-op overhead).

The JSON (``--json``) has the same figures. Nothing is timed in tests: this is a benchmark.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

_SKIP = re.compile(r"^(end: |ThreadpoolListener::|ThunkExecutor::)")
_SUFFIX = re.compile(r"(\.\d+)+$")
#: Ops shorter than this count as "small" (their cost is mostly dispatch).
SMALL_NS = 20_000


def analyse(xplane_path: str, steps: int, top: int = 30) -> dict:
    """Per-step op times of the XLA:CPU threads in one trace (see the module docstring)."""
    from jax.profiler import ProfileData  # noqa: PLC0415

    data = ProfileData.from_file(xplane_path)
    host = next((p for p in data.planes if p.name == "/host:CPU"), None)
    if host is None:
        raise SystemExit(f"profile_step: no /host:CPU plane in {xplane_path}")
    threads, kinds, ops = {}, collections.defaultdict(lambda: [0.0, 0]), collections.defaultdict(float)
    small = [0, 0.0]
    wall_start, wall_end = None, None
    for line in host.lines:
        if not line.name.startswith("tf_XLA"):
            continue
        busy = 0.0
        for event in line.events:
            if _SKIP.match(event.name) or event.duration_ns <= 0:
                continue
            busy += event.duration_ns
            kind = _SUFFIX.sub("", event.name)
            kinds[kind][0] += event.duration_ns
            kinds[kind][1] += 1
            ops[event.name] += event.duration_ns
            if event.duration_ns < SMALL_NS:
                small[0] += 1
                small[1] += event.duration_ns
            wall_start = event.start_ns if wall_start is None else min(wall_start, event.start_ns)
            wall_end = event.end_ns if wall_end is None else max(wall_end, event.end_ns)
        if busy:
            threads[line.name] = busy / steps / 1e6
    ms = lambda ns: ns / steps / 1e6  # noqa: E731
    return {
        "steps": steps,
        "ops_span_ms": (wall_end - wall_start) / steps / 1e6 if wall_start is not None else None,
        "thread_busy_ms": threads,
        "kinds": sorted(({"kind": k, "ms": ms(v[0]), "count": v[1] // steps} for k, v in kinds.items()),
                        key=lambda r: -r["ms"]),
        "top_ops": [{"op": k, "ms": ms(v)} for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:top]],
        "small_ops": {"count": small[0] // steps, "ms": ms(small[1]), "below_us": SMALL_NS / 1e3},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar_attention56")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mode", default="train", choices=("train", "eval"))
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="traced steps (after 3 timed ones)")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    from resattn_jax.ops import backend  # noqa: PLC0415

    backend.tune_host_memory()
    from resattn_jax.tools import bench  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        result = bench.run_benchmark(args.model, args.image_size, args.batch_size, mode=args.mode, steps=3, warmup=1,
                           num_classes=args.num_classes, profile_dir=tmp, profile_steps=args.steps)
        if result.get("profile_error"):
            raise SystemExit(f"profile_step: the trace failed: {result['profile_error']}")
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not files:
            raise SystemExit(f"profile_step: the trace wrote no .xplane.pb under {tmp}")
        report = analyse(files[0], args.steps, args.top)
    report |= {k: result[k] for k in ("model", "image_size", "batch_size", "mode", "step_ms_median", "compile_s",
                                      "flops_per_step")}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.model} {args.mode} at {args.image_size}x{args.image_size}, batch {args.batch_size}: "
          f"step {report['step_ms_median']:.0f} ms untraced, ops span {report['ops_span_ms']:.0f} ms traced")
    print("thread busy ms/step: " + ", ".join(f"{v:.0f}" for v in report["thread_busy_ms"].values()))
    s = report["small_ops"]
    print(f"ops under {s['below_us']:.0f} us: {s['count']} per step, {s['ms']:.1f} ms")
    print("\n| kind | ms/step | ops/step |\n|---|---|---|")
    for r in report["kinds"][: args.top]:
        print(f"| {r['kind']} | {r['ms']:.1f} | {r['count']} |")
    print("\n| op | ms/step |\n|---|---|")
    for r in report["top_ops"]:
        print(f"| {r['op']} | {r['ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

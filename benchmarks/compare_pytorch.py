"""Side-by-side CPU timings: resattn_jax's compiled step vs the PyTorch reference, interleaved.

    python benchmarks/compare_pytorch.py --torch-python /tmp/torchvenv/bin/python [--rounds 2]

For each mode (train, eval) and each round, runs ``python -m resattn_jax.bench --json`` and then
``benchmarks/pytorch_reference.py --json`` in each PyTorch configuration, one after the other,
so that slow phases of a shared machine hit both sides alike. Each run times ``--steps`` steps
after ``--warmup`` warm-up steps and reports its median; the table gives the median over rounds
and the ratio PyTorch time / JAX time (above 1: JAX is faster).

PyTorch configurations: ``nchw`` (PyTorch's default layout) and ``channels_last``, both with
the same glibc settings the JAX CLIs apply (:func:`resattn_jax.ops.cpu.host.retain_host_memory`),
given to PyTorch through the ``MALLOC_*`` environment variables, so that neither side pays
per-step page faults the other does not. The best PyTorch configuration is the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: The glibc settings of ``resattn_jax.ops.cpu.host.retain_host_memory``, as environment variables.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}
TORCH_CONFIGS = {"nchw": [], "channels_last": ["--channels-last"]}


def _run_json(cmd: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compare_pytorch: {' '.join(cmd)} failed (status {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", required=True, help="a Python interpreter with CPU PyTorch installed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (JAX uses every core)")
    parser.add_argument("--modes", default="train,eval")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    common = ["--batch-size", str(args.batch_size), "--image-size", str(args.image_size), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--json"]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    results = {}
    for mode in args.modes.split(","):
        runs = {"jax": []} | {f"pytorch_{name}": [] for name in TORCH_CONFIGS}
        for round_index in range(args.rounds):
            jax_run = _run_json([sys.executable, "-m", "resattn_jax.bench", "--model", "attention56", "--mode", mode,
                                 *common], base_env)
            runs["jax"].append(jax_run["step_ms_median"])
            for name, flags in TORCH_CONFIGS.items():
                torch_run = _run_json([args.torch_python, os.path.join(HERE, "pytorch_reference.py"), "--mode", mode,
                                       "--threads", str(args.threads), *flags, *common], base_env | MALLOC_ENV)
                runs[f"pytorch_{name}"].append(torch_run["step_ms_median"])
            print(f"[{mode} round {round_index + 1}/{args.rounds}] "
                  + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in runs.items()), file=sys.stderr, flush=True)
        medians = {k: statistics.median(v) for k, v in runs.items()}
        best = min((k for k in medians if k.startswith("pytorch")), key=medians.get)
        results[mode] = {"step_ms": medians, "all_ms": runs, "best_pytorch": best,
                         "speedup_vs_best_pytorch": medians[best] / medians["jax"],
                         "jax_version": jax_run["jax_version"], "torch_version": torch_run["torch_version"],
                         "device_kind": jax_run["device_kind"]}
    if args.json:
        print(json.dumps(results))
        return 0
    print("| mode | resattn_jax ms | PyTorch NCHW ms | PyTorch channels_last ms | PyTorch best / resattn_jax |")
    print("|---|---|---|---|---|")
    for mode, r in results.items():
        ms = r["step_ms"]
        print(f"| {mode} | {ms['jax']:.0f} | {ms['pytorch_nchw']:.0f} | {ms['pytorch_channels_last']:.0f} | "
              f"{r['speedup_vs_best_pytorch']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

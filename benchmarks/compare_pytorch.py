"""Side-by-side CPU timings: resattn_jax's compiled step vs the PyTorch reference, interleaved.

    python benchmarks/compare_pytorch.py --torch-python /tmp/torchvenv/bin/python [--rounds 2]
    python benchmarks/compare_pytorch.py --torch-python /tmp/torchvenv/bin/python --model cifar_attention92 \
        --batch-size 64,128 --rounds 3

``--model`` is ``attention56`` (224x224, batch 8 by default) or ``cifar_attention56`` /
``cifar_attention92`` (32x32, batch 128 by default); ``--batch-size`` takes a comma-separated list.
For each mode (train, eval), batch size and round, runs ``python -m resattn_jax.bench --json`` and
then ``benchmarks/pytorch_reference.py --json`` (the PyTorch twin of the same network) in each
PyTorch configuration, one after the other, so that slow phases of a shared machine hit both
sides alike. The twin's parameter count and multiply-adds per image must equal ours (checked on
every run; a mismatch stops the comparison). Each run times ``--steps`` steps
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
#: The glibc settings of ``resattn_jax.ops.cpu.host.retain_host_memory``, as environment variables
#: (the variable takes a size_t: 2**62 means "never trim", as the library's -1 through mallopt).
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}
TORCH_CONFIGS = {"nchw": [], "channels_last": ["--channels-last"]}
#: Default image size and batch size per network.
MODEL_DEFAULTS = {"attention56": (224, "8"), "cifar_attention56": (32, "128"), "cifar_attention92": (32, "128")}


def _run_json(cmd: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compare_pytorch: {' '.join(cmd)} failed (status {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_twin(jax_run: dict, torch_run: dict) -> None:
    """The twin computes the same network: equal parameters and multiply-adds per image."""
    for key in ("params", "macs_per_image"):
        if jax_run.get(key) != torch_run.get(key):
            raise SystemExit(f"compare_pytorch: the PyTorch twin of {jax_run['model']} has {key} "
                             f"{torch_run.get(key):,}, resattn_jax {jax_run.get(key):,}: not the same network")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", required=True, help="a Python interpreter with CPU PyTorch installed")
    parser.add_argument("--model", default="attention56", choices=tuple(MODEL_DEFAULTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", default=None, help="comma-separated batch sizes (default: 8 at 224, 128 at 32)")
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 (ImageNet) or 32 (CIFAR)")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (JAX uses every core)")
    parser.add_argument("--modes", default="train,eval")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    default_size, default_batch = MODEL_DEFAULTS[args.model]
    image_size = args.image_size or default_size
    try:
        batch_sizes = [int(b) for b in (args.batch_size or default_batch).split(",")]
    except ValueError:
        parser.error(f"--batch-size takes comma-separated integers, got {args.batch_size!r}")
    if args.rounds < 1 or min(batch_sizes) < 1:
        parser.error("--rounds and every --batch-size must be >= 1")
    num_classes = 1000 if args.model == "attention56" else 10
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    results = {}
    for mode in args.modes.split(","):
        for batch in batch_sizes:
            common = ["--batch-size", str(batch), "--image-size", str(image_size), "--steps", str(args.steps),
                      "--warmup", str(args.warmup), "--num-classes", str(num_classes), "--json"]
            runs = {"jax": []} | {f"pytorch_{name}": [] for name in TORCH_CONFIGS}
            for round_index in range(args.rounds):
                jax_run = _run_json([sys.executable, "-m", "resattn_jax.bench", "--model", args.model, "--mode", mode,
                                     *common], base_env)
                runs["jax"].append(jax_run["step_ms_median"])
                for name, flags in TORCH_CONFIGS.items():
                    torch_run = _run_json([args.torch_python, os.path.join(HERE, "pytorch_reference.py"),
                                           "--model", args.model, "--mode", mode, "--threads", str(args.threads),
                                           *flags, *common], base_env | MALLOC_ENV)
                    _check_twin(jax_run, torch_run)
                    runs[f"pytorch_{name}"].append(torch_run["step_ms_median"])
                print(f"[{args.model} {mode} batch {batch} round {round_index + 1}/{args.rounds}] "
                      + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in runs.items()), file=sys.stderr, flush=True)
            medians = {k: statistics.median(v) for k, v in runs.items()}
            best = min((k for k in medians if k.startswith("pytorch")), key=medians.get)
            results[f"{mode}/{batch}"] = {
                "model": args.model, "mode": mode, "batch_size": batch, "image_size": image_size,
                "step_ms": medians, "all_ms": runs, "best_pytorch": best,
                "speedup_vs_best_pytorch": medians[best] / medians["jax"],
                "speedup_vs_nchw": medians["pytorch_nchw"] / medians["jax"],
                "speedup_vs_channels_last": medians["pytorch_channels_last"] / medians["jax"],
                "params": jax_run["params"], "macs_per_image": jax_run["macs_per_image"],
                "compile_s": jax_run["compile_s"], "jax_version": jax_run["jax_version"],
                "torch_version": torch_run["torch_version"], "device_kind": jax_run["device_kind"]}
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{args.model} at {image_size}x{image_size}, float32, median of {args.rounds} interleaved rounds")
    print("| mode | batch | resattn_jax ms | PyTorch NCHW ms | PyTorch channels_last ms | vs NCHW | vs channels_last |")
    print("|---|---|---|---|---|---|---|")
    for r in results.values():
        ms = r["step_ms"]
        print(f"| {r['mode']} | {r['batch_size']} | {ms['jax']:.0f} | {ms['pytorch_nchw']:.0f} | "
              f"{ms['pytorch_channels_last']:.0f} | {r['speedup_vs_nchw']:.2f}x | {r['speedup_vs_channels_last']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile time of every zoo network's train and eval step, split into tracing+lowering and XLA.

    python benchmarks/compile_times.py [--models cifar_attention56,cifar_attention92] [--batch-size 128] [--json]

For each network (default: all of ``resattn_jax.models.list_models()`` except ``tiny``) at its
paper input size (224 for ImageNet networks, 32 for CIFAR ones), builds the library's train step
(forward, backward, SGD-Nesterov update) and evaluation step exactly as training does
(``parallel.compile_step`` / ``compile_eval_step``, jit mode, the backend's compiler options) and
measures ``step.lower(state, batch)`` (Python tracing of the Flax modules and custom VJPs, and
lowering to StableHLO) and ``.compile()`` (XLA) with ``time.perf_counter``. Each network runs in
its own fresh process, so no JAX cache is shared between them; the persistent compilation cache
is off. Progress goes to stderr, one line per network; the table (or ``--json``) to stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

ROOT = __file__.rsplit("/benchmarks/", 1)[0]


def measure(model: str, image_size: int, batch_size: int, kinds: tuple[str, ...]) -> dict:
    """Seconds to lower and to compile each step kind of ``model`` (in this process)."""
    from resattn_jax.ops import backend  # noqa: PLC0415

    backend.tune_host_memory()
    import jax  # noqa: PLC0415

    jax.config.update("jax_enable_compilation_cache", False)
    from resattn_jax.models import create_model  # noqa: PLC0415
    from resattn_jax.tools import bench  # noqa: PLC0415
    from resattn_jax.training import loop, parallel  # noqa: PLC0415
    from resattn_jax.training.optim import create_optimizer, default_optimizer_config  # noqa: PLC0415

    num_classes = 1000 if image_size >= 64 else 10
    net = create_model(model, num_classes=num_classes)
    mesh = parallel.make_mesh(jax.devices())
    optimizer, schedule = create_optimizer(default_optimizer_config(), batch_size)
    image_shape = (image_size, image_size, 3)
    state = loop.create_train_state(net, optimizer, image_shape, 0, mesh)
    batch = next(bench._synthetic_batches(batch_size, image_shape, num_classes, mesh))
    out = {"model": model, "image_size": image_size, "batch_size": batch_size}
    for kind in kinds:
        if kind == "train":
            step = parallel.compile_step(loop.make_train_step(schedule), "jit", mesh)
        else:
            step = parallel.compile_eval_step(loop.make_eval_step(), "jit", mesh)
        start = time.perf_counter()
        lowered = step.lower(state, batch)
        lowered_at = time.perf_counter()
        lowered.compile()
        out[f"{kind}_lower_s"] = lowered_at - start
        out[f"{kind}_xla_s"] = time.perf_counter() - lowered_at
        out[f"{kind}_total_s"] = out[f"{kind}_lower_s"] + out[f"{kind}_xla_s"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated zoo names (default: all but tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 at 224, 128 at 32")
    parser.add_argument("--kinds", default="train,eval")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--_one", default=None, help=argparse.SUPPRESS)  # child process: one network
    args = parser.parse_args(argv)
    kinds = tuple(args.kinds.split(","))
    if args._one:
        model, size, batch = args._one.split(":")
        print(json.dumps(measure(model, int(size), int(batch), kinds)))
        return 0
    from resattn_jax.models import list_models  # noqa: PLC0415

    models = args.models.split(",") if args.models else [m for m in list_models() if m != "tiny"]
    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(list_models())}")
    rows = []
    for model in models:
        size = 224 if model.startswith("attention") else 32
        batch = args.batch_size or (128 if size == 32 else 8)
        proc = subprocess.run([sys.executable, __file__, "--kinds", args.kinds, "--_one", f"{model}:{size}:{batch}"],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"compile_times: {model} failed (status {proc.returncode}):\n{proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"[{model}] " + ", ".join(f"{k} {row[f'{k}_total_s']:.1f} s" for k in kinds), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows))
        return 0
    header = "".join(f" {k} lower s | {k} XLA s | {k} total s |" for k in kinds)
    print(f"| model | image | batch |{header}")
    print("|---|---|---|" + "---|" * (3 * len(kinds)))
    for r in rows:
        cells = "".join(f" {r[f'{k}_lower_s']:.1f} | {r[f'{k}_xla_s']:.1f} | {r[f'{k}_total_s']:.1f} |" for k in kinds)
        print(f"| {r['model']} | {r['image_size']} | {r['batch_size']} |{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

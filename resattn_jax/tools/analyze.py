"""Run analysis figures: stage responses across runs (the paper's Fig. 4) and training curves.

    python -m resattn_jax.analyze response --workdir runs/arl --workdir runs/nal --out response.png
    python -m resattn_jax.analyze curves --workdir runs/arl --out curves.png

``response``: the mean absolute value of each stage's output (``stage1``..``stageK``, ``final``)
on the first ``--num-images`` validation images, one bar per run: with naive attention learning
(``H = M * T``) the response shrinks stage after stage, with attention residual learning
(``H = (1 + M) * T``) it does not (paper §3.1, Fig. 4).

``curves``: loss, accuracy and learning rate against the step, from the run's ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys

import numpy as np
from matplotlib.figure import Figure

from resattn_jax.tools import figures, inference
from resattn_jax.training import loop
from resattn_jax.training.metrics import read_metrics as read_metrics_log

__all__ = ["CURVES", "curves_figure", "main", "read_metrics", "response_figure", "stage_responses"]

#: Panels of the curves figure: title -> the metrics.jsonl keys drawn in it.
CURVES = {
    "loss": ("train_loss", "validation_loss", "test_loss"),
    "accuracy": ("train_accuracy", "validation_accuracy", "test_accuracy"),
    "learning rate": ("learning_rate",),
}


def stage_responses(trained: loop.TrainedModel, images: np.ndarray) -> dict[str, float]:
    """Mean absolute output of every stage (``stage1``..``stageK``, ``final``) on normalised ``images``."""
    return {name: float(np.mean(np.abs(output)))
            for name, output in inference.forward(trained, images).stage_outputs.items()}


def response_figure(responses: dict[str, dict[str, float]], title: str) -> Figure:
    """Grouped bars: ``responses[run][stage]``, one colour per run, stages in order of appearance."""
    stages = list(dict.fromkeys(stage for run in responses.values() for stage in run))
    figure = figures.new_figure(max(5.0, 1.0 + 0.5 * len(stages) * len(responses)), 3.6)
    ax = figure.subplots()
    width = 0.8 / len(responses)
    for k, (run, values) in enumerate(responses.items()):
        x = [i + (k - (len(responses) - 1) / 2) * width for i, stage in enumerate(stages) if stage in values]
        ax.bar(x, [values[stage] for stage in stages if stage in values], width, label=run)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylabel("mean absolute response")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return figure


def read_metrics(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (steps int [T], values float [T])}`` from ``workdir/metrics.jsonl``, sorted by step.

    A step logged twice (a resumed run repeats the steps after its last checkpoint) keeps its last value;
    unparsable lines (a record cut by a kill) are skipped.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{os.path.abspath(workdir)} has no metrics.jsonl (not a training workdir)")
    series = collections.defaultdict(dict)
    for step, record in read_metrics_log(path).items():  # tolerant: a killed run's partial line is skipped
        for key, value in record.items():
            if key != "time":
                series[key][step] = float(value)  # 'nan'/'inf' strings included
    if not series:
        raise ValueError(f"{path} holds no metrics")
    return {key: (np.array(sorted(by_step)), np.array([by_step[s] for s in sorted(by_step)]))
            for key, by_step in series.items()}


def curves_figure(metrics: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    """One panel per :data:`CURVES` entry with the keys of ``metrics`` it names (single points as markers)."""
    panels = {name: [key for key in keys if key in metrics] for name, keys in CURVES.items()}
    panels = {name: keys for name, keys in panels.items() if keys}
    if not panels:
        raise ValueError(f"no curve metrics ({', '.join(k for keys in CURVES.values() for k in keys)}) in {title}")
    figure = figures.new_figure(4.2 * len(panels), 3.4)
    figure.suptitle(title, fontsize=10)
    for ax, (name, keys) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels.items()):
        for key in keys:
            steps, values = metrics[key]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=4, label=key)
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=10)
        if name == "learning rate" and all(np.all(metrics[k][1] > 0) for k in keys):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return figure


def _run_labels(workdirs: list[str]) -> list[str]:
    """Short names for the runs: the workdirs' base names, or the paths as given where those repeat."""
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    return names if len(set(names)) == len(names) else list(workdirs)


def _response(args) -> str:
    responses, num_images = {}, None
    for label, workdir in zip(_run_labels(args.workdir), args.workdir):
        trained = inference.load(workdir, args.checkpoint)
        images, _ = inference.split_images(trained, args.split, args.num_images)
        responses[label] = stage_responses(trained, images)
        num_images = len(images)
        print(f"{label} (step {trained.step}, {trained.config.model.name}, {trained.config.model.learning}): "
              + "  ".join(f"{stage} {value:.4g}" for stage, value in responses[label].items()))
    title = f"mean absolute response of each stage's output ({num_images} {args.split} images)"
    path = figures.save(response_figure(responses, title), args.out)
    return f"wrote {path}: the stage responses of {', '.join(responses)}"


def _curves(args) -> str:
    metrics = read_metrics(args.workdir)
    path = figures.save(curves_figure(metrics, os.path.abspath(args.workdir)), args.out)
    drawn = [key for keys in CURVES.values() for key in keys if key in metrics]
    last = max(int(steps[-1]) for steps, _ in metrics.values())
    accuracy = metrics.get("test_accuracy")
    test = f"; test accuracy {accuracy[1][-1]:.4f}" if accuracy is not None and math.isfinite(accuracy[1][-1]) else ""
    return f"wrote {path}: {', '.join(drawn)} up to step {last}{test}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resattn_jax.analyze", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    response = commands.add_parser("response", help="mean absolute stage responses of several runs")
    response.add_argument("--workdir", action="append", required=True, help="a training workdir (repeat for more runs)")
    response.add_argument("--checkpoint", default="best", help="'best' (default), 'latest' or a step, for every run")
    response.add_argument("--split", default="validation", choices=("validation", "test"))
    response.add_argument("--num-images", type=int, default=128, help="first images of the split (default 128)")
    response.add_argument("--out", required=True, help="PNG file to write")
    response.set_defaults(run=_response)
    curves = commands.add_parser("curves", help="loss, accuracy and learning-rate curves of a run")
    curves.add_argument("--workdir", required=True, help="a training workdir (reads its metrics.jsonl)")
    curves.add_argument("--out", required=True, help="PNG file to write")
    curves.set_defaults(run=_curves)
    args = parser.parse_args(argv)
    try:
        print(args.run(args))
    except (ValueError, loop.CheckpointError) as e:
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

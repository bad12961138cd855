"""Evaluate a trained run: top-1 / top-5 accuracy, loss, per-class accuracy and a confusion matrix.

    python -m resattn_jax.evaluate --workdir /tmp/digits
    python -m resattn_jax.evaluate --workdir /tmp/digits --checkpoint latest --split validation
    python -m resattn_jax.evaluate --workdir /tmp/digits --checkpoint 200 --out confusion.png
    python -m resattn_jax.evaluate --workdir /tmp/digits --data folder:/data/scans [--split test]

Prints the accuracies, the mean loss and the number of images, then per class its name, image count
and accuracy, and writes the confusion matrix as a PNG (rows: true class, columns: predicted class;
default ``WORKDIR/confusion_<checkpoint>_<split, or the folder's name>.png``).

``--checkpoint``: ``best`` (default: the one selected on validation accuracy, as ``summary.json``'s
test numbers are), ``latest``, ``ema`` (the run's averaged parameters, where it kept them) or a
step. Without ``--data`` the run's own ``test`` (default) or ``validation`` split is evaluated,
exactly as the run's evaluation reads it.

``--data folder:/path``: an image folder, laid out ``path/<split>/<class>/<image>`` (the split
folder named by ``--split``, default ``test``; any folder name is taken) or ``path/<class>/<image>``.
Its images go through the run's evaluation pipeline with the *run's* normalisation (mean and std),
channel count and evaluation size (images of another size are centre-cropped or padded, as the run
does with its own). Classes are matched by name: the folder may lack some of the run's classes
(they count 0 images), but a class the run does not know is an error.

Every bad input (no run in the workdir, an unknown checkpoint, a missing split, a bad folder,
classes that do not match) exits with status 2 and one line ``python -m resattn_jax.evaluate: error: ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
from typing import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from matplotlib.figure import Figure

from resattn_jax.ops.backend import compiler_options
from resattn_jax.tools import figures, inference
from resattn_jax.training import data, loop
from resattn_jax.training.data import folder as folder_lib
from resattn_jax.training.data import sources

__all__ = ["EvaluationResult", "check_checkpoint", "class_accuracy", "confusion_figure", "confusion_matrix",
           "default_out", "evaluate_run", "evaluate_trained", "folder_data_config", "folder_layout", "main",
           "make_predict", "predictions", "report"]

PROG = "python -m resattn_jax.evaluate"
CHECKPOINTS = ("best", "latest", "ema")
FOLDER = "folder:"
ANNOTATE_MAX = 30  # confusion figures: counts written in the cells up to this many classes
TICKS_MAX = 60  # class names on the axes up to this many classes


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """One evaluation of a checkpoint on one split (numbers over the evaluated images only)."""

    checkpoint: str  # the checkpoint directory evaluated
    step: int
    dataset: str  # the run's dataset name, or 'folder:/root' of the evaluated folder
    split: str  # the split evaluated: 'test' / 'validation', or the folder's split folder name ('' for root/<class>/)
    count: int  # images evaluated
    top1: float  # fractions in [0, 1]
    top5: float  # top-min(5, classes)
    loss: float  # mean cross-entropy
    class_names: tuple[str, ...]  # the run's classes, by label index
    confusion: np.ndarray  # int64 [K, K]: rows the true class, columns the predicted one
    class_counts: np.ndarray  # int64 [K]: images of each class (the confusion matrix's row sums)
    class_accuracies: np.ndarray  # float64 [K]: per-class accuracy (recall); NaN for a class without images


# ------------------------------------------------------------------------------------------- metrics
def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``int64 [K, K]``: entry ``[t, p]`` counts the images of true class ``t`` predicted as ``p``."""
    labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    if labels.shape != predicted.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predicted.shape} differ in shape")
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def class_accuracy(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class of a confusion matrix: ``(counts int64 [K], accuracies float64 [K])``.

    The accuracy of class ``k`` is ``confusion[k, k] / counts[k]`` (its recall), NaN when it has no images.
    """
    confusion = np.asarray(confusion)
    counts = confusion.sum(axis=1).astype(np.int64)
    correct = np.diagonal(confusion).astype(np.float64)
    accuracies = np.divide(correct, counts, out=np.full(len(counts), np.nan), where=counts > 0)
    return counts, accuracies


def make_predict(model):
    """``predict(variables, images, labels) -> (predicted int32 [B], top-5 hit bool [B], loss float32 [B])``,
    jitted: the evaluation-mode forward pass and, per image, what :func:`loop.make_eval_step` sums."""

    def predict(variables, images, labels):
        logits = model.apply(variables, images, train=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        top_k = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        return jnp.argmax(logits, -1).astype(jnp.int32), jnp.any(top_k == labels[:, None], axis=-1), loss

    return jax.jit(predict, compiler_options=compiler_options(jax.devices()[:1]))


def predictions(trained: loop.TrainedModel, batches: Iterable[dict],
                label_map: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Run ``trained`` over :func:`data.eval_batches`-style batches (``image``, ``label``, ``mask``).

    Returns the masked-in rows only, in order: ``label`` and ``predicted`` (int64), ``top5`` (bool)
    and ``loss`` (float64). ``label_map`` (``int [n]``) renames the batches' labels to the run's
    label indices first (an image folder's class order -> the run's).
    """
    predict = make_predict(trained.model)
    parts = {"label": [], "predicted": [], "top5": [], "loss": []}
    for batch in batches:
        labels = np.asarray(batch["label"])
        if label_map is not None:
            labels = np.asarray(label_map)[labels]
        predicted, hit5, loss = jax.device_get(predict(trained.variables, batch["image"], labels.astype(np.int32)))
        mask = np.asarray(batch["mask"], bool)
        parts["label"].append(labels[mask].astype(np.int64))
        parts["predicted"].append(np.asarray(predicted)[mask].astype(np.int64))
        parts["top5"].append(np.asarray(hit5)[mask])
        parts["loss"].append(np.asarray(loss, np.float64)[mask])
    empty = {"label": np.int64, "predicted": np.int64, "top5": bool, "loss": np.float64}
    return {k: np.concatenate(v) if v else np.zeros(0, empty[k]) for k, v in parts.items()}


# ------------------------------------------------------------------------------------------- folders
def _cache_base() -> str:
    return os.environ.get("RESATTN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "resattn_jax")


def _subdirectories(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))


def _has_images(path: str) -> bool:
    return any(not f.startswith(".") and f.lower().endswith(folder_lib.EXTENSIONS)
               and os.path.isfile(os.path.join(path, f)) for f in os.listdir(path))


def _split_view(root: str, split: str) -> str:
    """A directory whose ``split`` entry links to ``root``: a ``root/<class>/<image>`` folder seen as
    ``view/split/<class>/<image>``, the layout image-folder datasets read. Kept under the cache
    directory, one per root, so that the per-file scan cache serves the next evaluation too."""
    view = os.path.join(_cache_base(), "evaluate", hashlib.sha1(root.encode()).hexdigest()[:16])
    link = os.path.join(view, split)
    if os.path.islink(link) and os.readlink(link) == root:
        return view
    try:
        os.makedirs(view, exist_ok=True)
        temporary = f"{link}.{os.getpid()}.tmp"
        if os.path.lexists(temporary):
            os.remove(temporary)
        os.symlink(root, temporary)
        os.replace(temporary, link)
    except OSError as e:
        raise ValueError(f"folder:{root} is laid out <class>/<image>, and seeing it as <split>/<class>/<image> "
                         f"needs a link in {view}: {e.strerror}; lay it out {root}/{split}/<class>/<image> "
                         "instead") from None
    return view


def folder_layout(root: str, split: str) -> tuple[str, str]:
    """Where an image folder's ``split`` is: ``(dataset root, split folder name)``.

    ``root/<split>/<class>/<image>``: ``(root, split)``. ``root/<class>/<image>`` (no split folders):
    a linked view of it (:func:`_split_view`) and ``split``. Anything else is a one-line ``ValueError``
    saying the layouts expected.
    """
    root = os.path.abspath(os.path.expanduser(root))
    layouts = f"expected {root}/{split}/<class>/<image> or {root}/<class>/<image>"
    if not os.path.isdir(root):
        raise ValueError(f"folder:{root} is not a directory ({layouts})")
    if split.startswith(".") or os.sep in split or (os.altsep and os.altsep in split) or split in ("", "..", "."):
        raise ValueError(f"bad split {split!r}: a folder split is a plain folder name such as 'test'")
    subdirectories = _subdirectories(root)
    split_folders = [d for d in subdirectories if _subdirectories(os.path.join(root, d))]
    if split in split_folders:
        return root, split
    if split_folders:
        raise ValueError(f"folder:{root} has no split folder {split!r} (its split folders: "
                         f"{', '.join(split_folders)}): choose one with --split")
    if any(_has_images(os.path.join(root, d)) for d in subdirectories):
        return _split_view(root, split), split
    raise ValueError(f"folder:{root} has no class folders with images ({layouts})")


def folder_data_config(run_data: ml_collections.ConfigDict, root: str, split: str,
                       channels: int) -> ml_collections.ConfigDict:
    """The run's data config ``run_data`` turned to the image folder ``root``'s ``split``.

    Everything that shapes evaluation images stays the run's (evaluation size, augmentation kind),
    the normalisation is the run's own (``data.normalisation(run_data)``, not the folder's), the
    images are decoded to the run's ``channels``; the only split read is ``split``, under the name
    ``test`` (``data.eval_batches(cfg, 'test', ...)``).
    """
    mean, std = data.normalisation(run_data)
    fields = run_data.to_dict()
    fields.update(name=f"{FOLDER}{root}", train_split=split, validation_split="", test_split=split,
                  mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std), channels=int(channels),
                  label_noise=0.0)
    if fields.get("in_memory") is None:  # one-size images: decoded once into memory; 'imagenet' streams
        fields["in_memory"] = fields.get("augment") != "imagenet"
    return ml_collections.ConfigDict(fields)


def _folder_label_map(folder_classes: tuple[str, ...], run_classes: tuple[str, ...], name: str) -> np.ndarray:
    """Folder label index -> the run's label index, matched by class name; extra classes are an error."""
    unknown = [c for c in folder_classes if c not in run_classes]
    if unknown:
        missing = [c for c in run_classes if c not in folder_classes]

        def shown(names: list[str]) -> str:
            return ", ".join(repr(c) for c in names[:10]) + (", ..." if len(names) > 10 else "")

        raise ValueError(f"the classes of {name} differ from the run's: {len(unknown)} not in the run "
                         f"({shown(unknown)}); {len(missing)} of the run's {len(run_classes)} not in the folder"
                         + (f" ({shown(missing)})" if missing else ""))
    index = {c: i for i, c in enumerate(run_classes)}
    return np.array([index[c] for c in folder_classes], np.int64)


# ---------------------------------------------------------------------------------------- evaluation
def evaluate_trained(trained: loop.TrainedModel, split: str = "test", data_source: str | None = None,
                     batch_size: int | None = None) -> EvaluationResult:
    """Evaluate a restored run (:func:`inference.load`) on its own ``split`` ('test' or 'validation'),
    or, with ``data_source='folder:/path'``, on that image folder's ``split`` folder (module docstring).

    ``batch_size``: default the run's ``eval_batch_size``. Bad inputs raise a one-line ``ValueError``.
    """
    config = trained.config
    batch_size = int(config.eval_batch_size if batch_size is None else batch_size)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    class_names = tuple(trained.info.class_names) or tuple(str(i) for i in range(trained.info.num_classes))
    label_map = None
    if data_source is None:
        if split not in data.EVAL_SPLITS:
            raise ValueError(f"bad split {split!r}: choose one of {', '.join(data.EVAL_SPLITS)} (or any split "
                             "folder of an image folder given with --data)")
        if not config.data[f"{split}_split"]:
            raise ValueError(f"the run's dataset {config.data.name!r} has no {split} split (its "
                             f"data.{split}_split is empty)")
        cfg, eval_split, dataset, shown_split = config.data, split, config.data.name, split
    else:
        if not data_source.startswith(FOLDER) or len(data_source) == len(FOLDER):
            raise ValueError(f"--data takes an image folder as folder:/path, got {data_source!r}")
        root, folder_split = folder_layout(data_source[len(FOLDER):], split)
        requested = os.path.abspath(os.path.expanduser(data_source[len(FOLDER):]))
        data.forget_scans()  # see images changed since an earlier scan in this process
        cfg = folder_data_config(config.data, root, folder_split, trained.info.eval_image_shape[2])
        try:
            info = data.dataset_info(cfg)
        except ValueError as e:
            message = str(e).replace("--config.data.on_bad_image=skip", "on_bad_image='skip' in the run's config")
            if root != requested:  # name the folder given, not its linked view
                message = message.replace(os.path.join(root, folder_split), requested).replace(root, requested)
            raise ValueError(message) from None
        dataset = f"{FOLDER}{requested}"
        shown_split = folder_split if root == requested else ""
        label_map = _folder_label_map(info.class_names, class_names, dataset)
        if not info.num_test:
            raise ValueError(f"{dataset}: no images in {os.path.join(requested, folder_split)}")
        size = cfg.eval_image_size
        stored = sources.resolve(cfg).folder.size if cfg.augment != "imagenet" else None
        if stored is not None and tuple(stored) != (size, size):
            print(f"{PROG}: note: the images of {dataset} are {stored[0]}x{stored[1]}; they are centre-cropped or "
                  f"padded to the run's {size}x{size}", file=sys.stderr)
        eval_split = "test"
    found = predictions(trained, data.eval_batches(cfg, eval_split, batch_size), label_map)
    count = len(found["label"])
    if not count:
        raise ValueError(f"the {shown_split or 'image'} split of {dataset} has no images")
    confusion = confusion_matrix(found["label"], found["predicted"], len(class_names))
    counts, accuracies = class_accuracy(confusion)
    return EvaluationResult(
        checkpoint=trained.checkpoint, step=trained.step, dataset=dataset, split=shown_split, count=count,
        top1=float(np.trace(confusion)) / count, top5=float(found["top5"].sum()) / count,
        loss=float(found["loss"].mean()), class_names=class_names, confusion=confusion, class_counts=counts,
        class_accuracies=accuracies)


def check_checkpoint(checkpoint: str) -> str:
    """``checkpoint`` if it is 'best', 'latest', 'ema' or a step, else a one-line ``ValueError``."""
    text = str(checkpoint).strip()
    if text in CHECKPOINTS or (text.isdigit() and text.isascii()):
        return text
    raise ValueError(f"unknown checkpoint {checkpoint!r}: choose best, latest, ema or a step number")


def evaluate_run(workdir: str, checkpoint: str | int = "best", split: str = "test", data_source: str | None = None,
                 batch_size: int | None = None) -> EvaluationResult:
    """Load ``workdir``'s ``checkpoint`` (:func:`inference.load`) and :func:`evaluate_trained` it."""
    return evaluate_trained(inference.load(workdir, check_checkpoint(str(checkpoint))), split, data_source,
                            batch_size)


# ---------------------------------------------------------------------------------------- the figure
def confusion_figure(confusion: np.ndarray, class_names: tuple[str, ...] | list[str], title: str = "") -> Figure:
    """The confusion matrix as a heat map: cell ``[t, p]`` coloured by the fraction of class ``t``'s
    images predicted as ``p`` (each row sums to 1; a class without images stays blank), with the
    counts written in the cells (up to :data:`ANNOTATE_MAX` classes) and the class names on the axes
    (up to :data:`TICKS_MAX`)."""
    confusion = np.asarray(confusion)
    k = len(class_names)
    if confusion.shape != (k, k):
        raise ValueError(f"a {confusion.shape} confusion matrix for {k} class names")
    counts = confusion.sum(axis=1, keepdims=True)
    fractions = np.divide(confusion, counts, out=np.zeros(confusion.shape), where=counts > 0)
    side = min(16.0, max(4.5, 0.42 * k + 2.5))
    figure = figures.new_figure(side + 1.2, side)
    ax = figure.subplots()
    heat = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(heat, ax=ax, shrink=0.8, label="fraction of the true class's images")
    if k <= TICKS_MAX:
        ax.set_xticks(range(k), [str(c) for c in class_names], rotation=90 if max(map(len, map(str, class_names))) > 3
                      else 0, fontsize=8)
        ax.set_yticks(range(k), [str(c) for c in class_names], fontsize=8)
    if k <= ANNOTATE_MAX:
        for t in range(k):
            for p in range(k):
                if confusion[t, p]:
                    ax.text(p, t, str(int(confusion[t, p])), ha="center", va="center", fontsize=7,
                            color="white" if fractions[t, p] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title, fontsize=9)
    return figure


# ----------------------------------------------------------------------------------------------- CLI
def report(result: EvaluationResult) -> str:
    """The printed report: totals, then one line per class (name, images, accuracy)."""
    where = f"{result.split} split of {result.dataset}" if result.split else result.dataset
    correct = int(np.trace(result.confusion))
    lines = [f"{result.checkpoint} (step {result.step}) on the {where}: {result.count} images",
             f"top-1 accuracy: {result.top1:.4f} ({correct}/{result.count})",
             f"top-5 accuracy: {result.top5:.4f}",
             f"loss: {result.loss:.4f}",
             "per-class accuracy:"]
    width = max(5, *(len(str(c)) for c in result.class_names))
    lines.append(f"  {'class':<{width}}  {'images':>7}  accuracy")
    for name, count, accuracy in zip(result.class_names, result.class_counts, result.class_accuracies):
        lines.append(f"  {str(name):<{width}}  {int(count):>7}  {'-' if np.isnan(accuracy) else f'{accuracy:.4f}'}")
    return "\n".join(lines)


def default_out(workdir: str, checkpoint: str, split: str, data_source: str | None) -> str:
    """``WORKDIR/confusion_<checkpoint>_<split, or the folder's base name>.png``."""
    if data_source is not None:
        name = os.path.basename(os.path.normpath(os.path.expanduser(data_source[len(FOLDER):]))) or "folder"
    else:
        name = split
    label = str(int(checkpoint)) if checkpoint.isdigit() else checkpoint
    return os.path.join(workdir, f"confusion_{label}_{name}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="training workdir (checkpoints/, config.json)")
    parser.add_argument("--checkpoint", default="best", help="'best' (default), 'latest', 'ema' or a step")
    parser.add_argument("--split", default="test",
                        help="the run's 'test' (default) or 'validation' split; with --data, the split folder")
    parser.add_argument("--data", metavar="folder:/PATH",
                        help="evaluate an image folder (PATH/<split>/<class>/<image> or PATH/<class>/<image>) "
                             "instead of the run's data")
    parser.add_argument("--out", help="confusion-matrix PNG (default: WORKDIR/confusion_<checkpoint>_<split>.png)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default: the run's eval_batch_size)")
    args = parser.parse_args(argv)
    try:
        checkpoint = check_checkpoint(args.checkpoint)
        trained = inference.load(args.workdir, checkpoint)
        result = evaluate_trained(trained, args.split, args.data, args.batch_size)
    except (ValueError, loop.CheckpointError) as e:
        parser.exit(2, f"{PROG}: error: {' '.join(str(e).split())}\n")
    print(report(result))
    out = args.out or default_out(args.workdir, checkpoint, args.split, args.data)
    where = f"{result.split} split of {result.dataset}" if result.split else result.dataset
    figure = confusion_figure(result.confusion, result.class_names,
                              f"checkpoint {checkpoint} (step {result.step}), {where}: "
                              f"top-1 {result.top1:.4f}, {result.count} images")
    try:
        path = figures.save(figure, out)
    except OSError as e:
        parser.exit(2, f"{PROG}: error: cannot write {out}: {e.strerror}\n")
    print(f"wrote {path}: the confusion matrix (rows: true class, columns: predicted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

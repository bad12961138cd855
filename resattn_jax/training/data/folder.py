"""Image folders (``folder:/root``, laid out ``root/split/class/image.png``): scanned and checked
before training.

:func:`scan` lists every split and class, decodes every image once (in parallel threads, with a
progress line when it takes more than a few seconds) and records its size, channel count and pixel
sums, or why it does not decode. The results are cached per file, keyed by its path, size and
modification time, in ``$RESATTN_JAX_CACHE`` (default ``~/.cache/resattn_jax``)``/folders``: a
second run, or another process of the same job, decodes nothing that has not changed.

:func:`check` applies a data configuration to a scan: the channel count (``data.channels``; by
default that of the majority of the training images: grey when most are grey, else colour; the
others are converted when decoded), which images are bad (undecodable, or of another size than the
majority when the augmentation needs one size: ``cifar`` and ``none``; ``imagenet`` resizes any)
and what to do about them (``data.on_bad_image``: ``error`` stops with one line naming the first bad
file and the count; ``skip`` leaves them out, deterministically, and says how many). Empty class
directories are an error naming them. The normalisation statistics (per-channel mean and standard
deviation over the training split's pixels) come from the scan's sums.

:func:`preset` gives the data fields a folder implies: CIFAR-style (in memory, pad-and-crop, flips,
the images' own size) for images of at most 64 pixels a side, ImageNet-style (streamed,
random-resized crops at 224) above; the splits that exist; normalisation computed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import importlib
import json
import os
import re
import sys
import threading
import time

import numpy as np

from resattn_jax.training.workdir import atomic_write_text

__all__ = ["BAD_IMAGE_POLICIES", "EXTENSIONS", "FolderData", "check", "decode_error_text", "decode_split", "find_bad_file",
           "forget_scans", "preset", "scan"]

EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
BAD_IMAGE_POLICIES = ("error", "skip")
SPLITS = ("train", "validation", "test")
SMALL_IMAGE = 64  # presets: CIFAR-style up to this many pixels a side, ImageNet-style above
_CACHE_VERSION = 1
_GREY = np.array([0.2989, 0.5870, 0.1140])  # tf.image.rgb_to_grayscale's weights


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One file as scanned: its decoded ``(height, width, channels)`` and pixel sums, or ``error``."""

    path: str  # relative to the root: split/class/name
    label: int
    shape: tuple[int, int, int] | None
    error: str | None
    colour: tuple[tuple[float, ...], tuple[float, ...]] | None  # per-channel sums, sums of squares as RGB
    grey: tuple[float, float] | None  # sum, sum of squares as grey


@dataclasses.dataclass(frozen=True)
class FolderScan:
    root: str
    classes: tuple[str, ...]
    splits: dict[str, tuple[ImageRecord, ...]]  # every split folder, its images sorted by path
    empty_classes: tuple[str, ...]  # split/class directories without images


@dataclasses.dataclass(frozen=True)
class FolderData:
    """A scan checked against a configuration: what the pipeline reads."""

    root: str
    classes: tuple[str, ...]
    channels: int
    size: tuple[int, int] | None  # the one image size (height, width), when the augmentation needs one
    files: dict[str, tuple[tuple[str, int], ...]]  # split -> (absolute path, label), the good images
    mean: np.ndarray  # float32 [channels], 0..255 units, over the training split
    std: np.ndarray
    signature: str  # changes when any image used does (its path, shape or pixel sums)


# ------------------------------------------------------------------------------------------------ scan
def _cache_path(root: str) -> str:
    base = os.environ.get("RESATTN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "resattn_jax")
    return os.path.join(base, "folders", hashlib.sha1(root.encode()).hexdigest()[:16] + ".json")


def _read_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        return cached["files"] if cached.get("version") == _CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no cache, or an unreadable one: scan again


def _write_cache(path: str, root: str, files: dict) -> None:
    """Atomically; a cache that cannot be written only costs the next run a scan."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps({"version": _CACHE_VERSION, "root": root, "files": files}))
    except OSError:
        pass


def decode_error_text(error: Exception) -> str:
    """TensorFlow's message without its op decorations: 'Invalid PNG data, size 440'."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    text = re.sub(r"\{\{[^}]*\}\}", "", text)  # {{function_node ...}}, {{node DecodeImage}}
    text = re.sub(r"\s*\[\[.*?\]\]|\s*\[Op:[^]]*\]", "", text)
    return text.strip() or type(error).__name__


def _measure(path: str) -> dict:
    """Decode one file: its shape and pixel sums, or the error."""
    from resattn_jax.training.data._tensorflow import tf  # only the input pipeline imports TensorFlow

    try:
        with open(path, "rb") as f:
            encoded = f.read()
        image = tf.io.decode_image(encoded, channels=0, expand_animations=False).numpy()
    except OSError as e:  # not cached: it may be transient (EIO, too many open files)
        return {"error": f"cannot read it ({e.strerror})", "transient": True}
    except Exception as e:  # noqa: BLE001 - every decoding failure is a bad image
        return {"error": decode_error_text(e)}
    h, w, c = image.shape
    if h == 0 or w == 0:
        return {"error": "it has no pixels"}
    pixels = image.reshape(-1, c)[:, :3 if c >= 3 else 1].astype(np.float64)
    if c >= 3:
        colour = (pixels.sum(0).tolist(), np.square(pixels).sum(0).tolist())
        grey_pixels = pixels @ _GREY
    else:
        grey_pixels = pixels[:, 0]
        colour = ([float(grey_pixels.sum())] * 3, [float(np.square(grey_pixels).sum())] * 3)
    return {"shape": [h, w, c], "colour": colour, "grey": [float(grey_pixels.sum()), float(np.square(grey_pixels).sum())]}


def _list(root: str) -> tuple[tuple[str, ...], dict[str, list[tuple[str, str]]], list[str]]:
    """``(classes, {split: [(relative path, class)]}, empty class directories)``."""
    listing, classes, empty = {}, set(), []
    for split in sorted(os.listdir(root)):
        split_dir = os.path.join(root, split)
        if split.startswith(".") or not os.path.isdir(split_dir):
            continue
        files = []
        for name in sorted(os.listdir(split_dir)):
            class_dir = os.path.join(split_dir, name)
            if name.startswith(".") or not os.path.isdir(class_dir):
                continue
            classes.add(name)
            images = [f for f in sorted(os.listdir(class_dir))
                      if not f.startswith(".") and f.lower().endswith(EXTENSIONS)
                      and os.path.isfile(os.path.join(class_dir, f))]
            if not images:
                empty.append(f"{split}/{name}")
            files += [(f"{split}/{name}/{f}", name) for f in images]
        listing[split] = files
    return tuple(sorted(classes)), listing, empty


class _Progress:
    """A line on stderr every few seconds once the scan has taken more than ``after`` seconds."""

    def __init__(self, what: str, total: int, after: float = 3.0):
        self.what, self.total, self.start, self.after = what, total, time.perf_counter(), after
        self.done, self.last, self.shown = 0, self.start, False
        self.lock = threading.Lock()

    def advance(self) -> None:
        with self.lock:
            self.done += 1
            now = time.perf_counter()
            if now - self.start > self.after and now - self.last > 2.0:
                rate = self.done / (now - self.start)
                print(f"{self.what}: {self.done:,}/{self.total:,} images ({rate:,.0f}/s, "
                      f"{(self.total - self.done) / max(rate, 1e-9):,.0f} s left)", file=sys.stderr, flush=True)
                self.last, self.shown = now, True

    def close(self) -> None:
        if self.shown:
            print(f"{self.what}: {self.total:,} images in {time.perf_counter() - self.start:,.1f} s "
                  f"(cached for the next run)", file=sys.stderr, flush=True)


_SCANS: dict[str, tuple[tuple, FolderScan]] = {}  # root -> (its directories' mtimes, scan), per process


def forget_scans() -> None:
    """Drop the per-process scans: the next :func:`scan` stats every file again (decoding only the
    changed ones). A training run does this once at its start, so that an image replaced in place
    since the last run in this process is checked."""
    _SCANS.clear()


def _directory_stamp(root: str) -> tuple:
    """The modification times of ``root``, its split and its class directories: they change when an
    image is added, removed or renamed (replacing a file in place leaves them; decoding still checks)."""
    stamp = []
    for current, directories, _ in os.walk(root):
        stamp.append((current, os.stat(current).st_mtime_ns))
        if current != root and os.path.dirname(current) != root:
            directories.clear()  # class directories: their files are not walked
    return tuple(sorted(stamp))


def scan(root: str) -> FolderScan:
    """List and decode every image under ``root`` (cached per file; see the module docstring).

    Kept per process while no image is added, removed or renamed: the pipeline resolves its
    configuration several times, and a large folder takes a while to list.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise ValueError(f"dataset 'folder:{root}': not a directory (layout root/split/class/image.png)")
    stamp = _directory_stamp(root)
    if root in _SCANS and _SCANS[root][0] == stamp:
        return _SCANS[root][1]
    found = _scan(root)
    _SCANS[root] = (stamp, found)
    return found


def _scan(root: str) -> FolderScan:
    classes, listing, empty = _list(root)
    if not listing:
        raise ValueError(f"dataset 'folder:{root}': no split folders (layout root/split/class/image.png)")
    cache_path = _cache_path(root)
    cached = _read_cache(cache_path)
    entries, todo = {}, []
    for files in listing.values():
        for relative, _ in files:
            try:
                stat = os.stat(os.path.join(root, relative))
            except OSError as e:
                entries[relative] = {"error": f"cannot read it ({e.strerror})"}
                continue
            key = [stat.st_size, stat.st_mtime_ns]
            entry = cached.get(relative)
            if entry is not None and entry.get("key") == key:
                entries[relative] = entry
            else:
                todo.append((relative, key))
    if todo:
        importlib.import_module("resattn_jax.training.data._tensorflow")  # before the clock starts (seconds, once)

        progress = _Progress(f"checking the images of folder:{root}", len(todo))

        def measure(item):
            relative, key = item
            result = {**_measure(os.path.join(root, relative)), "key": key}
            progress.advance()
            return relative, result

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            entries.update(pool.map(measure, todo))
        progress.close()
        _write_cache(cache_path, root, {k: v for k, v in entries.items() if "key" in v and not v.get("transient")})
    index = {name: i for i, name in enumerate(classes)}

    def record(relative: str, name: str) -> ImageRecord:
        entry = entries[relative]
        return ImageRecord(relative, index[name], tuple(entry["shape"]) if entry.get("shape") else None,
                           entry.get("error"), tuple(map(tuple, entry["colour"])) if entry.get("colour") else None,
                           tuple(entry["grey"]) if entry.get("grey") else None)

    splits = {split: tuple(record(r, name) for r, name in files) for split, files in listing.items()}
    return FolderScan(root, classes, splits, tuple(empty))


# ----------------------------------------------------------------------------------------------- check
def _majority(values) -> object:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], v)) if counts else None


def check(found: FolderScan, cfg, used_splits: tuple[str, ...]) -> FolderData:
    """Apply the data config ``cfg`` (its ``on_bad_image`` checked by the caller,
    :func:`..sources.resolve`) to a scan; one-line ``ValueError`` for every problem."""
    name = f"folder:{found.root}"
    on_bad_image = cfg.get("on_bad_image", "error")
    missing = [s for s in used_splits if s not in found.splits]
    if missing:
        raise ValueError(f"dataset {name!r} has no split folder {missing[0]!r} (it has {sorted(found.splits)}); "
                         f"set --config.data.{_field(missing[0])}='' or add the folder")
    empty = [e for e in found.empty_classes if e.split("/")[0] in used_splits]
    if empty:
        raise ValueError(f"dataset {name!r}: {len(empty)} empty class director{'ies' if len(empty) > 1 else 'y'} "
                         f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}): add images or remove them")
    train = found.splits[used_splits[0]]
    if not train:
        raise ValueError(f"dataset {name!r}: the {used_splits[0]!r} split has no images")
    decoded = [r for r in train if r.shape is not None]
    channels = cfg.get("channels")
    if channels is None:
        channels = 1 if _majority(1 if r.shape[2] < 3 else 3 for r in decoded) == 1 else 3
    elif channels not in (1, 3):
        raise ValueError(f"--config.data.channels={channels}: must be 1 (grey) or 3 (colour)")
    size = None
    if cfg.augment != "imagenet":
        size = _majority(r.shape[:2] for r in decoded)

    bad = []  # (relative path, reason)
    files = {}
    for split in used_splits:
        good = []
        for r in found.splits[split]:
            if r.error is not None:
                bad.append((r.path, r.error))
            elif size is not None and r.shape[:2] != size:
                bad.append((r.path, f"it is {r.shape[0]}x{r.shape[1]}, the other images {size[0]}x{size[1]} (augment "
                                    f"{cfg.augment!r} needs one size: resize it, or use augment 'imagenet')"))
            else:
                good.append(r)
        files[split] = good
    if bad and on_bad_image == "error":
        raise ValueError(f"dataset {name!r}: {len(bad)} bad image{'s' if len(bad) > 1 else ''}, the first "
                         f"{bad[0][0]}: {bad[0][1]} (fix or remove {'them' if len(bad) > 1 else 'it'}, or set "
                         "--config.data.on_bad_image=skip)")
    if bad:
        print(f"{name}: skipping {len(bad)} bad image{'s' if len(bad) > 1 else ''} (on_bad_image=skip), the first "
              f"{bad[0][0]}: {bad[0][1]}", file=sys.stderr, flush=True)
    if not files[used_splits[0]]:
        raise ValueError(f"dataset {name!r}: no good image in the {used_splits[0]!r} split")

    # Normalisation over the training split's pixels, in the configured channels.
    pixels = sum(r.shape[0] * r.shape[1] for r in files[used_splits[0]])
    if channels == 3:
        total = np.sum([r.colour[0] for r in files[used_splits[0]]], axis=0)
        squares = np.sum([r.colour[1] for r in files[used_splits[0]]], axis=0)
    else:
        total = np.array([sum(r.grey[0] for r in files[used_splits[0]])])
        squares = np.array([sum(r.grey[1] for r in files[used_splits[0]])])
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean**2, 1e-12))
    digest = hashlib.sha1(repr((found.root, channels, size, {s: [(r.path, r.shape, r.grey) for r in v]
                                                            for s, v in files.items()})).encode()).hexdigest()[:16]
    return FolderData(found.root, found.classes, channels, size,
                      {s: tuple((os.path.join(found.root, r.path), r.label) for r in v) for s, v in files.items()},
                      mean.astype(np.float32), std.astype(np.float32), digest)


def _field(split: str) -> str:
    return {"train": "train_split", "validation": "validation_split", "test": "test_split"}.get(split, "train_split")


def decode_split(data: FolderData, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images of ``split`` as ``uint8 [N, H, W, C]`` (one size: ``data.size``) and ``int64 [N]`` labels.

    A file that no longer decodes (changed since the scan) is a one-line ``ValueError`` naming it.
    """
    from resattn_jax.training.data._tensorflow import tf

    files = data.files[split]

    def decode(item):
        path, _ = item
        try:
            with open(path, "rb") as f:
                image = tf.io.decode_image(f.read(), channels=data.channels, expand_animations=False).numpy()
        except OSError as e:
            raise ValueError(f"folder:{data.root}: {os.path.relpath(path, data.root)}: cannot read it "
                             f"({e.strerror})") from None
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"folder:{data.root}: {os.path.relpath(path, data.root)}: {decode_error_text(e)} "
                             "(changed since it was checked? fix it and rerun)") from None
        if data.size is not None and image.shape[:2] != data.size:
            raise ValueError(f"folder:{data.root}: {os.path.relpath(path, data.root)}: it is "
                             f"{image.shape[0]}x{image.shape[1]}, not {data.size[0]}x{data.size[1]} (changed since it "
                             "was checked? rerun)")
        return image

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(decode, files))
    shape = (0, *(data.size or (0, 0)), data.channels)
    return (np.stack(images) if images else np.zeros(shape, np.uint8),
            np.array([label for _, label in files], np.int64))


def find_bad_file(data: FolderData, split: str) -> str | None:
    """The first file of ``split`` that does not decode now (after a failure in the stream), as a
    one-line message naming it; files are decoded one at a time and nothing is kept."""
    for path, label in data.files[split]:
        one = dataclasses.replace(data, size=None, files={split: ((path, label),)})
        try:
            decode_split(one, split)
        except ValueError as e:
            return str(e)
    return None


# ---------------------------------------------------------------------------------------------- preset
def preset(root: str) -> dict:
    """The data fields an image folder implies (module docstring): a dict of config fields."""
    found = scan(root)
    train = [r for r in found.splits.get("train", ()) if r.shape is not None]
    if not train:
        raise ValueError(f"dataset 'folder:{found.root}': no decodable image in a 'train' split folder")
    height, width = _majority(r.shape[:2] for r in train)
    fields = {
        "train_split": "train",
        "validation_split": "validation" if found.splits.get("validation") else "",
        "test_split": "test" if found.splits.get("test") else "",
        "mean": None, "std": None, "channels": None,
    }
    if max(height, width) <= SMALL_IMAGE:
        side = min(height, width)
        fields.update(image_size=side, eval_image_size=side, augment="cifar", crop_padding=max(1, round(side / 8)),
                      random_flip=True, in_memory=True, shuffle_buffer=None)
    else:
        fields.update(image_size=224, eval_image_size=224, augment="imagenet", random_flip=True, in_memory=False,
                      shuffle_buffer=10_000)
    return fields

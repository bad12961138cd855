"""The workdir of a training run: one run at a time, config changes caught on resume, atomic writes.

A workdir holds ``config.json`` (the resolved config of the run), ``checkpoints/``, ``metrics.jsonl``,
``tensorboard/`` and at the end ``summary.json``. Three rules keep it consistent:

* **One run per workdir.** :class:`WorkdirLock` takes an advisory ``fcntl.flock`` on
  ``WORKDIR/.lock`` before anything else is written; the kernel releases it when the holder exits,
  however it exits (``kill -9`` included). A second run stops with one line naming the holder's pid
  and host. Read-only commands (evaluate, visualize, export) take no lock.
* **A resume continues the same experiment.** :func:`config_changes` compares the new resolved
  config with the stored ``config.json``; only the fields in :data:`MUTABLE_FIELDS` (how long to run
  and how often to log, evaluate and save) may change, unless ``allow_config_change=True``.
* **Files are replaced, never half-written.** :func:`atomic_write_text` writes a temporary file,
  fsyncs it and renames it over the target.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
from typing import Any, Mapping

__all__ = ["ADDED_FIELD_DEFAULTS", "MUTABLE_FIELDS", "WorkdirBusy", "WorkdirLock", "atomic_write_text",
           "check_writable", "config_changes", "config_fingerprint", "ensure_free", "flatten", "lock_holder"]

#: Config fields a resumed run may change freely: how far to train, how often to log, evaluate and
#: save, and what to do about non-finite steps (both policies leave such an update unapplied). The
#: evaluation batch size changes no result beyond float summation order.
MUTABLE_FIELDS = frozenset({"num_train_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                            "progress_bar", "keep_checkpoints", "allow_config_change", "eval_batch_size",
                            "nan_policy", "max_skipped_fraction", "profile_steps"})

#: Fields added after runs were first written, at the values that keep the earlier behaviour: a
#: field at this value counts as absent, so such runs resume and keep their fingerprints.
ADDED_FIELD_DEFAULTS = {
    "label_smoothing": 0.0, "grad_accum_steps": 1, "ema_decay": 0.0, "best_by": "model", "init_from": "",
    "freeze": "", "profile_steps": [], "optimizer.schedule": "piecewise", "mix.mixup_alpha": 0.0,
    "mix.cutmix_alpha": 0.0, "mix.prob": 1.0, "mix.switch_prob": 0.5, "mix.cutout": 0, "mix.seed": None,
    "data.channels": None, "data.on_bad_image": "error",
}

LOCK_NAME = ".lock"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class WorkdirBusy(ValueError):
    """Another process holds the workdir's lock."""


def check_writable(workdir: str) -> None:
    """Create ``workdir`` if needed and check that files can be written in it (``ValueError`` if not)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
            pass
    except OSError as e:
        reason = "a parent is a file, not a directory" if e.errno in (errno.ENOTDIR, errno.EEXIST) else e.strerror
        raise ValueError(f"workdir {workdir} is not writable: {reason or e}") from None


def lock_holder(workdir: str) -> str | None:
    """``'pid P on host H since T'`` when another process holds ``workdir``'s lock, else ``None``.

    Opens the lock file read-only, so it can be asked before the workdir is known to be writable.
    """
    path = os.path.join(workdir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_holder(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def ensure_free(workdir: str) -> None:
    """:class:`WorkdirBusy` when another process holds ``workdir``'s lock (asked read-only: cheap,
    and possible before the workdir is known to be writable)."""
    holder = lock_holder(workdir)
    if holder:
        raise WorkdirBusy(_busy(workdir, holder))


def _busy(workdir: str, holder: str) -> str:
    return f"workdir {workdir} is in use by {holder} (one run per workdir; wait for it or stop it)"


def _describe_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        record = {}
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["time"])) if "time" in record else "?"
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')} since {since}"


class WorkdirLock:
    """An exclusive advisory lock on ``WORKDIR/.lock`` (``with WorkdirLock(workdir): ...``).

    Raises :class:`WorkdirBusy` (a ``ValueError``: one line, exit status 2 in ``train.py``) naming
    the holder when another process has it. The lock file records the holder's pid, host and start
    time; it is left in place on release (removing it would race with a new taker).
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise WorkdirBusy(_busy(os.path.dirname(self.path), holder)) from None
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def atomic_write_text(path: str, text: str) -> None:
    """Replace ``path`` by ``text``: a temporary file in the same folder, fsynced, renamed over it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it (mkstemp makes it private)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a.b': value}`` from nested mappings; tuples become lists (as in ``config.json``)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def _comparable(config) -> dict[str, Any]:
    """A config (``ConfigDict`` or the dict read from ``config.json``) as flat JSON values."""
    as_dict = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
    flat = flatten(json.loads(json.dumps(as_dict)))
    return {k: v for k, v in flat.items() if k not in ADDED_FIELD_DEFAULTS or v != ADDED_FIELD_DEFAULTS[k]}


def config_changes(stored, new) -> tuple[list[str], list[str]]:
    """``(changed, allowed)``: lines ``'field: old -> new'`` for fields outside and inside
    :data:`MUTABLE_FIELDS` that differ between the ``stored`` and the ``new`` config."""
    old, now = _comparable(stored), _comparable(new)
    changed, allowed = [], []
    # The cosine schedule reaches 0 at num_train_steps: lengthening such a run changes its rates.
    fixed_length = "cosine" in (old.get("optimizer.schedule"), now.get("optimizer.schedule"))
    for field in sorted(set(old) | set(now)):
        if old.get(field, "<absent>") != now.get(field, "<absent>"):
            line = f"{field}: {old.get(field, '<absent>')!r} -> {now.get(field, '<absent>')!r}"
            mutable = field in MUTABLE_FIELDS and not (fixed_length and field == "num_train_steps")
            (allowed if mutable else changed).append(line)
    return changed, allowed


def config_fingerprint(config) -> str:
    """sha256 (16 hex digits) of the config's fields outside :data:`MUTABLE_FIELDS`: two runs with the
    same fingerprint train the same way."""
    flat = _comparable(config)
    fixed = {k: v for k, v in flat.items()
             if k not in MUTABLE_FIELDS or (k == "num_train_steps" and flat.get("optimizer.schedule") == "cosine")}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]

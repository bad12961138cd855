"""Metric sinks: a JSON-lines log and TensorBoard event files in the workdir, a console progress bar.

Only process 0 writes (``active=False`` elsewhere). Event files are written with ``tensorboardX``
(a small writer-only package: no TensorFlow or TensorBoard needed to write them; view them with
``tensorboard --logdir WORKDIR/tensorboard``), imported by the writer that writes them, so that the
steps and the benchmark import where only JAX is installed.

A resumed run repairs ``metrics.jsonl`` first: a half-written last line (the previous run was
killed mid-write) is cut, and records after the restored step, which the resumed run writes
again, are dropped. :func:`read_metrics` reads it tolerantly, the last value per step and key winning.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

__all__ = ["MetricWriter", "Progress", "read_metrics"]


def read_metrics(path: str) -> dict[int, dict]:
    """``{step: {key: value}}`` from a ``metrics.jsonl``, sorted by step: records of one step are
    merged, a later value of a key replacing an earlier one; unparsable lines are skipped."""
    merged: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                step = int(record.pop("step"))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            merged.setdefault(step, {}).update(record)
    return dict(sorted(merged.items()))


def _repair(path: str, resume_step: int) -> None:
    """Cut a partial last line and drop records after ``resume_step`` (rewritten atomically)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.split("\n")
    complete = lines[:-1]  # what follows the last newline is a partial record (or empty)
    kept = []
    for line in complete:
        try:
            if int(json.loads(line)["step"]) > resume_step:
                continue
        except (ValueError, KeyError, TypeError):
            continue  # a damaged line
        kept.append(line)
    if kept != lines[:-1] or lines[-1]:
        from resattn_jax.training.workdir import atomic_write_text  # noqa: PLC0415

        atomic_write_text(path, "".join(line + "\n" for line in kept))


class MetricWriter:
    """Writes ``{'step': s, **scalars}`` to ``metrics.jsonl`` and to TensorBoard under ``tensorboard/``.

    ``resume_step``: the step a resumed run restarts from (the log is repaired first, see above).
    """

    def __init__(self, workdir: str, active: bool = True, resume_step: int | None = None):
        self.active = active
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not active:
            return
        if resume_step is not None:
            _repair(self.path, resume_step)
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - only the writing process needs it

        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in scalars.items()}
        self._file.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        self._file.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.active:
            self._file.close()
            self._tb.close()


class Progress:
    """A one-line console progress bar with rate and ETA (to stderr), updated at log points."""

    def __init__(self, total: int, start: int = 0, active: bool = True, stream=None):
        self.total, self.start, self.active = total, start, active
        self.stream = stream if stream is not None else sys.stderr  # as it is now (tests redirect it)
        self.t0 = time.perf_counter()
        self.tty = getattr(stream, "isatty", lambda: False)()

    def update(self, step: int, text: str = "") -> None:
        if not self.active:
            return
        done = max(step - self.start, 0)
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {step}/{self.total} {rate:.2f} it/s ETA {_fmt(eta)} {text}"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def note(self, text: str) -> None:
        """One line of what the run is doing (compiling, a validation result), between bar updates."""
        if not self.active:
            return
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def restart(self, step: int) -> None:
        """Measure the rate (hence the ETA) from ``step`` on, e.g. once the step is compiled."""
        self.start, self.t0 = step, time.perf_counter()

    def close(self) -> None:
        if self.active and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"

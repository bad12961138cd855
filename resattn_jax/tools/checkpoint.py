"""Check the checkpoints of a training run against their manifests.

    python -m resattn_jax.checkpoint verify WORKDIR

For every checkpoint under ``WORKDIR/checkpoints``: ``ok`` (the files match the sizes and sha256
sums recorded when the save committed), ``unsealed`` (committed, but its run stopped before the
manifest was written; a resume seals it after reading it back whole and finite) or ``DAMAGED`` with
the reason. Checkpoints set aside as corrupt (``<step>.corrupt-<time>``) are listed too. Reads
only: works on a read-only workdir, with a run in progress too. Exit status 0 when every checkpoint
is ok or unsealed, 1 when one is damaged, 2 for a workdir without checkpoints.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from resattn_jax.training.checkpoint import MANIFEST, Checkpoints

__all__ = ["main", "verify"]


def verify(workdir: str) -> list[tuple[int, str, str]]:
    """``[(step, 'ok' | 'unsealed' | 'DAMAGED', reason)]`` for every checkpoint of ``workdir``."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise ValueError(f"{os.path.abspath(workdir)} has no checkpoints/ (not a training workdir)")
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        results = []
        for step in checkpoints.steps():
            reason = checkpoints.verify(step)
            if reason:
                results.append((step, "DAMAGED", reason))
            elif not os.path.exists(os.path.join(checkpoints.path(step), MANIFEST)):
                results.append((step, "unsealed", "no manifest yet"))
            else:
                results.append((step, "ok", ""))
        return results
    finally:
        checkpoints.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resattn_jax.checkpoint", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="check every checkpoint's files against its manifest")
    check.add_argument("workdir")
    args = parser.parse_args(argv)
    try:
        results = verify(args.workdir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not results:
        print(f"error: no checkpoints in {os.path.abspath(args.workdir)}/checkpoints", file=sys.stderr)
        return 2
    for step, status, reason in results:
        print(f"step {step}: {status}" + (f" ({reason})" if reason else ""))
    directory = os.path.join(os.path.abspath(args.workdir), "checkpoints")
    for name in sorted(n for n in os.listdir(directory) if ".corrupt-" in n):
        print(f"{name}: set aside as corrupt by an earlier run")
    damaged = sum(status == "DAMAGED" for _, status, _ in results)
    print(f"{len(results)} checkpoints, {damaged} damaged")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())

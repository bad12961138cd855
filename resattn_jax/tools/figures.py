"""Matplotlib figures on the Agg canvas, without pyplot (no global backend or figure state)."""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["new_figure", "save"]


def new_figure(width: float, height: float) -> Figure:
    """An empty ``width x height`` inch figure drawn by Agg."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save(figure: Figure, path: str) -> str:
    """Write ``figure`` as a PNG to ``path`` (creating its directory); returns the absolute path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    figure.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path

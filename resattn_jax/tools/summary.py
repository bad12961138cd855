"""A zoo network's summary table: output shape, parameters and multiply-adds per part.

    python -m resattn_jax.summary attention56
    python -m resattn_jax.summary attention92 --image-size 320
    python -m resattn_jax.summary cifar_attention56 --num-classes 100

One row for the stem, one per stage (a subtotal) with, indented below it, one row for the stage's
units and one per attention module (with the size ``h x w`` and channels of its soft mask), one
for the final units and one for the classifier, then the totals: the parameter count (the sizes of
``variables['params']``) and the multiply-adds of :func:`resattn_jax.tools.flops.model_macs`, per
image. The indented rows add up to the totals. The default image size is 224 for the ImageNet
networks and 32 for the CIFAR-stem ones (``cifar_*``, ``tiny``).

Nothing is computed: the network is traced once for its variables' shapes (``jax.eval_shape``) and
once for its forward pass (``jax.make_jaxpr``). Parameters are attributed to a row by the top-level
submodule (``stem_conv``, ``stage2_unit``, ``stage2_attention0``, ``final_unit1``, ``classifier``
...) their path starts with; multiply-adds by the top-level submodule that the name stack of the
traced equation names (each equation counted as :mod:`resattn_jax.tools.flops` counts it).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from resattn_jax.models.zoo import create_model
from resattn_jax.tools import flops

__all__ = ["Row", "Summary", "default_image_size", "format_table", "main", "summarize"]

_STAGE_MODULE = re.compile(r"stage(\d+)_(unit|extra\d+|attention\d+)$")


@dataclasses.dataclass(frozen=True)
class Row:
    """One part of the network.

    Attributes:
      name: ``'stem'``, ``'stage{s}_units'`` (the stage's first unit and its extra units),
        ``'stage{s}_attention{m}'``, ``'final'`` (the final units and batch norm), ``'classifier'``,
        a stage's subtotal ``'stage{s}'``, or a top-level submodule's own name for any other.
      modules: the top-level submodules in the row, in call order.
      output: the per-image output shape, ``(H, W, C)`` or ``(num_classes,)``: the feature map the
        row hands on (the stem's after its max pool; the final units' before the global pool).
      params: parameters (elements of ``variables['params']``).
      macs: multiply-adds per image.
      soft_mask: ``(h, w, C)`` of an attention module's soft mask (per image), else ``None``.
      stage: the stage number of a stage's rows, else ``None``.
    """

    name: str
    modules: tuple[str, ...]
    output: tuple[int, ...]
    params: int
    macs: int
    soft_mask: tuple[int, int, int] | None = None
    stage: int | None = None


@dataclasses.dataclass(frozen=True)
class Summary:
    """The summary of network ``name`` on ``[1, *image_shape]`` images (``image_shape = (H, W, in_channels)``).

    ``rows`` are its parts in call order (no stage subtotals: see :meth:`stages`); they add up to the
    totals ``params`` (elements of ``variables['params']``) and ``macs`` (multiply-adds per image,
    :func:`resattn_jax.tools.flops.model_macs`'s count).
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    rows: tuple[Row, ...]
    params: int
    macs: int

    def stages(self) -> dict[int, Row]:
        """Each stage's subtotal row ``'stage{s}'`` (its units and attention modules), by stage number."""
        parts = collections.defaultdict(list)
        for row in self.rows:
            if row.stage is not None:
                parts[row.stage].append(row)
        return {s: Row(f"stage{s}", sum((r.modules for r in rows), ()), rows[-1].output,
                       sum(r.params for r in rows), sum(r.macs for r in rows), stage=s)
                for s, rows in parts.items()}


def default_image_size(model: nn.Module) -> int:
    """224 for an ImageNet-stem network, 32 for a CIFAR-stem one (``cifar_*``, ``tiny``)."""
    return 224 if model.stem == "imagenet" else 32


def _row_of(module: str) -> tuple[str, int | None]:
    """The row name and stage number of top-level submodule ``module``."""
    match = _STAGE_MODULE.match(module)
    if match:
        stage, part = int(match[1]), match[2]
        return (module if part.startswith("attention") else f"stage{stage}_units"), stage
    for prefix in ("stem", "final"):
        if module.startswith(prefix + "_"):
            return prefix, None
    return module, None


def _named_module(eqn, modules: frozenset[str]) -> str | None:
    """The first of ``modules`` named in ``eqn``'s name stack (``'ResidualAttentionNet/stage1_unit/conv1'``)."""
    return next((part for part in str(eqn.source_info.name_stack).split("/") if part in modules), None)


def _macs_by_module(jaxpr, modules: frozenset[str], exclude: tuple[str, ...]) -> collections.Counter:
    """Multiply-adds of ``jaxpr`` as :func:`flops.count_macs` counts them, by top-level module.

    An equation whose name stack names one of ``modules`` counts for it whole (nested jaxprs
    included); one that names none is looked into (a ``remat`` body's equations name their module
    relative to it), and what still names none counts under ``None``. The counts add up to the
    jaxpr's total.
    """
    macs = collections.Counter()
    for eqn in jaxpr.eqns:
        whole = flops._walk(jaxpr.replace(eqns=[eqn]), exclude)  # flops' own count of this equation
        if whole == 0:
            continue
        module = _named_module(eqn, modules)
        subs = list(flops._sub_jaxprs(eqn.params))
        if module is not None or not subs or eqn.primitive.name == "cond":
            macs[module] += whole
            continue
        macs[None] += flops._eqn_macs(eqn)
        for sub, repeat in subs:
            for name, count in _macs_by_module(sub, modules, exclude).items():
                macs[name] += repeat * count
    return macs


@dataclasses.dataclass
class _Call:
    """A top-level submodule's call: per-image input and output shapes."""

    input: tuple[int, ...]
    output: tuple[int, ...]


def _trace(model: nn.Module, variables: Any, shape: tuple[int, ...]):
    """Trace ``model.apply(variables, zeros(shape), train=False)``: the jaxpr, the top-level
    submodules' calls in order (``{name: _Call}``) and the sown ``intermediates`` (shapes)."""
    calls: dict[str, _Call] = {}

    def record(call, args, kwargs, context):
        out = call(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and len(module.path) == 1:
            calls.setdefault(module.name, _Call(tuple(args[0].shape[1:]), tuple(out.shape[1:])))
        return out

    def forward(v, x):
        with nn.intercept_methods(record):
            return model.apply(v, x, train=False, mutable=["intermediates"])

    closed, (_, state) = jax.make_jaxpr(forward, return_shape=True)(variables, jax.ShapeDtypeStruct(shape, jnp.float32))
    return closed.jaxpr, calls, state.get("intermediates", {})


def _rows(calls: dict[str, _Call], params: collections.Counter, macs: collections.Counter,
          intermediates: dict[str, Any]) -> list[Row]:
    """The rows of the top-level submodules ``calls`` (in call order) with their ``params`` and
    ``macs`` (by module; ``macs[None]``: products outside every module, an ``'other'`` row)."""
    grouped: dict[str, list[str]] = {}  # row name -> its modules, in call order
    for module in calls:
        grouped.setdefault(_row_of(module)[0], []).append(module)
    inputs = [calls[modules[0]].input for modules in grouped.values()]
    rows = []
    for (name, modules), following in zip(grouped.items(), inputs[1:] + [()]):
        last = calls[modules[-1]].output
        # The map handed on: after the stem's max pool, but the final units' before the global pool.
        output = following if len(following) == len(last) else last
        mask = intermediates.get(modules[0], {}).get("soft_mask") if len(modules) == 1 else None
        rows.append(Row(name, tuple(modules), output, sum(params[m] for m in modules), sum(macs[m] for m in modules),
                        soft_mask=tuple(mask[0].shape[1:]) if mask else None, stage=_row_of(modules[0])[1]))
    if macs[None]:  # none in the zoo networks
        rows.append(Row("other", (), (), 0, macs[None]))
    return rows


def summarize(name: str, image_size: int | None = None, **model_overrides) -> Summary:
    """The summary of zoo network ``name`` (``create_model(name, **model_overrides)``) on one
    ``image_size`` x ``image_size`` image (default: :func:`default_image_size`).

    Raises ``ValueError`` for an unknown name or option, or an image size the network cannot take.
    """
    model = create_model(name, **model_overrides)
    size = default_image_size(model) if image_size is None else image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image size must be a positive integer, got {image_size!r}")
    shape = (1, size, size, model.in_channels)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    jaxpr, calls, intermediates = _trace(model, variables, shape)
    exclude = flops._DEFAULT_EXCLUDE
    macs = _macs_by_module(jaxpr, frozenset(calls), exclude)
    params = collections.Counter()
    for path, leaf in traverse_util.flatten_dict(variables["params"]).items():
        params[path[0]] += leaf.size
    rows = _rows(calls, params, macs, intermediates)
    return Summary(name, shape[1:], model.num_classes, tuple(rows), sum(params.values()),
                   flops._walk(jaxpr, exclude))


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def format_table(summary: Summary) -> str:
    """The summary as a text table: the stem, each stage's subtotal with its parts indented, the final
    units, the classifier and the totals; numbers with thousands separators."""
    stages = summary.stages()
    lines = [("part", "output", "parameters", "multiply-adds", "soft mask (h x w, channels)")]

    def add(label: str, row: Row) -> None:
        mask = f"{_shape(row.soft_mask[:2])}, {row.soft_mask[2]:,}" if row.soft_mask else ""
        lines.append((label, _shape(row.output), f"{row.params:,}", f"{row.macs:,}", mask))

    for row in summary.rows:
        if row.stage is None:
            add(row.name, row)
            continue
        if row.modules[0] == stages[row.stage].modules[0]:  # the stage's first row: its subtotal first
            add(f"stage{row.stage}", stages[row.stage])
        count = len(row.modules)
        part = f"{count} unit{'s' * (count > 1)}" if row.name.endswith("_units") else row.name.split("_", 1)[1]
        add("  " + part, row)
    lines.append(("total", "", f"{summary.params:,}", f"{summary.macs:,}", ""))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    aligns = ("<", "<", ">", ">", "<")
    table = ["  ".join(f"{cell:{align}{width}}" for cell, align, width in zip(line, aligns, widths)).rstrip()
             for line in lines]
    table.insert(1, "-" * len(table[0]))
    table.insert(len(table) - 1, "-" * len(table[0]))
    title = (f"{summary.name} on {_shape(summary.image_shape)} images, {summary.num_classes:,} classes "
             "(shapes and multiply-adds per image)")
    return "\n".join([title, "", *table, "stage rows: the subtotals of the indented rows below them"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resattn_jax.summary", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a zoo network, e.g. attention56, attention92, cifar_attention56, tiny")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="square input size (default: 224 for ImageNet networks, 32 for cifar_* and tiny)")
    parser.add_argument("--num-classes", type=int, default=None, metavar="K",
                        help="classifier outputs (default: the network's own)")
    args = parser.parse_args(argv)
    overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
    try:
        summary = summarize(args.name, args.image_size, **overrides)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

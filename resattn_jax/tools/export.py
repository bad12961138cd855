"""Export a trained network as a standalone inference function: ``jax.export`` and a TF SavedModel.

    python -m resattn_jax.export --workdir /tmp/digits --out /tmp/digits_export [--saved-model]

The function maps normalised images ``float32 [batch, H, W, C]`` (``(pixels - mean) / std``, pixels
0..255, as the input pipeline feeds the network) to logits ``float32 [batch, num_classes]``, in
evaluation mode (BatchNorm running statistics), with the trained weights baked in as constants and a
symbolic batch dimension. ``OUT`` receives:

* ``inference.jaxexport``: the serialised ``jax.export.Exported`` (StableHLO), lowered for
  ``--platforms`` (default ``cpu,cuda``); :func:`load_exported` (plain JAX, no TensorFlow) calls it;
* ``export.json``: input and output shapes, the normalisation ``mean``/``std``, the source checkpoint;
* ``saved_model/`` (``--saved-model``): the same function as a TensorFlow SavedModel through
  ``jax2tf`` (signature ``serving_default``: ``images`` -> ``logits``); :func:`load_saved_model`.

This module imports neither TensorFlow nor the input pipeline until it needs them, so that loading
an export needs only JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resattn_jax.ops import backend

__all__ = ["EXPORTED_FILE", "METADATA_FILE", "PLATFORMS", "SAVED_MODEL_DIR", "export_inference", "load_exported",
           "load_saved_model", "main", "save_export", "write_saved_model"]

EXPORTED_FILE = "inference.jaxexport"
METADATA_FILE = "export.json"
SAVED_MODEL_DIR = "saved_model"
PLATFORMS = ("cpu", "cuda")


def export_inference(trained: Any, platforms: Sequence[str] = PLATFORMS) -> jax.export.Exported:
    """``images float32 [batch, H, W, C] -> logits float32 [batch, K]`` of a ``loop.TrainedModel``.

    Evaluation mode, weights as constants, ``batch`` symbolic, ``(H, W, C)`` the run's evaluation
    image shape; lowered for every platform in ``platforms``.
    """
    variables = jax.device_get(trained.variables)  # host arrays: constants, not device buffers
    model = trained.model

    def infer(images: jax.Array) -> jax.Array:
        return model.apply(variables, images, train=False)

    batch, = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, *trained.info.eval_image_shape), jnp.float32)
    # Plain StableHLO only: the OpenBLAS custom calls exist in this process, not where it is loaded.
    with backend.portable():
        return jax.export.export(jax.jit(infer), platforms=tuple(platforms))(images)


def _tensorflow():
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError as e:
        raise ValueError(f"the SavedModel needs TensorFlow (pip install tensorflow-cpu): {e}") from None
    return tf, jax2tf


def write_saved_model(exported: jax.export.Exported, path: str) -> None:
    """``exported`` as a TensorFlow SavedModel at ``path``: ``serving_default(images) -> {'logits'}``."""
    tf, jax2tf = _tensorflow()
    _, *image_shape = exported.in_avals[0].shape
    polymorphic = f"(batch, {', '.join(str(d) for d in image_shape)})"
    converted = jax2tf.convert(exported.call, polymorphic_shapes=[polymorphic], with_gradient=False,
                               native_serialization_platforms=exported.platforms)
    module = tf.Module()
    module.infer = tf.function(lambda images: {"logits": converted(images)}, autograph=False,
                               input_signature=[tf.TensorSpec([None, *image_shape], tf.float32, name="images")])
    tf.saved_model.save(module, path, signatures={"serving_default": module.infer})


def save_export(trained: Any, directory: str, platforms: Sequence[str] = PLATFORMS,
                saved_model: bool = False) -> dict[str, str]:
    """Write :data:`EXPORTED_FILE`, :data:`METADATA_FILE` and, if asked, :data:`SAVED_MODEL_DIR` to ``directory``.

    ``trained``: a ``loop.TrainedModel``. Returns ``{what: absolute path}`` of what was written.
    """
    from resattn_jax.training import data  # reads the normalisation statistics; imports TensorFlow

    directory = os.path.abspath(directory)
    exported = export_inference(trained, platforms)
    os.makedirs(directory, exist_ok=True)
    written = {"function": os.path.join(directory, EXPORTED_FILE)}
    with open(written["function"], "wb") as f:
        f.write(exported.serialize())
    if saved_model:
        written["saved_model"] = os.path.join(directory, SAVED_MODEL_DIR)
        write_saved_model(exported, written["saved_model"])
    mean, std = data.normalisation(trained.config.data)
    image_shape = list(trained.info.eval_image_shape)
    metadata = {
        "function": EXPORTED_FILE,
        "saved_model": SAVED_MODEL_DIR if saved_model else None,
        "platforms": list(exported.platforms),
        "input": {"name": "images", "shape": [None, *image_shape], "dtype": "float32",
                  "normalisation": "(pixels - mean) / std, pixels in 0..255",
                  "mean": [float(m) for m in mean], "std": [float(s) for s in std]},
        "output": {"name": "logits", "shape": [None, trained.info.num_classes], "dtype": "float32"},
        "model": trained.config.model.name, "checkpoint": trained.checkpoint, "step": trained.step,
        "jax_version": jax.__version__,
    }
    written["metadata"] = os.path.join(directory, METADATA_FILE)
    with open(written["metadata"], "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    return written


def load_exported(directory: str) -> Callable[[np.ndarray], jax.Array]:
    """The exported function of ``directory``: ``images float32 [N, H, W, C] -> logits [N, K]`` (jitted)."""
    path = os.path.join(directory, EXPORTED_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{os.path.abspath(directory)} holds no exported model (no {EXPORTED_FILE}); "
                         f"write one with python -m resattn_jax.export")
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return jax.jit(exported.call)


def load_saved_model(directory: str) -> Callable[[np.ndarray], np.ndarray]:
    """The SavedModel of ``directory`` as ``images float32 [N, H, W, C] -> logits [N, K]`` (numpy)."""
    tf, _ = _tensorflow()
    path = os.path.join(directory, SAVED_MODEL_DIR)
    if not os.path.isdir(path):
        raise ValueError(f"{os.path.abspath(directory)} holds no SavedModel (no {SAVED_MODEL_DIR}/); "
                         f"write one with python -m resattn_jax.export --saved-model")
    serving = tf.saved_model.load(path).signatures["serving_default"]
    return lambda images: serving(images=tf.constant(np.asarray(images, np.float32)))["logits"].numpy()


def main(argv: list[str] | None = None) -> int:
    from resattn_jax.tools import inference  # the training side: imports TensorFlow
    from resattn_jax.training import loop

    parser = argparse.ArgumentParser(prog="python -m resattn_jax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="training workdir (checkpoints/, config.json)")
    parser.add_argument("--checkpoint", default="best", help="'best' (default), 'latest' or a step")
    parser.add_argument("--out", required=True, help="directory to write the export to")
    parser.add_argument("--platforms", default=",".join(PLATFORMS),
                        help=f"comma-separated platforms to lower for (default {','.join(PLATFORMS)})")
    parser.add_argument("--saved-model", action="store_true", help="also write a TensorFlow SavedModel (jax2tf)")
    args = parser.parse_args(argv)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    try:
        trained = inference.load(args.workdir, args.checkpoint)
        written = save_export(trained, args.out, platforms, args.saved_model)
    except (ValueError, loop.CheckpointError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    height, width, channels = trained.info.eval_image_shape
    signature = (f"images float32[batch, {height}, {width}, {channels}] -> "
                 f"logits float32[batch, {trained.info.num_classes}]")
    print(f"exported {trained.checkpoint} (step {trained.step}): {signature}, evaluation mode, "
          f"normalised inputs (mean/std in {METADATA_FILE})")
    print(f"wrote {written['function']} (jax.export StableHLO, platforms {', '.join(platforms)})")
    if "saved_model" in written:
        print(f"wrote {written['saved_model']} (TensorFlow SavedModel, signature serving_default)")
    print(f"wrote {written['metadata']} (shapes, normalisation, source checkpoint)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

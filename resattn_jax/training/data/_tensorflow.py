"""TensorFlow for the input pipeline, imported without its eager Keras import.

``tensorflow/__init__`` imports ``keras.src.optimizers`` at once (to register Keras optimizers for
SavedModel loading; it ignores an ``ImportError`` there): about 2 s of a run's start, and it pulls in
scikit-learn and SciPy. The input pipeline uses only ``tf.data``, ``tf.io`` and ``tf.image``, so that
one import is made to fail while TensorFlow loads; Keras imports normally afterwards if anything
asks for it. Every module of this package imports TensorFlow through here (``from ._tensorflow
import tf``), so whichever comes first gets the fast start.
"""

import sys

_KERAS_OPTIMIZERS = "keras.src.optimizers"

if "tensorflow" not in sys.modules and _KERAS_OPTIMIZERS not in sys.modules:
    sys.modules[_KERAS_OPTIMIZERS] = None  # type: ignore[assignment]  (import fails; TensorFlow passes)
    try:
        import tensorflow  # noqa: F401
    finally:
        if _KERAS_OPTIMIZERS in sys.modules and sys.modules[_KERAS_OPTIMIZERS] is None:
            del sys.modules[_KERAS_OPTIMIZERS]

import tensorflow as tf  # noqa: E402

__all__ = ["tf"]

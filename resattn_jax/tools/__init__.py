"""Commands and helpers on top of the library: the train CLI (:mod:`.train`), the step benchmark
(:mod:`.bench`, :mod:`.bench_upsample`), FLOP counting (:mod:`.flops`), a zoo network's summary
table (:mod:`.summary`), inference on a trained run (:mod:`.inference`), soft-mask figures
(:mod:`.visualize`), analysis (:mod:`.analyze`), evaluation of a checkpoint with its confusion
matrix (:mod:`.evaluate`) and export (:mod:`.export`)."""

import os

# TensorFlow is only tfds's input backend here: keep its start-up lines (oneDNN notices, absl's
# "All log messages before absl::InitializeLog()") off the console of every command. Set before any
# command imports TensorFlow; an explicit setting in the environment wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF's own matrix kernels, unused by the input pipeline

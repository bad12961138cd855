"""The training system: data (:mod:`.data`), optimiser (:mod:`.optim`), data parallelism
(:mod:`.parallel`), checkpoints (:mod:`.checkpoint`), metrics (:mod:`.metrics`) and the
train-and-evaluate loop (:mod:`.loop`). Imports nothing eagerly: the input pipeline loads TensorFlow."""

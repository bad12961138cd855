"""The offline digits config shrunk to a small network and a few steps, for tests.

Usable as a config file: ``python train.py --config tests/tiny_config.py:STEPS[,NETWORK] --workdir ...``
with ``NETWORK`` one of :data:`NETWORKS`:

* ``micro`` (the default): the zoo's ``micro`` network, one stage holding one attention module. Most tests train
  it: they check the training loop (resume, checkpoints, signals, recipes), not the architecture,
  and its train step compiles in about a third of the ``tiny`` network's time, which dominates
  the suite's run time on CPU.
* ``small``: :data:`SMALL` (two stages, one pooling each), whose float32 step is well conditioned
  enough to compare across device counts and processes at 1e-5. (The ``tiny`` network's
  BatchNorm-bias gradients nearly cancel on this data, so different reduction orders, e.g. 1 vs 4
  devices, move them by up to 1e-3 after one step.)
* ``tiny``: the zoo's ``tiny`` network (three stages, soft masks with 2/1/1 poolings), for what
  needs every stage: soft-mask figures, stage responses.
"""

from configs import digits

# A small network that still has an attention module (soft mask with BatchNorm) in each stage.
SMALL = dict(stem_width=8, stage_widths=(8, 16), modules_per_stage=(1, 1), mask_pools=(1, 1),
             stage_strides=(1, 2), final_width=16, final_units=0)
#: Zoo network and its overrides, by the name given after the steps.
NETWORKS = {"micro": ("micro", {}), "small": ("tiny", SMALL), "tiny": ("tiny", {})}


def get_config(arg: str = "6"):
    steps, *variant = arg.split(",")
    network = variant[0] if variant else "micro"
    if network not in NETWORKS or len(variant) > 1:
        raise ValueError(f"tests/tiny_config.py:{arg}: expected STEPS[,NETWORK], NETWORK one of {sorted(NETWORKS)}")
    config = digits.get_config()
    name, overrides = NETWORKS[network]
    config.model.name = name
    for key in ("stem_width", "stage_widths", "final_width"):
        del config.model[key]
    config.model.update(overrides)
    config.global_batch_size = 16
    config.eval_batch_size = 64
    config.num_train_steps = int(steps)
    config.log_every_steps = 2
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 2
    config.progress_bar = False
    config.optimizer.warmup_steps = 0
    config.optimizer.boundaries = ()  # digits' (260, 340) lie beyond these runs: a constant rate
    return config

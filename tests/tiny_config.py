"""The offline digits config shrunk to the tiny network and a few steps, for tests.

Usable as a config file: ``python train.py --config tests/tiny_config.py:STEPS --workdir ...``.
"""

from configs import digits


def get_config(steps: str = "6"):
    config = digits.get_config()
    config.model.name = "tiny"
    for key in ("stem_width", "stage_widths", "final_width"):
        del config.model[key]
    config.global_batch_size = 16
    config.eval_batch_size = 64
    config.num_train_steps = int(steps)
    config.log_every_steps = 2
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 2
    config.progress_bar = False
    config.optimizer.warmup_steps = 0
    return config

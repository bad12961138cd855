"""Paper Table 7: ImageNet (ILSVRC 2012) single-crop results.

    python train.py --config configs/imagenet.py:attention92 --workdir runs/in_a92 \
        --config.data.data_dir=/data/tensorflow_datasets

Argument: ``attention56``, ``attention92``, ``attentionnext56`` or ``attentioninception56``.
tfds's ``imagenet2012`` needs the ILSVRC tar files placed in ``<data_dir>/downloads/manual``
(see the tfds catalogue); nothing is downloaded. 10,000 training images are held out for
validation; the official validation set is the reported test split.
Recipe: SGD momentum 0.9, weight decay 1e-4, batch 256, lr 0.1 divided by 10 at 200k, 400k and
500k iterations, stop at 530k; random-resized crops (scale and aspect-ratio jitter) with flips;
single centre crop for evaluation: 224, or 320 for Attention-92.
Paper top-1 / top-5 error (%): Attention-56 21.76 / 5.9, AttentionNeXt-56 21.2 / 5.6,
AttentionInception-56 20.36 / 5.29, Attention-92 19.5 / 4.8.
"""

from configs import cifar, default
from resattn_jax.training.data import data_preset

NETWORKS = ("attention56", "attention92", "attentionnext56", "attentioninception56")


def get_config(arg: str = "attention56"):
    config = default.get_config()
    config.model.name = cifar.parse(arg, NETWORKS, "network")
    config.data = data_preset("imagenet2012")  # streaming, random-resized crops, ImageNet mean/std
    config.data.eval_image_size = 320 if arg == "attention92" else 224

    config.global_batch_size = 256
    config.eval_batch_size = 256
    config.num_train_steps = 530_000
    config.optimizer.nesterov = False
    config.optimizer.boundaries = (200_000, 400_000, 500_000)
    config.log_every_steps = 500
    config.eval_every_steps = 10_000
    config.checkpoint_every_steps = 5_000
    return config

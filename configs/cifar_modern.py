"""CIFAR with a modern recipe: cosine learning rate with warm-up, mixup, label smoothing, Cutout,
EMA of the weights, batch 128 (not the paper's recipe: configs/cifar.py is that).

    python train.py --config configs/cifar_modern.py:cifar10,attention92 --workdir runs/c10_a92_modern

Argument ``DATASET,NETWORK`` as in ``configs/cifar.py``. What each part brings, as its source
reports it (CIFAR-10 test error; none of these figures is ours):

* mixup, alpha = 1 (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018, Table 2):
  PreAct ResNet-18 5.6 -> 4.2 %, WRN-28-10 3.8 -> 2.7 %, 200 epochs, lr 0.1 / 10 at epochs 100, 150.
* Cutout 16x16 on CIFAR-10 (8x8 on CIFAR-100) (DeVries & Taylor, "Improved Regularization of
  Convolutional Neural Networks with Cutout", 2017, Table 1): ResNet-18 4.72 -> 3.99 %,
  WRN-16-8 4.00 -> 3.08 %.
* Cosine decay without restarts, after a linear warm-up, label smoothing 0.1, no weight decay on
  BatchNorm parameters and biases (He et al., "Bag of Tricks for Image Classification with
  Convolutional Neural Networks", CVPR 2019, Tables 5-6, on ImageNet: each a few tenths of a
  point of top-1; Loshchilov & Hutter, "SGDR", ICLR 2017, for the cosine schedule). Our weight
  decay already skips BatchNorm and biases (resattn_jax/training/optim.py).
* EMA of the weights, decay 0.999 (Polyak averaging; as timm's ``--model-ema``), evaluated and
  saved beside the weights; the best checkpoint is chosen by the EMA weights' validation accuracy.
* Weight decay 5e-4, as the Cutout paper's wide ResNets (the paper's recipe: 1e-4).

Together such recipes take CIFAR-10 ResNets from ~95 % to ~97 %: the target for Attention-92,
whose paper recipe gives 95.01 % (4.99 % error, Table 5). 300 epochs of 45,000 images at batch 128.
"""

from configs import cifar

EPOCH = 45_000 // 128  # iterations per epoch of train[5000:] at batch 128


def get_config(arg: str = "cifar10,attention92"):
    config = cifar.get_config(arg)
    config.global_batch_size = 128
    config.num_train_steps = 300 * EPOCH
    config.optimizer.learning_rate = 0.1
    config.optimizer.schedule = "cosine"
    config.optimizer.boundaries = ()  # unused by the cosine schedule
    config.optimizer.warmup_steps = 5 * EPOCH
    config.optimizer.weight_decay = 5e-4
    config.label_smoothing = 0.1
    config.mix.mixup_alpha = 1.0
    config.mix.cutout = 16 if config.data.name == "cifar10" else 8
    config.ema_decay = 0.999
    config.best_by = "ema"
    config.eval_every_steps = 5 * EPOCH
    config.checkpoint_every_steps = 5 * EPOCH
    return config

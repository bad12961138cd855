"""Independent PyTorch twins of our networks (ImageNet Attention-56, the CIFAR layout), for CPU timings.

Self-contained re-implementations (torch.nn, float32) of the Residual Attention Network
(Wang et al., "Residual Attention Network for Image Classification", CVPR 2017), written from the
architecture description only: this script does not import ``resattn_jax`` and shares no code
with it. It measures PyTorch train-step and inference times on the same machine as the JAX
benchmark (``python -m resattn_jax.bench``); ``benchmarks/compare_pytorch.py`` interleaves both and
checks that the twin's parameter and multiply-add counts equal ours.

Networks (``--model``), each with the count of learnable parameters it must have (checked here;
multiply-adds per image are counted by forward hooks on every convolution and linear layer, the
figure ``resattn_jax.tools.flops.model_macs`` reports):

* ``attention56``: ImageNet Attention-56 at 224x224, 1000 classes: 31,810,728 parameters (6,270,836,736 multiply-adds per image).
* ``cifar_attention56`` / ``cifar_attention92``: our documented CIFAR layout at 32x32, 10 classes
  (1 or 2 attention modules per stage): 1,081,818 / 1,825,690 parameters (120,736,256 / 207,735,296 multiply-adds per image).

Architecture:

* ``Unit(in_c, out_c, stride)``: pre-activation bottleneck. ``pre = ReLU(BN(x))``;
  ``y = conv1x1(pre, out_c/4) -> BN -> ReLU -> conv3x3(out_c/4, stride) -> BN -> ReLU ->
  conv1x1(out_c)``; the shortcut is ``x`` when shapes match, else ``conv1x1(pre, out_c, stride)``.
  All convolutions are bias-free.
* ``Attn(c, L)`` (p=1, t=2, r=1): ``pre`` unit; trunk of 2 units; soft-mask branch with ``L``
  max-pool down-samplings (3x3/2, padding 1; one unit per level, two at the lowest, a skip unit at
  every level but the lowest), bilinear up-sampling (align_corners=True) with skip additions and
  one unit per up-step, a head BN-ReLU-conv1x1-BN-ReLU-conv1x1-sigmoid; output
  ``(1 + mask) * trunk`` then a ``post`` unit. Mask-branch units: 8, 5, 2 for L = 3, 2, 1.
* ImageNet: stem conv7x7/2 (3 -> 64), BN, ReLU, maxpool 3x3/2 (224 -> 56) -> Unit(64, 256) ->
  Attn(256, 3) -> Unit(256, 512, /2) -> Attn(512, 2) -> Unit(512, 1024, /2) -> Attn(1024, 1) ->
  Unit(1024, 2048, /2) -> 2 x Unit(2048, 2048).
* CIFAR: stem conv3x3 (3 -> 16) -> Unit(16, 64) -> m x Attn(64, 2) -> Unit(64, 128, /2) ->
  m x Attn(128, 1) -> Unit(128, 256, /2) -> m x Attn(256, 1) -> 3 x Unit(256, 256) (m = 1 or 2).
* Both end with BN -> ReLU -> global average pool -> Linear(classes).

Method: synthetic random inputs and labels are created once. A train step is forward,
cross-entropy loss, backward and an ``SGD(lr=0.1, momentum=0.9, nesterov=True,
weight_decay=1e-4)`` update, in train mode (BatchNorm batch statistics). An eval step is the
forward pass after ``model.eval()`` under ``torch.inference_mode()``. ``--warmup`` steps run
untimed; each of ``--steps`` steps is then timed on its own with ``time.perf_counter`` (CPU,
synchronous) and the median is reported. ``--threads`` sets ``torch.set_num_threads``.

Command lines (in a venv with CPU PyTorch, e.g. ``/tmp/torchvenv``):

    python benchmarks/pytorch_reference.py --mode train --batch-size 8 --image-size 224 --steps 5 --warmup 2 --threads 2 --json
    python benchmarks/pytorch_reference.py --model cifar_attention92 --mode eval --batch-size 128 --image-size 32 --channels-last --json

Options: ``--model`` (attention56), ``--mode train|eval`` (train), ``--batch-size`` (8),
``--image-size`` (224), ``--steps`` (5), ``--warmup`` (2), ``--threads`` (2), ``--num-classes``
(the network's: 1000 or 10), ``--seed`` (0), ``--channels-last``, ``--json`` (print exactly one
JSON object line: ``{"framework": "pytorch", "torch_version", "model", "mode", "step_ms_median",
"images_per_sec", "params", "macs_per_image", ...}``). A twin whose parameter count differs from
the expected one (at the default class count) exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

#: Per network: (layout, modules per stage, default classes, expected parameters at that class count).
MODELS = {
    "attention56": ("imagenet", (1, 1, 1), 1000, 31_810_728),
    "cifar_attention56": ("cifar", (1, 1, 1), 10, 1_081_818),
    "cifar_attention92": ("cifar", (2, 2, 2), 10, 1_825_690),
}


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class Unit(nn.Module):
    """Pre-activation bottleneck residual unit (BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1)."""

    def __init__(self, in_c: int, out_c: int, stride: int = 1):
        super().__init__()
        mid = out_c // 4
        self.bn1 = _bn(in_c)
        self.conv1 = nn.Conv2d(in_c, mid, 1, bias=False)
        self.bn2 = _bn(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, bias=False)
        self.bn3 = _bn(mid)
        self.conv3 = nn.Conv2d(mid, out_c, 1, bias=False)
        self.shortcut = None
        if in_c != out_c or stride != 1:
            self.shortcut = nn.Conv2d(in_c, out_c, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        y = self.conv1(pre)
        y = self.conv2(F.relu(self.bn2(y)))
        y = self.conv3(F.relu(self.bn3(y)))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        return y + shortcut


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class Attn(nn.Module):
    """Attention module (p=1, t=2, r=1) with ``num_pools`` down-samplings in its soft-mask branch."""

    def __init__(self, c: int, num_pools: int):
        super().__init__()
        if num_pools < 1:
            raise ValueError("num_pools must be >= 1")
        self.num_pools = num_pools
        self.pre = Unit(c, c)
        self.trunk = nn.Sequential(Unit(c, c), Unit(c, c))
        # Down path: one unit per level, two at the lowest level.
        self.down = nn.ModuleList(
            nn.Sequential(*[Unit(c, c) for _ in range(2 if level == num_pools - 1 else 1)])
            for level in range(num_pools))
        # Skip units at every level except the lowest.
        self.skips = nn.ModuleList(Unit(c, c) for _ in range(num_pools - 1))
        # Up path: one unit per up-step (levels L-1 .. 1).
        self.up = nn.ModuleList(Unit(c, c) for _ in range(num_pools - 1))
        self.head = nn.Sequential(
            _bn(c), nn.ReLU(inplace=True), nn.Conv2d(c, c, 1, bias=False),
            _bn(c), nn.ReLU(inplace=True), nn.Conv2d(c, c, 1, bias=False),
            nn.Sigmoid())
        self.post = Unit(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)

        sizes = []  # size of each level's pooling input
        skips = []
        m = x
        for level in range(self.num_pools):
            sizes.append(m.shape[-2:])
            m = F.max_pool2d(m, 3, stride=2, padding=1)
            m = self.down[level](m)
            if level < self.num_pools - 1:
                skips.append(self.skips[level](m))
        for level in range(self.num_pools - 1, 0, -1):
            m = _upsample(m, sizes[level]) + skips[level - 1]
            m = self.up[self.num_pools - 1 - level](m)
        m = _upsample(m, sizes[0])
        mask = self.head(m)
        return self.post((1 + mask) * trunk)


class Network(nn.Module):
    """The ImageNet or CIFAR layout (module docstring) with ``modules`` attention modules per stage."""

    def __init__(self, layout: str, modules, num_classes: int):
        super().__init__()
        if layout == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), _bn(64), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1))
            widths, pools, final = (256, 512, 1024), (3, 2, 1), [Unit(1024, 2048, 2), Unit(2048, 2048), Unit(2048, 2048)]
            c = 64
        elif layout == "cifar":  # pre-activation units: the stem is the convolution alone
            self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            widths, pools, final = (64, 128, 256), (2, 1, 1), [Unit(256, 256) for _ in range(3)]
            c = 16
        else:
            raise ValueError(f"unknown layout {layout!r}")
        body = []
        for s, (width, pool, m) in enumerate(zip(widths, pools, modules)):
            body.append(Unit(c, width, 1 if s == 0 else 2))
            body += [Attn(width, pool) for _ in range(m)]
            c = width
        self.body = nn.Sequential(*body, *final)
        c = final[-1].conv3.out_channels
        self.final_bn = _bn(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        x = F.relu(self.final_bn(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def create(name: str, num_classes: int | None = None) -> nn.Module:
    layout, modules, classes, _ = MODELS[name]
    return Network(layout, modules, classes if num_classes is None else num_classes)


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-adds of one image's forward pass in every Conv2d and Linear (forward hooks)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * kh * kw * module.in_channels // module.groups
        else:
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    model.train(was_training)
    for h in handles:
        h.remove()
    return total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(mode: str, batch_size: int, image_size: int, steps: int, warmup: int, threads: int,
        num_classes: int | None = None, seed: int = 0, channels_last: bool = False,
        model_name: str = "attention56") -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = create(model_name, num_classes)
    num_classes = model.fc.out_features
    params = count_params(model)
    macs = count_macs(model, image_size)
    images = torch.randn(batch_size, 3, image_size, image_size, dtype=torch.float32)
    labels = torch.randint(0, num_classes, (batch_size,))
    if channels_last:  # NHWC memory layout for the convolutions (oneDNN's preferred CPU format)
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)

    if mode == "train":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                    weight_decay=1e-4)
        loss_fn = nn.CrossEntropyLoss()

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            return loss.item()
    elif mode == "eval":
        model.eval()

        def step():
            with torch.inference_mode():
                return model(images)
    else:
        raise ValueError(f"unknown mode {mode!r}")

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "framework": "pytorch",
        "torch_version": torch.__version__,
        "model": model_name,
        "mode": mode,
        "step_ms_median": median * 1e3,
        "images_per_sec": batch_size / median,
        "params": params,
        "macs_per_image": macs,
        "num_classes": num_classes,
        "batch_size": batch_size,
        "image_size": image_size,
        "steps": steps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "channels_last": channels_last,
        "step_ms_all": [t * 1e3 for t in times],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="attention56", choices=tuple(MODELS))
    parser.add_argument("--mode", default="train", choices=("train", "eval"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=None, help="default: the network's (1000 or 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory layout (default NCHW)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object line")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    result = run(args.mode, args.batch_size, args.image_size, args.steps, args.warmup,
                 args.threads, args.num_classes, args.seed, args.channels_last, args.model)
    _, _, classes, expected = MODELS[args.model]
    if result["num_classes"] == classes and result["params"] != expected:
        print(f"pytorch_reference: the {args.model} twin has {result['params']:,} parameters, expected "
              f"{expected:,}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(f"pytorch {result['torch_version']}  {args.model}  mode={args.mode}  batch={args.batch_size}  "
              f"image={args.image_size}  threads={result['threads']}  float32  "
              f"{'channels_last' if args.channels_last else 'NCHW'}")
        print(f"step time (median of {args.steps}): {result['step_ms_median']:.1f} ms")
        print(f"throughput: {result['images_per_sec']:.2f} images/s")
        print(f"parameters: {result['params']:,}; multiply-adds per image: {result['macs_per_image']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ResNet11 on CIFAR-10, trained directly on Poisson spikes (Lee et al. 2020).

    32×32×3 – cnn11 64 – P – [cnn21 128, cnn22 128] – [cnn31 256, cnn32 256 /2] – [cnn41 512, cnn42 512]
    – [cnn51 512, cnn52 512 /2] – fc0 1024 – fc1 10
    In each [block] the shortcut current joins the second conv's membrane: I = conv2(o) + shortcut(x).
    fc1: one output per class of --dataset.

Train:     python cifar10_ResNet11.py
Evaluate:  python cifar10_ResNet11.py --resume model_bestT1_cifar10_r11.pth.tar --evaluate
Other:     python cifar10_ResNet11.py --dataset cifar100   (or svhn; or --dataset folder --data-dir DIR)
"""
import utils  # first: it sets the process settings torch reads when it loads
import torch.nn as nn
from spiking_layers import Conv2d, Linear, PoolIF, SpikingConv2d, SpikingLinear, SpikingNetwork, init_weights

DEFAULTS = dict(                 # the paper's settings (docs/reproduce.md)
    dataset="cifar10",
    time_steps=100,
    leak=0.99,
    lr=0.0025,
    lr_steps=(70, 100, 125),     # ×0.2 at each
    epochs=150,
    batch_size=16,
    test_batch_size=8,
    dropout=0.25,
    momentum=0.0,                # the authors parsed 0.9 but never passed it to SGD
    weight_decay=5e-4,
    seed=3,
    cuda_seed=44,
    tag="cifar10_r11",
)


class ResNet11(SpikingNetwork):
    def __init__(self, time_steps=100, leak=0.99, dropout=0.25, time_chunk=None, classes=10):
        super().__init__(time_steps, leak, time_chunk)
        kw = dict(padding=1, leak=leak, dropout=dropout)
        self.cnn11 = SpikingConv2d(3, 64, 3, **kw)
        self.pool1 = PoolIF()
        self.cnn21, self.cnn22 = SpikingConv2d(64, 128, 3, **kw), SpikingConv2d(128, 128, 3, **kw)
        # Sequential: the authors' checkpoints name these weights shortcut1.0.weight, ...
        self.shortcut1 = nn.Sequential(Conv2d(64, 128, 1))
        self.cnn31, self.cnn32 = SpikingConv2d(128, 256, 3, **kw), SpikingConv2d(256, 256, 3, stride=2, **kw)
        self.shortcut2 = nn.Sequential(Conv2d(128, 256, 1, stride=2))
        self.cnn41, self.cnn42 = SpikingConv2d(256, 512, 3, **kw), SpikingConv2d(512, 512, 3, **kw)
        self.shortcut3 = nn.Sequential(Conv2d(256, 512, 1))
        self.cnn51, self.cnn52 = SpikingConv2d(512, 512, 3, **kw), SpikingConv2d(512, 512, 3, stride=2, **kw)
        self.fc0 = SpikingLinear(512 * 4 * 4, 1024, leak=leak, dropout=dropout)
        self.fc1 = Linear(1024, classes)
        init_weights(self, gain=1.0)

    def step(self, x):                                        # x: (k, B, 3, 32, 32)
        x = self.pool1(self.cnn11(x))                         # (k, B, 64, 16, 16)
        x = self.cnn22(self.cnn21(x), self.shortcut1(x))      # (k, B, 128, 16, 16)
        x = self.cnn32(self.cnn31(x), self.shortcut2(x))      # (k, B, 256, 8, 8)
        x = self.cnn42(self.cnn41(x), self.shortcut3(x))      # (k, B, 512, 8, 8)
        x = self.cnn52(self.cnn51(x), x[..., ::2, ::2])       # (k, B, 512, 4, 4) identity shortcut, stride 2
        x = self.fc0(x.flatten(2))                            # (k, B, 1024)
        return self.fc1(x)                                    # (k, B, classes) output currents


if __name__ == "__main__":
    utils.main(ResNet11, DEFAULTS)

"""ResNet7 on SVHN, trained directly on Poisson spikes (Lee et al. 2020).

The paper trains a 7-layer ResNet on SVHN but its exact layer string could not be recovered.
This is our reconstruction: ResNet11's stem and its first two blocks.

    32×32×3 – cnn11 64 – P – [cnn21 128, cnn22 128] – [cnn31 256, cnn32 256 /2] – fc0 1024 – fc1 10
    (fc1: one output per class of --dataset)

Train:     python svhn_ResNet.py
Evaluate:  python svhn_ResNet.py --resume model_bestT1_svhn_r7.pth.tar --evaluate
Other:     python svhn_ResNet.py --dataset cifar10         (or cifar100; or --dataset folder --data-dir DIR)
"""
import utils  # first: it sets the process settings torch reads when it loads
import torch.nn as nn
from spiking_layers import Conv2d, Linear, PoolIF, SpikingConv2d, SpikingLinear, SpikingNetwork, init_weights

DEFAULTS = dict(                 # ResNet11's settings (cifar10_ResNet11.py), on SVHN
    dataset="svhn",
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
    tag="svhn_r7",               # checkpointT1_svhn_r7.pth.tar, model_bestT1_svhn_r7.pth.tar
)


class ResNet7(SpikingNetwork):
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
        self.fc0 = SpikingLinear(256 * 8 * 8, 1024, leak=leak, dropout=dropout)
        self.fc1 = Linear(1024, classes)
        init_weights(self, gain=1.0)

    def step(self, x):                                        # x: (k, B, 3, 32, 32)
        x = self.pool1(self.cnn11(x))                         # (k, B, 64, 16, 16)
        x = self.cnn22(self.cnn21(x), self.shortcut1(x))      # (k, B, 128, 16, 16)
        x = self.cnn32(self.cnn31(x), self.shortcut2(x))      # (k, B, 256, 8, 8)
        x = self.fc0(x.flatten(2))                            # (k, B, 1024)
        return self.fc1(x)                                    # (k, B, classes) output currents


if __name__ == "__main__":
    utils.main(ResNet7, DEFAULTS)

"""VGG9 on CIFAR-10, trained directly on Poisson spikes (Lee et al. 2020).

    32×32×3 – 64 – 64 – P – 128 – 128 – P – 256 – 256 – 256 – P – 1024 – 10
    (3×3 convs, padding 1; P: 2×2 avg pool + IF(0.75); time-fixed dropout after every LIF layer;
    the last layer: one output per class of --dataset)

Train:     python cifar10_VGG9.py
Evaluate:  python cifar10_VGG9.py --resume model_bestT1_cifar10_v9.pth.tar --evaluate
Other:     python cifar10_VGG9.py --dataset cifar100      (or svhn; or --dataset folder --data-dir DIR)
"""
import utils  # first: it sets the process settings torch reads when it loads
from spiking_layers import Linear, PoolIF, SpikingConv2d, SpikingLinear, SpikingNetwork, init_weights

DEFAULTS = dict(                 # the paper's settings (docs/reproduce.md)
    dataset="cifar10",
    time_steps=100,
    leak=0.99,
    lr=0.0033,
    lr_steps=(70, 100, 125),     # ×0.2 at each
    epochs=150,
    batch_size=16,
    test_batch_size=8,
    dropout=0.2,
    momentum=0.0,                # the authors parsed 0.9 but never passed it to SGD
    weight_decay=5e-4,
    seed=3,
    cuda_seed=44,
    tag="cifar10_v9",
)


class VGG9(SpikingNetwork):
    images_per_call = 80  # CPU: a call's currents then stay within the cache-friendly size; docs/performance.md

    def __init__(self, time_steps=100, leak=0.99, dropout=0.2, time_chunk=None, classes=10):
        super().__init__(time_steps, leak, time_chunk)
        kw = dict(padding=1, leak=leak, dropout=dropout)
        self.cnn11, self.cnn12 = SpikingConv2d(3, 64, 3, **kw), SpikingConv2d(64, 64, 3, **kw)
        self.pool1 = PoolIF()
        self.cnn21, self.cnn22 = SpikingConv2d(64, 128, 3, **kw), SpikingConv2d(128, 128, 3, **kw)
        self.pool2 = PoolIF()
        self.cnn31 = SpikingConv2d(128, 256, 3, **kw)
        self.cnn32, self.cnn33 = SpikingConv2d(256, 256, 3, **kw), SpikingConv2d(256, 256, 3, **kw)
        self.pool3 = PoolIF()
        self.fc0 = SpikingLinear(256 * 4 * 4, 1024, leak=leak, dropout=dropout)
        self.fc1 = Linear(1024, classes)
        init_weights(self, gain=2.0)

    def step(self, x):                                          # x: (k, B, 3, 32, 32)
        x = self.pool1(self.cnn12(self.cnn11(x)))               # (k, B, 64, 16, 16)
        x = self.pool2(self.cnn22(self.cnn21(x)))               # (k, B, 128, 8, 8)
        x = self.pool3(self.cnn33(self.cnn32(self.cnn31(x))))   # (k, B, 256, 4, 4)
        x = self.fc0(x.flatten(2))                              # (k, B, 1024)
        return self.fc1(x)                                      # (k, B, classes) output currents


if __name__ == "__main__":
    utils.main(VGG9, DEFAULTS)

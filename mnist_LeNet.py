"""LeNet on MNIST or Fashion-MNIST, trained directly on Poisson spikes (Lee et al. 2020).

    28×28×1 – cnn1 5×5 20 – P – cnn2 5×5 50 – P – fc0 200 – fc1 10      P: 2×2 avg pool + IF(0.75)
    (fc1: one output per class of --dataset)

Train:     python mnist_LeNet.py --dataset fashion-mnist
Evaluate:  python mnist_LeNet.py --dataset fashion-mnist --resume pretrained/lenet_fashion_T20.pth.tar --evaluate --time-steps 100
Yours:     python mnist_LeNet.py --dataset folder --data-dir DIR      DIR/train/<class>/*.png, DIR/test/<class>/*.png
"""
import utils  # first: it sets the process settings torch reads when it loads
from spiking_layers import Linear, PoolIF, SpikingConv2d, SpikingLinear, SpikingNetwork, init_weights

DEFAULTS = dict(                 # the paper's settings (docs/reproduce.md)
    dataset="mnist",
    time_steps=100,
    leak=0.99,
    lr=0.0085,
    lr_steps=(75,),              # ×0.2 at each
    epochs=125,
    batch_size=64,
    test_batch_size=64,
    dropout=0.0,
    momentum=0.0,                # the authors parsed 0.9 but never passed it to SGD
    weight_decay=5e-4,
    seed=1,
    cuda_seed=42,
    tag="mnist1",                # checkpointT1_mnist1.pth.tar, model_bestT1_mnist1.pth.tar
)


class LeNet(SpikingNetwork):
    def __init__(self, time_steps=100, leak=0.99, dropout=0.0, time_chunk=None, classes=10):
        super().__init__(time_steps, leak, time_chunk)
        kw = dict(leak=leak, dropout=dropout)
        self.cnn1 = SpikingConv2d(1, 20, 5, padding=2, **kw)
        self.pool1 = PoolIF()
        self.cnn2 = SpikingConv2d(20, 50, 5, padding=2, **kw)
        self.pool2 = PoolIF()
        self.fc0 = SpikingLinear(50 * 7 * 7, 200, **kw)
        self.fc1 = Linear(200, classes)
        init_weights(self, gain=2.0)

    def step(self, x):                  # x: (k, B, 1, 28, 28) input spikes of k time steps
        x = self.pool1(self.cnn1(x))    # (k, B, 20, 14, 14)
        x = self.pool2(self.cnn2(x))    # (k, B, 50, 7, 7)
        x = self.fc0(x.flatten(2))      # (k, B, 200)
        return self.fc1(x)              # (k, B, classes) output currents


if __name__ == "__main__":
    utils.main(LeNet, DEFAULTS)

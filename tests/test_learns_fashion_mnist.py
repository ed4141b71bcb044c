"""The method learns real images: LeNet trained from scratch on Fashion-MNIST through the normal
training code (the leak-aware gradient, summed squared error, SGD), then evaluated on the first
2,000 test images. A negative control with the spike function's gradient forced to zero shows
that the accuracy bar can fail.

Settings, chosen to fit CI's 2 cores in a few minutes: the first 10,000 training images, 3 epochs,
T = 16, batch 32, lr 0.0085 (the paper's) with momentum 0.5 (the paper's 0 needs more images:
78.9 % after 2 epochs of 6,000). Measured here: 77.2 / 80.35 / 84.45 % after epochs 1 / 2 / 3
(`python mnist_LeNet.py --dataset fashion-mnist --epochs 3 -b 32 --time-steps 16
--limit-train 10000 --momentum 0.5 --limit-val 2000`); a change of summation order alone (the
event-driven convolutions) moved epoch 2 from 81.0 to 80.35 %, hence the third epoch's margin.
"""
import csv
import os

import pytest

import spiking_layers
import utils
from mnist_LeNet import DEFAULTS, LeNet

RUN = ["--dataset", "fashion-mnist", "--time-steps", "16", "-b", "32", "--lr", "0.0085", "--momentum", "0.5",
       "--limit-train", "10000", "--limit-val", "2000", "-j", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture
def dirs(tmp_path, fashion_mnist):
    return ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path)]


def final_test_prec1(out_dir):
    with open(os.path.join(out_dir, "log_mnist1.csv")) as f:
        return float(list(csv.DictReader(f))[-1]["test_prec1"])


def test_lenet_learns_fashion_mnist(dirs, tmp_path):
    utils.main(LeNet, DEFAULTS, datasets=("mnist", "fashion-mnist"), argv=RUN + ["--epochs", "3"] + dirs)
    assert final_test_prec1(tmp_path) >= 80.0


def test_without_the_spike_gradient_it_does_not(dirs, tmp_path, monkeypatch):
    """∂o_t/∂U'_t forced to 0 in every LIF and pooling neuron: no hidden layer learns. The output
    layer fc1 is not behind a spike function, so it still learns a linear readout of the
    untrained spiking features: 50.75 % after one epoch of these 10,000 images (47.9 % after one of
    6,000, 51.0 % after two; not the 30 % the issue expected). One epoch here, to save CI time;
    the bar below is far from 80 %."""
    monkeypatch.setattr(spiking_layers._Window, "slope", lambda self, *a: self.n.new_zeros(self.n.numel()))
    utils.main(LeNet, DEFAULTS, datasets=("mnist", "fashion-mnist"), argv=RUN + ["--epochs", "1"] + dirs)
    assert final_test_prec1(tmp_path) < 65.0

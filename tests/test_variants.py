"""Networks and uses beyond the paper's, alike on every backend: weight layers fed sums of spikes,
odd maps into 2×2 pooling (against the per-step reference, tests/reference.py, in float64), and
weights changed in place between forward passes (seen by the next pass, whatever the route)."""
import os

import pytest
import torch
import torch.nn.utils.prune as prune

import checkpoints
import spiking_kernels
import spiking_layers as sl
from conftest import ROOT, signed_spikes
from spiking_kernels import numba_cpu
from test_engine import backend, compare_with_reference, crossovers, device  # noqa: F401  (fixtures)


class SEW(sl.SpikingNetwork):
    """Residuals that add a layer's spikes to those of two layers after it (SEW-ResNet's ADD):
    `mix` and `fc3` get values 0, 1 and 2, which they compute with as floats."""

    def __init__(self, time_steps):
        super().__init__(time_steps, 0.99)
        self.conv = sl.SpikingConv2d(2, 4, 3, padding=1)
        self.res1 = sl.SpikingConv2d(4, 4, 3, padding=1, dropout=0.2)
        self.res2 = sl.SpikingConv2d(4, 4, 3, padding=1)
        self.mix = sl.SpikingConv2d(4, 4, 3, padding=1)
        self.pool = sl.PoolIF()
        self.fc0 = sl.SpikingLinear(4 * 3 * 3, 12)
        self.fc1 = sl.SpikingLinear(12, 12, dropout=0.2)
        self.fc2 = sl.SpikingLinear(12, 12)
        self.fc3 = sl.Linear(12, 10)
        sl.init_weights(self, gain=8.0)  # strong enough that every layer fires

    def step(self, x):                                 # (k, B, 2, 6, 6)
        x = self.conv(x)
        x = x + self.res2(self.res1(x))
        x = self.pool(self.mix(x))                     # (k, B, 4, 3, 3)
        x = self.fc0(x.flatten(2))
        x = x + self.fc2(self.fc1(x))
        return self.fc3(x)


class OddMaps(sl.SpikingNetwork):
    """Odd maps into 2×2 pooling, as F.avg_pool2d floors them: 11×9 -> 5×4 -> 2×2."""

    def __init__(self, time_steps):
        super().__init__(time_steps, 0.99)
        self.conv = sl.SpikingConv2d(2, 4, 3, padding=1, dropout=0.2)
        self.pool1 = sl.PoolIF()
        self.conv2 = sl.SpikingConv2d(4, 4, 3, padding=1)
        self.pool2 = sl.PoolIF()
        self.fc = sl.Linear(4 * 2 * 2, 10)
        sl.init_weights(self, gain=8.0)

    def step(self, x):                                 # (k, B, 2, 11, 9)
        x = self.pool1(self.conv(x))                   # (k, B, 4, 5, 4)
        return self.fc(self.pool2(self.conv2(x)).flatten(2))


def test_summed_spikes_into_weight_layers_match_reference(backend, device):
    """A convolution and a Linear layer fed sums of two layers' spikes give the outputs and
    gradients of plain ones (the per-step reference's), T = 4 in chunks of 3 and 1: no
    assertion, no backend-dependent error."""
    torch.manual_seed(1)
    net = SEW(4).double().to(device)
    _, record = compare_with_reference(net, "sew", signed_spikes((4, 3, 2, 6, 6), 0.5, device=device), 3)
    assert ((record["conv"] + record["res2"]) == 2).any() and ((record["fc0"] + record["fc2"]) == 2).any(), \
        "no sum reached 2: the test would be vacuous"


def test_odd_maps_into_pooling_match_reference(backend, device):
    """2×2 pooling of 11×9 and 5×4 maps, forward and backward (fused into the pooling neurons on
    numba), as the per-step reference's F.avg_pool2d: the last row or column dropped (its
    gradient 0)."""
    torch.manual_seed(2)
    net = OddMaps(4).double().to(device)
    compare_with_reference(net, "odd", signed_spikes((4, 3, 2, 11, 9), 0.5, device=device), 3)
    assert net.pool1.u.shape[-2:] == (5, 4) and net.pool2.u.shape[-2:] == (2, 2)
    with pytest.raises(ValueError, match="2×2 pooling needs maps of at least 2×2, got"):
        sl.PoolIF()(torch.ones(2, 1, 3, 1, 5, dtype=torch.float64, device=device))


# ----------------------------------------------------------------------------------------------
# Weights changed in place between passes

PRETRAINED = os.path.join(ROOT, "pretrained", "lenet_fashion_T20.pth.tar")
EDITED = ("cnn2", "fc0", "fc1")


def _halve_data(net):
    for name in EDITED:
        getattr(net, name).weight.data.mul_(0.5)


def _rebind_data(net):
    for name in EDITED:
        layer = getattr(net, name)
        layer.weight.data = layer.weight.data * 0.5


def _halve_in_place(net):
    with torch.no_grad():
        for name in EDITED:
            getattr(net, name).weight.mul_(0.5)


def _optimizer_step(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for p in net.parameters():
        p.grad = p.detach().clone()
    opt.step()


def _prune(net):
    for name in EDITED:
        prune.l1_unstructured(getattr(net, name), "weight", amount=0.5)


def _load_halved(net):
    net.load_state_dict({k: v * 0.5 for k, v in net.state_dict().items()})


EDITS = {"data.mul_": _halve_data, "data rebound": _rebind_data, "no_grad mul_": _halve_in_place,
         "optimizer step": _optimizer_step, "prune": _prune, "load_state_dict": _load_halved}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("name", ["numba", "numba-events", "torch"])
def test_weights_changed_in_place_are_seen_by_the_next_pass(edit, name, monkeypatch):
    """The shipped LeNet, run once, then its weights changed (through .data, in place under
    no_grad, by an optimizer, a pruning mask, load_state_dict): the next pass gives exactly the
    output of a fresh LeNet loaded with the changed weights, on the same spike train."""
    from mnist_LeNet import LeNet
    previous = spiking_kernels.use(name.split("-")[0])
    if name == "numba-events":
        monkeypatch.setattr(numba_cpu, "EVENT_DENSITY", crossovers(1.1))
    try:
        net = LeNet(time_steps=6).eval()
        checkpoints.load_checkpoint(PRETRAINED, net)
        images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
        spikes = net.encode(images, torch.Generator().manual_seed(1))
        with torch.no_grad():
            before = net(spikes)
            EDITS[edit](net)
            after = net(spikes)
            fresh = LeNet(time_steps=6).eval()
            fresh.load_state_dict({f"{n}.weight": m.weight.detach().clone() for n, m in net.named_children()
                                   if hasattr(m, "weight")})
            assert not torch.equal(after, before), "the edit changed nothing: the test would be vacuous"
            assert torch.equal(after, fresh(spikes))
    finally:
        spiking_kernels.use(previous)

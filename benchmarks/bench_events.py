"""Event-driven against dense convolutions on the CPU, per layer and input density: where the
crossovers that set spiking_kernels.numba_cpu.EVENT_DENSITY lie.

    python benchmarks/bench_events.py
    python benchmarks/bench_events.py --layers lenet.cnn2 --densities 0.02,0.1 --json

For each layer shape (one chunk of k·B images, as the engine calls it on a CPU) and each density
of binary input spikes, times the output (no grad) and the weight gradient on both paths, the two
alternating round by round, and prints dense time / event time (> 1: events are faster). Dense
convolutions run channels-last, as the engine runs them on a CPU.
"""
import argparse

import torch

import harness
import spiking_layers as sl
from spiking_kernels import numba_cpu
from spiking_kernels.layout import channels_last

LAYERS = {  # name: (in channels, out channels, kernel, padding, images per call, height = width)
    "lenet.cnn2": (20, 50, 5, 2, 256, 14),
    "vgg9.cnn12": (64, 64, 3, 1, 160, 32),
    "vgg9.cnn22": (128, 128, 3, 1, 160, 16),
    "vgg9.cnn32": (256, 256, 3, 1, 160, 8),
    "resnet11.cnn42": (512, 512, 3, 1, 160, 4),
}
DENSE, EVENTS = dict(forward=0.0, weight_grad=0.0), dict(forward=2.0, weight_grad=2.0)


def make_calls(name, density):
    c, o, kernel, pad, n, size = LAYERS[name]
    torch.manual_seed(0)
    layer = sl.Conv2d(c, o, kernel, padding=pad)
    x = (torch.rand(1, n, c, size, size) < density).float()
    q, s = x.to(torch.int8), torch.tensor(1.0)
    grad = torch.randn(1, n, o, size + 2 * pad - kernel + 1, size + 2 * pad - kernel + 1)
    weight = layer.weight.detach()

    def forward(mode):
        def call():
            numba_cpu.EVENT_DENSITY = mode
            with torch.no_grad():
                sl.synapse(layer, x)
        return call

    def weight_grad(mode):
        flat = (channels_last(x.flatten(0, 1)), channels_last(grad.flatten(0, 1)))  # as the engine runs them
        if mode is EVENTS:
            return lambda: numba_cpu.event_weight_grad(layer, q, s, weight, grad)
        return lambda: torch.ops.aten.convolution_backward(flat[1], flat[0], weight, None, [1, 1], [pad, pad],
                                                           [1, 1], False, [0, 0], 1, [False, True, False])
    return {"forward": (forward(DENSE), forward(EVENTS)), "weight_grad": (weight_grad(DENSE), weight_grad(EVENTS))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default=",".join(LAYERS), help="(default: %(default)s)")
    p.add_argument("--densities", default="0.01,0.02,0.05,0.1,0.15", help="(default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: %(default)s)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    harness.run_as("engine")  # both paths are the engine's: with the settings our scripts run under
    saved, rows = numba_cpu.EVENT_DENSITY, harness.Rows(args.json)
    try:
        for name in args.layers.split(","):
            for density in map(float, args.densities.split(",")):
                row = dict(layer=name, density=density)
                for op, (dense, events) in make_calls(name, density).items():
                    t = harness.alternate({"dense": dense, "events": events}, args.rounds, torch.device("cpu"))
                    row[f"{op}_dense_ms"], row[f"{op}_events_ms"] = 1e3 * t["dense"], 1e3 * t["events"]
                    row[f"{op}_speedup"] = t["dense"] / t["events"]
                rows.add(row)
    finally:
        numba_cpu.EVENT_DENSITY = saved
    rows.finish()


if __name__ == "__main__":
    main()

"""Event-driven against dense synapses on the CPU, per layer and input density: where the
crossovers that set spiking_kernels.numba_cpu.EVENT_DENSITY lie.

    python benchmarks/bench_events.py
    python benchmarks/bench_events.py --layers lenet.cnn2,lenet.fc0 --densities 0.02,0.1 --json

For each layer shape (one chunk of k·B images, as the engine calls it on a CPU) and each density
of binary input spikes, times the three parts on both paths, the two alternating round by round:
the output (no grad), the weight gradient, and the input gradient (dense: everywhere; events: only
where the input fired, as for a neuron layer's spikes). Prints dense time / event time (> 1:
events are faster). Dense convolutions run channels-last, as the engine runs them on a CPU.
"""
import argparse

import torch

import harness
import spiking_layers as sl
from spiking_kernels import numba_cpu
from spiking_kernels.layout import channels_last

LAYERS = {  # name: (in channels, out channels, kernel (0: Linear), padding, images per call, height = width)
    "lenet.cnn1": (1, 20, 5, 2, 256, 28),
    "lenet.cnn2": (20, 50, 5, 2, 256, 14),
    "vgg9.cnn11": (3, 64, 3, 1, 160, 32),
    "lenet.fc0": (2450, 200, 0, 0, 256, 1),
    "vgg9.cnn12": (64, 64, 3, 1, 160, 32),
    "vgg9.cnn22": (128, 128, 3, 1, 160, 16),
    "vgg9.cnn32": (256, 256, 3, 1, 160, 8),
    "vgg9.fc0": (4096, 1024, 0, 0, 160, 1),
    "resnet11.cnn42": (512, 512, 3, 1, 160, 4),
}
PARTS = ("forward", "weight_grad", "input_grad")


def make_calls(name, density):
    """{part: (dense call, event call)} for one layer and input density."""
    c, o, kernel, pad, n, size = LAYERS[name]
    torch.manual_seed(0)
    if kernel:
        layer = sl.Conv2d(c, o, kernel, padding=pad)
        x = channels_last((torch.rand(n, c, size, size) < density).float())
        out = size + 2 * pad - kernel + 1
        grad = channels_last(torch.randn(n, o, out, out))
    else:
        layer = sl.Linear(c, o)
        x, grad = (torch.rand(n, c) < density).float(), torch.randn(n, o)
    q, s, w = x.to(torch.int8), torch.tensor(1.0), layer.weight.detach()
    if kernel:
        def dense_grads(weight, input):
            return lambda: torch.ops.aten.convolution_backward(
                grad, x, w.contiguous(memory_format=torch.channels_last), None, [1, 1], [pad, pad], [1, 1], False,
                [0, 0], 1, [input, weight, False])
        dense = dict(forward=lambda: torch.nn.functional.conv2d(x, w, None, 1, pad),
                     weight_grad=dense_grads(True, False), input_grad=dense_grads(False, True))
    else:
        dense = dict(forward=lambda: x @ w.t(), weight_grad=lambda: grad.t() @ x, input_grad=lambda: grad @ w)
    kept = {}  # as over the chunks of a pass: the weight's rows are made once, then kept
    events = dict(forward=lambda: numba_cpu.event_current(layer, q, s, w, kept),
                  weight_grad=lambda: numba_cpu.event_weight_grad(layer, q, s, w, grad),
                  input_grad=lambda: numba_cpu.event_input_grad(layer, q, w, grad, kept))
    return {part: (dense[part], events[part]) for part in PARTS}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default=",".join(LAYERS), help="(default: %(default)s)")
    p.add_argument("--densities", default="0.01,0.02,0.05,0.1,0.15,0.25", help="(default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: %(default)s)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    harness.run_as("engine")  # both paths are the engine's: with the settings our scripts run under
    rows = harness.Rows(args.json)
    for name in args.layers.split(","):
        for density in map(float, args.densities.split(",")):
            row = dict(layer=name, density=density)
            for part, (dense, events) in make_calls(name, density).items():
                t = harness.alternate({"dense": dense, "events": events}, args.rounds, torch.device("cpu"))
                row[f"{part}_dense_ms"], row[f"{part}_events_ms"] = 1e3 * t["dense"], 1e3 * t["events"]
                row[f"{part}_speedup"] = t["dense"] / t["events"]
            rows.add(row)
    rows.finish()


if __name__ == "__main__":
    main()

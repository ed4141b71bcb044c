"""Where a training step or an inference pass of the engine spends its time on a CPU: the time of
each backend call (numba loops, event kernels) and each dense convolution or matrix product, per
step, by function and input shape; the rest is Python, autograd and the optimizer.

    python benchmarks/profile_step.py --models lenet --checkpoint pretrained/lenet_fashion_T20.pth.tar \\
        --images fashion-mnist --modes train,infer
    python benchmarks/profile_step.py --models vgg9 --modes train

Steps as benchmarks/bench_train.py builds them (same sizes, weights and spikes), in this process,
with the process settings of our scripts; timings wrap each call, so they add a little overhead.
"""
import argparse
import collections
import functools
import time

import torch

import harness
import bench_train
import spiking_layers
from spiking_kernels import numba_cpu

CALLS = ("fire", "backprop", "pack", "unpack", "pool2x2", "unpool2x2", "pool_fire", "backprop_unpool",
         "event_current", "event_weight_grad", "event_input_grad", "leaky_sum")


class Timings:
    """Seconds and calls per (function, shape of its first tensor argument)."""

    def __init__(self):
        self.seconds, self.calls = collections.defaultdict(float), collections.Counter()

    def wrap(self, name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            shape = next((tuple(a.shape) for a in args if isinstance(a, torch.Tensor)), ())
            self.seconds[name, shape] += time.perf_counter() - start
            self.calls[name, shape] += 1
            return result
        return timed


def install(timings, monkeypatch):
    for name in CALLS:
        monkeypatch(numba_cpu, name, timings.wrap(name, getattr(numba_cpu, name)))
    monkeypatch(spiking_layers, "_per_image", timings.wrap("dense layer", spiking_layers._per_image))
    backward = torch.ops.aten.convolution_backward
    monkeypatch(torch.ops.aten, "convolution_backward", timings.wrap("dense conv backward", backward))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="lenet", help="(default: %(default)s)")
    p.add_argument("--modes", default="train,infer", help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default: %(default)s)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--images", default="random", choices=["random", "fashion-mnist"])
    args = p.parse_args()
    harness.run_as("engine")
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            step = bench_train.make_step(name, "engine", mode, torch.device("cpu"), False, None,
                                         checkpoint=args.checkpoint, images=args.images)[0]
            for _ in range(2):  # the second step still grows the heap: its page faults are not the step's cost
                step()
            timings, saved = Timings(), []
            install(timings, lambda module, attr, value: saved.append((module, attr, getattr(module, attr)))
                    or setattr(module, attr, value))
            try:
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                total = (time.perf_counter() - start) / args.steps
            finally:
                for module, attr, value in reversed(saved):
                    setattr(module, attr, value)
            print(f"{name} {mode}: {1e3 * total:.0f} ms per step")
            for key, seconds in sorted(timings.seconds.items(), key=lambda kv: -kv[1]):
                print(f"  {1e3 * seconds / args.steps:7.1f} ms  {timings.calls[key] // args.steps:3d} calls  "
                      f"{key[0]} {key[1]}")
            print(f"  {1e3 * (total - sum(timings.seconds.values()) / args.steps):7.1f} ms  rest")
    print("machine:", harness.machine())


if __name__ == "__main__":
    main()

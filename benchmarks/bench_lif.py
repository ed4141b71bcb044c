"""The LIF layer alone, forward + backward: the engine against the per-step reference.

    python benchmarks/bench_lif.py                     # currents (T=100, 64, 20, 28, 28), CPU
    python benchmarks/bench_lif.py --device cuda --json

Prints the speed ratio (reference time / engine time) and the peak-memory ratio (engine /
reference). Both sides hold the input gradients, and the reference's time depends much on how the C
allocator serves its per-step tensors (docs/performance.md).
"""
import argparse

import torch

import harness
import spiking_layers as sl
from reference import reference_lif


def make_step(impl, shape, chunk, device):
    gen = torch.Generator().manual_seed(0)
    current = (torch.rand(shape, generator=gen) * 0.6).to(device)
    upstream = torch.randn(shape, generator=gen).to(device)
    # gradients land in per-chunk (engine) or per-step (reference) leaves, so that neither side
    # pays for assembling one (T, ...) gradient tensor, which is the benchmark's, not the layer's
    chunks = [c.clone().requires_grad_() for c in current.split(chunk)]
    steps = [c.clone().requires_grad_() for c in current]

    # loss = Σ_t <o_t, upstream_t>: each chunk's output spikes are consumed as they come, as a
    # next layer would, so neither side has to hold all T steps of float spikes
    def engine():
        lif = sl.LIF(leak=0.99)
        sum((lif(c) * g).sum() for c, g in zip(chunks, upstream.split(chunk))).backward()
        for c in chunks:
            c.grad = None

    def reference():
        spikes, _ = reference_lif(steps, leak=0.99)
        (spikes * upstream).sum().backward()
        for c in steps:
            c.grad = None

    return engine if impl == "engine" else reference


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="100,64,20,28,28", help="T,B,C,H,W (default: %(default)s)")
    p.add_argument("--time-chunk", type=int, default=None, help="time steps per call (default: auto)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", metavar="IMPL", help=argparse.SUPPRESS)
    p.add_argument("--memory-worker", metavar="IMPL", help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    device = torch.device(args.device)
    chunk = args.time_chunk or sl.default_time_chunk(shape[1], shape[0], device)
    if args.worker:
        harness.serve(make_step(args.worker, shape, chunk, device), device)
        return
    if args.memory_worker:
        tiny = make_step(args.memory_worker, (2, 2) + shape[2:], chunk, device)
        print(harness.peak_memory(make_step(args.memory_worker, shape, chunk, device), device, tiny))
        return

    impls = ("engine", "reference")
    worker_args = ["--shape", args.shape, "--time-chunk", str(chunk), "--device", args.device]
    seconds = harness.alternate_processes(__file__, worker_args, impls, args.rounds)
    memory = {impl: harness.measure_in_subprocess(__file__, impl, worker_args) for impl in impls}
    row = dict(bench="lif_layer_fwd_bwd", shape=args.shape, time_chunk=chunk, device=args.device,
               engine_s=seconds["engine"], reference_s=seconds["reference"],
               speedup=seconds["reference"] / seconds["engine"],
               engine_peak=harness.fmt_bytes(memory["engine"]), reference_peak=harness.fmt_bytes(memory["reference"]),
               memory_ratio=memory["engine"] / memory["reference"], **harness.machine())
    harness.report([row], args.json)


if __name__ == "__main__":
    main()

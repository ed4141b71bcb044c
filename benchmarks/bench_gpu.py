"""VGG9 and ResNet11 on a GPU, the engine against the per-step reference, in one process (the GPU check).

    python benchmarks/bench_gpu.py                                    # T = 100, batch 16, on CUDA
    python benchmarks/bench_gpu.py --json runs/gpu_check/bench.json   # also write the rows as JSON
    TRITON_INTERPRET=1 SPIKING_BACKEND=triton python benchmarks/bench_gpu.py --device cpu \
        --time-steps 2 --batch-size 1 --rounds 1 --no-warmup          # the same code on a CPU, tiny

For each network, precision and mode (a training step: forward, summed squared error, backward, SGD
step; or inference), the engine and the reference run in turn, `--rounds` times after a warm-up, on
the same weights and input spikes; the median is reported as samples/s, with the speed ratio, the
peak memory each adds while it runs (torch.cuda.max_memory_allocated; not measured on a CPU) and
the minutes of a CIFAR-10 epoch at the engine's rate (50,000 training or 10,000 test images).
Precisions: `ieee` (IEEE float32, the paper's numerics and the scripts' default), `tf32` (both
sides with TensorFloat-32 convolutions and matmuls, as --tf32), `amp` (the engine under bf16
autocast, as --amp, against the IEEE reference). `agree` is the fraction of images whose predicted
class is the same for both (IEEE and tf32 rows: same numerics, so 1 unless a spike flips), and
`max_diff` the largest difference of their outputs. Rows are written as they come (--json), so a
timeout keeps those done.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (puts the repository and tests/ on sys.path)
from bench_train import INPUT_SCALE, NETWORKS, make_step  # noqa: E402
from reference import reference_forward  # noqa: E402

PRECISIONS = ("ieee", "amp", "tf32")


def set_tf32(on):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = on


def timed_pair(steps, rounds, device, warmup=True):
    """{impl: (median seconds, peak bytes added)}; engine and reference in turn, after a warm-up
    (Triton's compilation, cuDNN's choice of algorithms, the allocator's pools)."""
    seconds, peaks = {impl: [] for impl in steps}, {impl: 0 for impl in steps}
    for step in steps.values() if warmup else ():
        step()
    for _ in range(rounds):
        for impl, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            seconds[impl].append(harness.timed(step, device))
            if device.type == "cuda":
                peaks[impl] = max(peaks[impl], torch.cuda.max_memory_allocated() - base)
    return {impl: (statistics.median(seconds[impl]), peaks[impl] if device.type == "cuda" else None)
            for impl in steps}


@torch.no_grad()
def agreement(name, T, B, device, amp):
    """(fraction of images with the same predicted class, largest output difference): engine vs reference."""
    Model, shape = NETWORKS[name]
    torch.manual_seed(0)
    model = Model(time_steps=T).to(device).eval()
    model.input_scale = INPUT_SCALE[name]
    spikes = model.encode(torch.rand(B, *shape, device=device) * 0.9)
    with torch.autocast(device.type, torch.bfloat16, enabled=amp):
        ours = model(spikes).float()
    weights = {n: p.detach() for n, p in model.named_parameters()}
    theirs = reference_forward(name, weights, spikes, leak=model.leak)
    return (ours.argmax(1) == theirs.argmax(1)).float().mean().item(), (ours - theirs).abs().max().item()


HEADER = (f"{'model':9} {'precision':9} {'mode':5} {'engine/s':>9} {'ref/s':>8} {'speed':>6} {'engine MiB':>10} "
          f"{'ref MiB':>8} {'epoch min':>9} {'agree':>6} {'max_diff':>9}")


def table_row(r):
    """One row of the table, aligned with HEADER (gpu_check.sh prints the table again from the JSON)."""
    mib = ["-" if r[k] is None else f"{r[k]:.0f}" for k in ("engine_peak_mib", "reference_peak_mib")]
    return (f"{r['model']:9} {r['precision']:9} {r['mode']:5} {r['engine_samples_s']:9.1f} "
            f"{r['reference_samples_s']:8.1f} {r['speedup']:6.2f} {mib[0]:>10} {mib[1]:>8} "
            f"{r['cifar10_epoch_min']:9.2f} {r['agree']:6.3f} {r['max_diff']:9.2e}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vgg9,resnet11", help="(default: %(default)s)")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="(default: %(default)s)")
    p.add_argument("--modes", default="train,infer", help="(default: %(default)s)")
    p.add_argument("--time-steps", type=int, default=100, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="timed calls of each, in turn (default: %(default)s)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True, help="an untimed call of "
                   "each first (default: %(default)s)")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="(default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="write the rows here (rewritten after each row)")
    args = p.parse_args()
    device = torch.device(args.device)
    T, B, rows = args.time_steps, args.batch_size, []
    print(HEADER, flush=True)
    for precision in args.precisions.split(","):
        set_tf32(precision == "tf32")
        amp = precision == "amp"
        for name in args.models.split(","):
            agree, diff = agreement(name, T, B, device, amp)
            for mode in args.modes.split(","):
                start = time.perf_counter()
                steps = {impl: make_step(name, impl, mode, device, amp and impl == "engine", None, T, B)[0]
                         for impl in ("engine", "reference")}
                (ours, our_peak), (theirs, their_peak) = timed_pair(steps, args.rounds, device, args.warmup).values()
                images = 50_000 if mode == "train" else 10_000
                row = dict(model=name, precision=precision, mode=mode, T=T, batch=B, engine_samples_s=B / ours,
                           reference_samples_s=B / theirs, speedup=theirs / ours,
                           engine_peak_mib=our_peak and our_peak / 2 ** 20,
                           reference_peak_mib=their_peak and their_peak / 2 ** 20,
                           cifar10_epoch_min=images * ours / B / 60, agree=agree, max_diff=diff,
                           seconds=time.perf_counter() - start)
                rows.append(row)
                print(table_row(row), flush=True)
                del steps
                if args.json:
                    with open(args.json, "w") as f:
                        json.dump(dict(machine=harness.machine(), rows=rows), f, indent=1)
    set_tf32(False)


if __name__ == "__main__":
    main()

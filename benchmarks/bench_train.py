"""Training steps and inference of whole networks: the engine against the per-step reference.

    python benchmarks/bench_train.py                          # LeNet, VGG9, ResNet11 on the CPU
    python benchmarks/bench_train.py --models lenet --amp     # the engine under bf16 autocast
    python benchmarks/bench_train.py --device cuda --json
    python benchmarks/bench_train.py --models lenet --checkpoint pretrained/lenet_fashion_T20.pth.tar \
        --images fashion-mnist                                # a trained network on real images
    SPIKING_BACKEND=torch python benchmarks/bench_train.py    # the engine on another backend
    python benchmarks/bench_train.py --against kept-rows      # the engine against its event kernels
                                                              # keeping weight rows across passes

Same weights (the faithful init, or --checkpoint), same input spikes (of uniform random images, or
of real ones: a trained LeNet fires more sparsely than a fresh one on random images).
A training step is forward, summed squared error, backward and an SGD step; inference is a
forward pass without grad. Sizes: LeNet T = 100, batch 64; VGG9 and ResNet11 T = 20, batch 8 on a
CPU, T = 100, batch 16 on a GPU. Engine and reference each run in a process of their own, in turn
(see harness.py). `--against kept-rows` runs the engine against itself with the event kernels'
weight rows kept across passes while the weight's version counter and storage stay the same (blind
to a change through .data; the engine makes them once a pass): what making them once a pass costs;
also the rows the engine makes per call, their milliseconds and their share of the call's time
(timed inside one engine call in this process).
Prints samples/s of each, their ratio, and the peak memory of each (measured in
a process of its own) and their ratio. For VGG9 and ResNet11 it also prints the minutes a CIFAR-10
epoch would take at the engine's rate: 50,000 training images (train rows), 10,000 test images
(inference rows).
"""
import argparse
import contextlib
import gzip
import os
import sys
import time

import numpy as np
import torch

import harness
import checkpoints
import data
from cifar10_ResNet11 import ResNet11
from cifar10_VGG9 import VGG9
from mnist_LeNet import LeNet
from reference import reference_forward
from spiking_kernels import numba_events

harness.ENV.setdefault("kept-rows", harness.OURS)  # the engine's process settings

MODELS = {"lenet": LeNet, "vgg9": VGG9, "resnet11": ResNet11}
# each on its script's default dataset, whose images it takes and whose Poisson code scales its input
_DATASET = {name: data.DATASETS[sys.modules[M.__module__].DEFAULTS["dataset"]] for name, M in MODELS.items()}
NETWORKS = {name: (M, _DATASET[name].shape) for name, M in MODELS.items()}
INPUT_SCALE = {name: d.scale for name, d in _DATASET.items()}


def sizes(name, device):
    if name == "lenet":
        return 100, 64
    return (100, 16) if device.type == "cuda" else (20, 8)


def fashion_mnist_images(n):
    """The first n Fashion-MNIST test images, read straight from the Debian package."""
    path = os.path.join(data.DEBIAN_FASHION_MNIST, "t10k-images-idx3-ubyte.gz")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found; install it with apt-get install -y dataset-fashion-mnist")
    with gzip.open(path) as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16)[:n * 784]
    return torch.from_numpy(pixels.astype(np.float32) / 255).view(n, 1, 28, 28)


def keep_rows_across_passes():
    """The event kernels' weight rows kept from pass to pass while the weight's version counter and
    storage stay the same (a change through .data goes unseen): the engine's rows before they were
    made once a pass."""
    cache, make = torch.utils.weak.WeakIdKeyDictionary(), numba_events._rows

    def rows(weight, kept):
        stamp, cached = (weight._version, weight.data_ptr()), cache.get(weight)
        if cached is None or cached[0] != stamp:
            cached = cache[weight] = (stamp, make(weight, None))
        return cached[1]
    numba_events._rows = rows


def rows_share(step, calls=3):
    """(rows made per call, their milliseconds per call, their share of the call's time) of the
    engine's step, timing numba_events' row builders inside it (after one warm-up call)."""
    spent = {"rows": 0, "seconds": 0.0}
    builders = {name: getattr(numba_events, name) for name in ("_linear_rows", "_conv_rows")}

    def timed(build):
        def run(w):
            start = time.perf_counter()
            try:
                return build(w)
            finally:
                spent["rows"] += 1
                spent["seconds"] += time.perf_counter() - start
        return run
    step()
    for name, build in builders.items():
        setattr(numba_events, name, timed(build))
    try:
        start = time.perf_counter()
        for _ in range(calls):
            step()
        total = time.perf_counter() - start
    finally:
        for name, build in builders.items():
            setattr(numba_events, name, build)
    return spent["rows"] / calls, spent["seconds"] / calls * 1e3, spent["seconds"] / total


def make_step(name, impl, mode, device, amp, chunk, T=None, B=None, checkpoint=None, images="random"):
    """A closure running one training step or one inference pass of `impl`."""
    if impl == "kept-rows":
        keep_rows_across_passes()
    Model, shape = NETWORKS[name]
    T0, B0 = sizes(name, device)
    T, B = T or T0, B or B0
    torch.manual_seed(0)
    model = Model(time_steps=T, dropout=0.0)
    model.input_scale = INPUT_SCALE[name]
    if checkpoint:
        checkpoints.load_checkpoint(checkpoint, model)
    model = model.to(device)
    model.time_chunk = chunk
    x = fashion_mnist_images(B) if images == "fashion-mnist" else torch.rand(B, *shape) * 0.9
    spikes = model.encode(x.to(device))
    target = torch.nn.functional.one_hot(torch.arange(B, device=device) % 10, 10).float()
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    if impl != "reference":
        params = list(model.parameters())
        forward = model
    else:
        weights = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        params = list(weights.values())
        forward = lambda x: reference_forward(name, weights, x, leak=model.leak)
    opt = torch.optim.SGD(params, lr=1e-4, weight_decay=5e-4)

    def train_step():
        model.train()
        with autocast() if impl != "reference" else contextlib.nullcontext():
            loss = (forward(spikes) - target).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def inference():
        model.eval()
        with torch.no_grad(), autocast() if impl != "reference" else contextlib.nullcontext():
            forward(spikes)

    return (train_step if mode == "train" else inference), T, B


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="lenet,vgg9,resnet11", help="(default: %(default)s)")
    p.add_argument("--modes", default="train,infer", help="(default: %(default)s)")
    p.add_argument("--amp", action="store_true", help="run the engine under bf16 autocast")
    p.add_argument("--time-chunk", type=int, default=None, help="time steps per call (default: auto)")
    p.add_argument("--time-steps", type=int, default=None, help="override T")
    p.add_argument("--batch-size", type=int, default=None, help="override the batch size")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--checkpoint", default=None, help="weights to load (default: the faithful init)")
    p.add_argument("--images", default="random", choices=["random", "fashion-mnist"],
                   help="uniform random images × 0.9, or the first test images of Fashion-MNIST (default: %(default)s)")
    p.add_argument("--against", default="reference", choices=["reference", "kept-rows"],
                   help="what the engine is timed against (default: %(default)s)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", metavar="IMPL", help=argparse.SUPPRESS)
    p.add_argument("--memory-worker", metavar="IMPL", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    common = dict(device=device, amp=args.amp, chunk=args.time_chunk, T=args.time_steps, B=args.batch_size,
                  checkpoint=args.checkpoint, images=args.images)
    if args.worker or args.memory_worker:  # one model, one mode, one implementation
        impl = args.worker or args.memory_worker
        step = make_step(args.models, impl, args.modes, **common)[0]
        if args.worker:
            harness.serve(step, device)
        else:
            tiny = make_step(args.models, impl, args.modes, **{**common, "T": 2, "B": 2})[0]
            print(harness.peak_memory(step, device, tiny))
        return

    rows = harness.Rows(args.json)
    flags = ["--device", args.device] + (["--amp"] if args.amp else [])
    flags += [f"--{k}={v}" for k, v in (("time-chunk", args.time_chunk), ("time-steps", args.time_steps),
                                       ("batch-size", args.batch_size), ("checkpoint", args.checkpoint),
                                       ("images", args.images)) if v]
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            worker_flags = [f"--models={name}", f"--modes={mode}"] + flags
            other = args.against
            seconds = harness.alternate_processes(__file__, worker_flags, ("engine", other), args.rounds)
            T0, B0 = sizes(name, device)
            T, B = args.time_steps or T0, args.batch_size or B0
            if other != "reference":
                made, ms, share = rows_share(make_step(name, "engine", mode, **common)[0])
                rows.add(dict(model=name, mode=mode, T=T, batch=B, amp=args.amp, device=args.device,
                              weights=args.checkpoint or "init", images=args.images,
                              engine_samples_s=B / seconds["engine"], kept_rows_samples_s=B / seconds[other],
                              engine_over_kept_rows=seconds["engine"] / seconds[other],
                              rows_made=made, rows_ms=ms, rows_share=share))
                continue
            row = dict(model=name, mode=mode, T=T, batch=B, amp=args.amp, device=args.device,
                       weights=args.checkpoint or "init", images=args.images,
                       engine_samples_s=B / seconds["engine"], reference_samples_s=B / seconds["reference"],
                       speedup=seconds["reference"] / seconds["engine"])
            if name != "lenet":  # a CIFAR-10 epoch at this rate: 50,000 training or 10,000 test images
                images = 50_000 if mode == "train" else 10_000
                row[f"cifar10_{'train' if mode == 'train' else 'test'}_min"] = images * seconds["engine"] / B / 60
            if not args.no_memory:
                mem = {impl: harness.measure_in_subprocess(__file__, impl, worker_flags)
                       for impl in ("engine", "reference")}
                row.update(engine_peak=harness.fmt_bytes(mem["engine"]),
                           reference_peak=harness.fmt_bytes(mem["reference"]),
                           memory_ratio=mem["engine"] / mem["reference"])
            rows.add(row)
    rows.finish()


if __name__ == "__main__":
    main()

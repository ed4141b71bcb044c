"""Operations a training step dispatches, at two window lengths: does the work per step grow with T?

    python benchmarks/count_ops.py                            # VGG9, T = 20 and 100, the Triton backend
    TRITON_INTERPRET=1 python benchmarks/count_ops.py         # the same on a CPU, in Triton's interpreter
    python benchmarks/count_ops.py --backend torch            # the tensor-operations backend

One VGG9 training step (forward, summed squared error, backward) on `--batch-size` random images,
all T steps in one chunk (as on a GPU), counting every aten operation PyTorch dispatches and every
Triton kernel launch. On a GPU each is a kernel launch or host-side work of a few microseconds;
a backend whose counts grow with T is launch-bound there. Prints both counts and their ratio.
"""
import argparse
import collections
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import spiking_kernels  # noqa: E402
from cifar10_VGG9 import VGG9  # noqa: E402


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched inside the block, by name, and the launches of the
    Triton kernels of `backend`. What Triton's interpreter itself dispatches while it runs a kernel
    (copies of the arguments, on a CPU only) is not counted: on a GPU a launch is one launch."""

    def __init__(self, backend):
        super().__init__()
        self.counts, self.launches, self.backend, self.paused = collections.Counter(), collections.Counter(), backend, 0
        self.kernels = {name: k for name, k in vars(backend).items() if hasattr(k, "fn") and hasattr(k, "run")}

    def __enter__(self):
        for name, kernel in self.kernels.items():
            setattr(self.backend, name, _Counted(kernel, name, self))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, kernel in self.kernels.items():
            setattr(self.backend, name, kernel)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _Counted:
    """A Triton kernel whose launches `mode` counts (kernel[grid](...) as usual)."""

    def __init__(self, kernel, name, mode):
        self.kernel, self.name, self.mode = kernel, name, mode

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.mode.launches[self.name] += 1
            self.mode.paused += 1
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                self.mode.paused -= 1
        return launch


def training_step_counts(time_steps, batch_size, device):
    """(aten operations by name, Triton launches by kernel) of one VGG9 training step."""
    torch.manual_seed(0)
    net = VGG9(time_steps=time_steps, time_chunk=time_steps).to(device)
    images = torch.rand(batch_size, 3, 32, 32, device=device)
    target = torch.nn.functional.one_hot(torch.arange(batch_size, device=device) % 10, 10).float()
    with CountOps(spiking_kernels.for_tensor(images)) as counted:
        loss = (net(images) - target).pow(2).sum()
        loss.backward()
    return counted.counts, counted.launches


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="triton", choices=spiking_kernels.BACKENDS[1:], help="(default: %(default)s)")
    p.add_argument("--steps", default="20,100", help="the two window lengths T (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = p.parse_args()
    spiking_kernels.use(args.backend)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    short, long = (int(s) for s in args.steps.split(","))
    start = time.perf_counter()
    (ops_s, launch_s), (ops_l, launch_l) = (training_step_counts(t, args.batch_size, device) for t in (short, long))
    n_s, n_l = sum(ops_s.values()), sum(ops_l.values())
    print(f"VGG9 training step, batch {args.batch_size}, backend {args.backend}, device {device.type}")
    print(f"aten operations: T = {short}: {n_s:,}   T = {long}: {n_l:,}   ratio {n_l / n_s:.2f}")
    if launch_s:
        print(f"Triton launches: T = {short}: {sum(launch_s.values())}   T = {long}: {sum(launch_l.values())}")
    grown = {k: (ops_s[k], ops_l[k]) for k in ops_l if ops_l[k] > ops_s[k]}
    print("operations that grow with T:", ", ".join(f"{k} {a}→{b}" for k, (a, b) in sorted(grown.items())) or "none")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

"""A start-up check of a backend on the run's device, before the first mini-batch.

Triton compiles its kernels at their first launch (a C driver stub built with the system's compiler,
libcuda.so.1, ptxas, a writable cache); a missing piece, or a GPU the torch build has no kernels
for, would otherwise surface as a long traceback in the middle of the first forward pass. The check
launches every kernel variant the engine uses once, on tiny tensors shaped like a real layer's (so
that Triton compiles the very specialisations the run then takes from its cache), and compares
each result with the tensor operations' (tensor_ops.py), the readable statement of the same steps.
"""
import itertools

import torch

from . import tensor_ops

NEURONS, STEPS = 4096, 3  # a multiple of 16 neurons and a chunk neither 1 nor a multiple of 16, as in a run


def self_check(kernels, device, dtypes=(torch.float32,)):
    """Run `kernels` (a backend module) on `device` against tensor_ops for each current dtype in
    `dtypes`; returns None, or the first failure in one line (what failed and the error's first line)."""
    if kernels is tensor_ops:
        return None
    try:
        for dtype in dtypes:
            if dtype == torch.bfloat16 and kernels.name == "numba":
                continue  # numba has no bf16: its kernels convert currents to float32 on entry
            for case in _cases(kernels, device, dtype):
                if case is not None:
                    return case
    except Exception as e:  # compiler, driver or launch errors: their first line is the useful part
        return f"{type(e).__name__}: {_first_line(e)}"
    return None


def _cases(kernels, device, dtype):
    """Each check in turn: None where the backend agrees with the tensor operations, else what differs."""
    g = torch.Generator().manual_seed(0)
    state = torch.float32  # membranes, counts and gradients stay float32, also under bf16 autocast
    current = (torch.randn(STEPS, NEURONS, generator=g) * 1.5).to(device, dtype)
    u0 = torch.rand(NEURONS, generator=g).to(device, state)
    mask = (torch.rand(NEURONS, generator=g) < 0.8).to(device, state) / 0.8
    record_bits = None
    for leaky_sum, record, masked in itertools.product((True, False), repeat=3):
        results = []
        for impl in (kernels, tensor_ops):
            u, lf, n = u0.clone(), torch.zeros_like(u0), torch.zeros_like(u0)
            bits = torch.zeros(1, NEURONS, dtype=torch.uint8, device=device) if record else None
            out = impl.fire(current, u, lf, n, bits, 0, 1.0, 0.99, leaky_sum, mask if masked else None)
            results.append((out, u, lf, n, bits))
        yield _differs(f"fire (leaky sum {leaky_sum}, record {record}, mask {masked})", *results)
        record_bits = results[1][4] if record else record_bits
    grad = torch.randn(STEPS, NEURONS, generator=g).to(device, dtype)
    slope = torch.rand(NEURONS, generator=g).to(device, state)
    yield _differs("backprop", *(impl.backprop(grad, record_bits, 0, slope, u0.clone()) for impl in (kernels, tensor_ops)))
    yield _differs("leaky_sum", *(impl.leaky_sum(current, u0, 0.99) for impl in (kernels, tensor_ops)))
    spikes = torch.sign(current) * (current.abs() > 1).to(dtype)
    for check in (True, False):
        packed = [impl.pack(spikes, check) for impl in (kernels, tensor_ops)]
        yield _differs(f"pack (checked {check})", *(p[:2] for p in packed))
        yield _differs("unpack", *(impl.unpack(p[0], p[1], dtype) for impl, p in zip((kernels, tensor_ops), packed)))
    images = spikes.view(STEPS * 16, 16, 4, 4)
    yield _differs("pool2x2", *(impl.pool2x2(images) for impl in (kernels, tensor_ops)))
    for size in ((8, 8), (9, 9)):  # an odd size: the row and column the pooling dropped get 0
        yield _differs("unpool2x2", *(impl.unpool2x2(images, size) for impl in (kernels, tensor_ops)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # an asynchronous launch error surfaces here, still inside the check


def _differs(what, ours, theirs):
    """None if every tensor of `ours` equals its twin in `theirs` (floats within float32 rounding:
    this checks that the kernels work here; their last bits are tests/test_engine.py's), else a
    line saying what differs."""
    for a, b in zip(_tensors(ours), _tensors(theirs)):
        a, b = a.double().cpu(), b.double().cpu()
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            return f"{what} disagrees with the tensor operations"
    return None


def _tensors(result):
    if torch.is_tensor(result):
        return [result]
    return [t for t in result if t is not None] if isinstance(result, (tuple, list)) else []


def _first_line(e):
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]

"""Device implementations of the engine's recursions, behind one switch.

spiking_layers.py states the paper's math; the loops over time steps that it needs run here, in
one of three backends that implement the same few functions on flat tensors in memory order
(currents and spikes (k, N) for the k steps of a chunk, per-neuron state (N,)):

    fire        steps 2–5 over a chunk: integrate, fire, hard reset, leak; N, LF, the spike record
    backprop    the leak-aware backward recursion over a chunk
    pool2x2     2×2 average pooling, and unpool2x2 its gradient
    pack        spikes (0 or ±s) to int8 and the scalar s, for backward; unpack the way back
    is_spike_train  whether a tensor holds only 0 and ±s (a given input's check)
    leaky_sum   the output integrator U = λ(U + I_t)

    tensor_ops  PyTorch tensor operations, per time step: any device (the readable statement)
    numba_cpu   compiled loops for CPU tensors, threads, event-driven convolutions
    triton_gpu  Triton kernels, one launch per chunk: CUDA tensors, or CPU tensors in Triton's
                interpreter (TRITON_INTERPRET=1, set before triton is imported)

SPIKING_BACKEND, read once at import, selects them: `auto` (default: Triton for CUDA tensors, numba
for CPU tensors, tensor operations elsewhere or where those are not installed), `torch`, `numba` or
`triton`. All give the same spikes, and gradients equal up to float rounding (tests/test_engine.py
checks each against the per-step reference). Tests switch backends with `use(name)`. Before a run,
`check_device` says which backend serves its device, and `self_check` (selfcheck.py) runs every
kernel variant once there, so that a compiler or driver problem is one line rather than a traceback.
"""
import functools
import importlib
import os

BACKENDS = ("auto", "torch", "numba", "triton")


class BackendError(RuntimeError):
    """An unknown SPIKING_BACKEND, or one that cannot run here."""


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load(name):
    """The backend module, or a BackendError saying why it cannot be used."""
    module = {"torch": "tensor_ops", "numba": "numba_cpu", "triton": "triton_gpu"}[name]
    try:
        return importlib.import_module(f"{__name__}.{module}")
    except ImportError as e:
        raise BackendError(f"SPIKING_BACKEND={name} is not available: {e}") from None


def _installed(name):
    """(module, None), or (None, why it cannot be loaded)."""
    try:
        return _load(name), None
    except BackendError as e:
        return None, str(e)


def use(name):
    """Select a backend for this process (as SPIKING_BACKEND does at import); returns the previous name."""
    global _choice, _fixed
    if name not in BACKENDS:
        raise BackendError(f"SPIKING_BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
    fixed = None if name == "auto" else _load(name)
    if name == "triton" and not _interpreting():
        import torch
        if not torch.cuda.is_available():
            raise BackendError("SPIKING_BACKEND=triton needs a CUDA GPU (or TRITON_INTERPRET=1 to run its "
                               "kernels on CPU tensors in Triton's interpreter)")
    previous, _choice, _fixed = _choice, name, fixed
    return previous


def active():
    """The selected backend's name: auto, torch, numba or triton."""
    return _choice


def for_tensor(t):
    """The backend that runs the recursions on tensors of t's device."""
    if _fixed is None:
        return _auto_with_reason(t.device.type)[0]
    if not _fixed.runs_on(t):
        raise BackendError(f"SPIKING_BACKEND={_choice} does not run on {t.device.type} tensors"
                           + (" (Triton's interpreter is on: TRITON_INTERPRET=1)" if _interpreting() else ""))
    return _fixed


def check_device(device):
    """(the backend module that will run on `device`, a note or None): a one-line BackendError now,
    rather than in the first forward pass, if the selected backend cannot run there; the note says
    that `auto` falls back to tensor operations because the compiled backend is not installed."""
    if _fixed is not None:
        import torch
        return for_tensor(torch.empty(0, device=device)), None
    kernels, why = _auto_with_reason(device.type)
    if why is None:
        return kernels, None
    return kernels, (f"SPIKING_BACKEND=auto falls back to tensor operations on {device.type} ({why}): the "
                     f"same numerics, but one launch per time step and layer, several times slower")


def self_check(device, dtypes):
    """Run the backend that serves `device` against the tensor operations on tiny tensors, once per
    kernel variant, with currents of each of `dtypes`; a one-line BackendError if anything fails."""
    from .selfcheck import self_check as run
    kernels = check_device(device)[0]
    failure = run(kernels, device, dtypes)
    if failure:
        import torch
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        raise BackendError(f"the {kernels.name} kernels fail on {where}: {failure}. Run with "
                           f"SPIKING_BACKEND=torch (tensor operations: the same numerics, slower)")


_AUTO = {"cpu": "numba", "cuda": "triton"}  # where installed; tensor operations elsewhere


@functools.lru_cache(maxsize=None)
def _auto_with_reason(device_type):
    """(module, None), or (tensor_ops, why the compiled backend for this device is not used)."""
    name = _AUTO.get(device_type)
    if name is None or (name == "triton" and _interpreting()):  # the interpreter runs on CPU tensors only
        return _load("torch"), None
    module, why = _installed(name)
    return (module, None) if module else (_load("torch"), why)


_choice, _fixed = "auto", None
use(os.environ.get("SPIKING_BACKEND", "auto").strip().lower() or "auto")

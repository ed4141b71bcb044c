"""The time-chunked engine against the per-step autograd reference (tests/reference.py), on every
backend (spiking_kernels/): tensor operations, numba loops (with and without event-driven
convolutions), Triton kernels (in Triton's interpreter on a CPU, compiled on a GPU).

Spikes must be identical; outputs and gradients agree within 1e-10 relative in float64, whatever
the chunk size (time steps per call)."""
import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

import spiking_kernels
import spiking_layers as sl
from conftest import NETWORKS, ROOT, network, signed_spikes
from reference import leak_correction, reference_forward, reference_lif, reference_output, reference_pool_neuron
from spiking_kernels import numba_cpu
from spiking_kernels.layout import is_channels_last

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["numba", "numba-events", "torch", "triton"]
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(params=DEVICES)
def device(request):
    """cpu, and cuda where there is a GPU: there in IEEE float32 with deterministic cuDNN and cuBLAS
    algorithms, so that an exact comparison does not depend on the algorithm a call happens to pick."""
    if request.param != "cuda":
        yield request.param
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)
    try:
        yield request.param
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = saved


@pytest.fixture(params=BACKENDS)
def backend(request, device, monkeypatch):
    """Every backend, selected as SPIKING_BACKEND would; "numba-events" also sends every eligible
    layer to the event-driven kernels, whatever the input's density."""
    name = request.param.split("-")[0]
    if not spiking_kernels._load(name).runs_on(torch.empty(0, device=device)):
        pytest.skip(f"{name} does not run on {device} tensors here")
    previous = spiking_kernels.use(name)
    if request.param == "numba-events":
        monkeypatch.setattr(numba_cpu, "EVENT_DENSITY", crossovers(1.1))
    yield request.param
    spiking_kernels.use(previous)


def crossovers(density):
    """An EVENT_DENSITY table with every crossover at `density` (0: all dense, > 1: all on events)."""
    return {kind: dict.fromkeys(("forward", "weight_grad", "input_grad"), density) for kind in ("conv", "linear")}


def chunk_sizes(T):
    """1, a proper divisor and a non-divisor of T where they exist, and T."""
    sizes = {1, T}
    sizes |= {d for d in range(2, T) if T % d == 0 and d * d >= T}
    sizes |= {next((d for d in range(2, T) if T % d), T)}
    return sorted(sizes)


CASES = [(T, k) for T in (1, 5, 12, 37) for k in chunk_sizes(T)]


def run_chunks(module, current_seq, k):
    module.reset()
    return torch.cat([module(c) for c in current_seq.split(k)])


def edge_currents(T, n=40, v_th=1.0, device="cpu", seed=0):
    """Dyadic currents (exact in binary, so ties stay ties) with neurons that never fire, fire
    every step, and receive exactly the threshold (strictly greater fires)."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(-8, 13, (T, 3, n), generator=g).double() / 8 * v_th
    i[:, :, 0] = 0.0                # never fires
    i[:, :, 1] = -0.5               # never fires
    i[:, :, 2] = 2.0 * v_th         # fires every step
    i[:, :, 3] = v_th               # exactly at threshold on the first step: no spike there
    i[0, :, 4] = v_th               # ...then stays at threshold once
    i[1:, :, 4] = 0.0
    return i.to(device).requires_grad_()


# ----------------------------------------------------------------------------------------------
# Neurons

def test_leak_correction_by_hand(backend, device):
    """Spikes at steps 0 and 3 of T = 4, λ = 0.99: LF = λ³ + 1, N = 2."""
    lif = sl.LIF(leak=0.99)
    current = torch.tensor([1.5, 0.2, 0.2, 1.5], dtype=torch.float64, device=device).view(4, 1, 1).requires_grad_()
    spikes = run_chunks(lif, current, 4)
    assert spikes.flatten().tolist() == [1.0, 0.0, 0.0, 1.0]
    G = lif.window.G(0.99).item()
    assert G == pytest.approx(1 + math.log(0.99) * (0.99 ** 3 + 1) / 2, rel=1e-14)
    assert G == pytest.approx(leak_correction(torch.tensor(0.99 ** 3 + 1.0), torch.tensor(2.0), 0.99).item())
    # ∂o_3/∂I = [0, G, G, G]: the reset at step 0 blocks, silent steps pass (leak identity)
    grad, = torch.autograd.grad(spikes[3].sum(), current)
    assert grad.flatten().tolist() == pytest.approx([0.0, G, G, G], rel=1e-14)


def test_silent_neuron_has_zero_gradient(backend, device):
    lif = sl.LIF()
    current = torch.full((6, 1, 1), 0.1, dtype=torch.float64, device=device, requires_grad=True)
    spikes = run_chunks(lif, current, 2)
    assert spikes.sum() == 0 and lif.window.G(0.99).item() == 0.0
    grad, = torch.autograd.grad((spikes * 3).sum(), current)
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("T,k", CASES)
def test_lif_layer(T, k, backend, device):
    current = edge_currents(T, device=device)
    upstream = torch.randn(current.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    ref, ref_G = reference_lif(current, leak=0.99)
    ref_grad, = torch.autograd.grad((ref * upstream).sum(), current)

    lif = sl.LIF(leak=0.99)
    out = run_chunks(lif, current, k)
    grad, = torch.autograd.grad((out * upstream).sum(), current)
    assert torch.equal(out, ref)
    assert (out[:, :, 2] == 1).all() and (out[:, :, :2] == 0).all() and (out[0, :, 3:5] == 0).all()
    torch.testing.assert_close(lif.window.G(0.99), ref_G, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


@pytest.mark.parametrize("T,k", CASES)
def test_pool_neuron(T, k, backend, device):
    current = edge_currents(T, v_th=0.75, device=device, seed=2)
    upstream = torch.randn(current.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    ref = reference_pool_neuron(current)
    ref_grad, = torch.autograd.grad((ref * upstream).sum(), current)
    out = run_chunks(sl.IF(), current, k)
    grad, = torch.autograd.grad((out * upstream).sum(), current)
    assert torch.equal(out, ref)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_float32_spikes_match_reference(backend, device):
    current = edge_currents(20, device=device).detach().float().requires_grad_()
    upstream = torch.randn(current.shape, generator=torch.Generator().manual_seed(1)).to(device)
    ref, _ = reference_lif(current)
    ref_grad, = torch.autograd.grad((ref * upstream).sum(), current)
    out = run_chunks(sl.LIF(), current, 3)
    grad, = torch.autograd.grad((out * upstream).sum(), current)
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["numba", "triton"])
@pytest.mark.parametrize("v_th", [1.0, 0.3])
def test_float32_state_is_that_of_the_tensor_operations_bit_for_bit(name, v_th):
    """In float32 the compiled loops round as the tensor operations (and the authors' PyTorch code)
    do: λ·U in float32, one rounding per step. A membrane off by one ulp after a few steps may sit
    on the other side of V_th many steps later, so membranes, N, LF and the record must be
    identical, not close. V_th is compared in float32 too: 0.3 is no float32, and a membrane of
    exactly float32(0.3) does not fire. The numba loops run over several blocks of neurons."""
    kernels = spiking_kernels._load(name)
    if not kernels.runs_on(torch.empty(0)):
        pytest.skip(f"{name} does not run on CPU tensors here")
    size = 2 * kernels.BLOCK + 37 if name == "numba" else 5000
    g = torch.Generator().manual_seed(0)
    current, u0 = torch.rand(60, size, generator=g) * 0.4, torch.rand(size, generator=g)
    current[0, ::7] = v_th  # from U = 0: exactly float32(V_th) after the first step
    states = []
    for impl in (kernels, spiking_kernels.tensor_ops):
        u, lf, n = torch.zeros(size), torch.zeros(size), torch.zeros(size)
        record = torch.zeros(8, size, dtype=torch.uint8)
        out = impl.fire(current, u, lf, n, record, 0, v_th, 0.99, True, None)
        states.append((out, u, lf, n, record, impl.leaky_sum(current, u0, 0.99)))
    assert states[0][0].sum() > 0 and all(torch.equal(a, b) for a, b in zip(*states))
    assert not states[1][0][0, ::7].any()


def test_neurons_and_pooling_keep_either_layout(backend, device):
    """Neurons and pooling on NCHW and on channels-last chunks: the reference's spikes and
    gradients, in the input's layout (the kernels walk memory order)."""
    spikes = signed_spikes((5, 2, 3, 6, 6), rate=0.6, device=device).abs()
    for channels_last in (False, True):
        x = spikes.flatten(0, 1)
        x = (x.contiguous(memory_format=torch.channels_last) if channels_last else x).unflatten(0, (5, 2))
        x = x.detach().requires_grad_()
        pool = sl.PoolIF()
        out = run_chunks(pool, x, 2)
        g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)
        grad, = torch.autograd.grad(out, x, g)
        x_ref = spikes.clone().requires_grad_()
        ref = reference_pool_neuron(torch.nn.functional.avg_pool2d(x_ref.flatten(0, 1), 2).unflatten(0, (5, 2)))
        ref_grad, = torch.autograd.grad(ref, x_ref, g)
        assert torch.equal(out, ref) and out.sum() > 0
        torch.testing.assert_close(grad, ref_grad, **TOL)
        assert is_channels_last(pool.u) == channels_last
        pool.reset()
        assert is_channels_last(pool(x[:2])[0]) == channels_last


# ----------------------------------------------------------------------------------------------
# The output integrator and whole networks

class Identity(sl.SpikingNetwork):
    """The output integrator alone: step() hands the input through as output currents."""

    def step(self, x):
        return x


@pytest.mark.parametrize("T,k", CASES)
def test_output_integrator(T, k, backend, device):
    current = torch.randn(T, 3, 10, dtype=torch.float64, device=device, requires_grad=True)
    ref = reference_output(current, leak=0.99)
    ref_grad, = torch.autograd.grad(ref.pow(2).sum(), current)
    net = Identity(time_steps=T, leak=0.99, time_chunk=k)
    out = net(current)
    grad, = torch.autograd.grad(out.pow(2).sum(), current)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


class Stack3(sl.SpikingNetwork):
    """conv (LIF, time-fixed dropout) – 2×2 pool (IF) – linear (output integrator)."""

    def __init__(self, time_steps, dropout=0.0):
        super().__init__(time_steps, 0.99)
        self.conv = sl.SpikingConv2d(2, 6, 3, padding=1, dropout=dropout)
        self.pool = sl.PoolIF()
        self.fc = sl.Linear(6 * 4 * 4, 10)
        sl.init_weights(self, gain=8.0)  # strong enough that every layer fires

    def step(self, x):                    # (k, B, 2, 8, 8)
        x = self.pool(self.conv(x))       # (k, B, 6, 4, 4)
        return self.fc(x.flatten(2))      # (k, B, 10)


def compare_with_reference(net, arch, spike_seq, k):
    """Engine vs reference on the same weights, input spikes and dropout masks."""
    target = torch.randn(spike_seq.shape[1], 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    target = target.to(spike_seq.device)
    x = spike_seq.clone().requires_grad_()
    net.time_chunk = k
    out = net(x)
    (out - target).pow(2).sum().backward()
    masks = {n: m.mask for n, m in net.named_modules() if getattr(m, "mask", None) is not None}

    weights = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    x_ref = spike_seq.clone().requires_grad_()
    record = {}
    ref = reference_forward(arch, weights, x_ref, leak=net.leak, masks=masks, record=record)
    (ref - target).pow(2).sum().backward()

    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    for n, p in net.named_parameters():
        assert p.grad.abs().sum() > 0, f"{n} got no gradient: the comparison would be vacuous"
        torch.testing.assert_close(p.grad, weights[n].grad, **TOL, msg=f"gradient of {n}")
    return masks, record


@pytest.mark.parametrize("T,k", CASES)
def test_conv_pool_linear_stack(T, k, backend, device):
    torch.manual_seed(T * 100 + k)
    net = Stack3(T, dropout=0.25).double().to(device)
    masks, record = compare_with_reference(net, "stack3", signed_spikes((T, 3, 2, 8, 8), device=device), k)
    assert set(masks) == {"conv"} and (masks["conv"] == 0).any()
    # G is the engine's own, from the whole window, whatever the chunking
    torch.testing.assert_close(net.conv.window.G(0.99), record["G.conv"], **TOL)
    # convolutions, and the neurons after them, run channels-last where the backend says so
    cl = spiking_kernels.for_tensor(net.conv.u).channels_last
    assert is_channels_last(net.conv.u) == is_channels_last(net.pool.u) == cl


ARCHS = {"mnist_LeNet.py": "lenet", "cifar10_VGG9.py": "vgg9", "cifar10_ResNet11.py": "resnet11",
         "svhn_ResNet.py": "resnet7"}


@pytest.mark.parametrize("script", list(ARCHS))
def test_network_matches_reference(script, backend, device):
    """The paper's networks, with dropout, T = 3 in chunks of 2 and 1: outputs, input gradient and
    every weight's gradient against the per-step reference. The init is scaled up (gain 8) so that
    every layer fires within 3 steps."""
    T = 3
    torch.manual_seed(0)
    net = network(script, time_steps=T, dropout=0.2)[0].double().to(device)
    sl.init_weights(net, gain=8.0)
    compare_with_reference(net, ARCHS[script], signed_spikes((T, 2, *NETWORKS[script][2]), 0.5, device=device), 2)


def test_images_and_their_spike_train_give_the_same_step(backend, device):
    """model(images) encodes them and trusts its own spikes (no check, no device sync); model(spike
    train) checks the train once. Same spikes, same output and gradients."""
    results = []
    for encode_outside in (False, True):
        torch.manual_seed(0)
        net = Stack3(4, dropout=0.25).double().to(device)
        images = torch.rand(3, 2, 8, 8, dtype=torch.float64, device=device) * 2 - 1
        x = net.encode(images) if encode_outside else images
        out = net(x)
        out.pow(2).sum().backward()
        results.append([out.detach(), net.conv.mask] + [p.grad for p in net.parameters()])
    assert results[0][0].abs().sum() > 0, "the test needs a firing network"
    for a, b in zip(*results):
        assert torch.equal(a, b)


class SumOfSpikes(sl.SpikingNetwork):
    """A linear layer fed the sum of two spike trains (0, 1, 2): graded values, not spikes."""

    def __init__(self):
        super().__init__(time_steps=3)
        self.fc = sl.Linear(4, 10)

    def step(self, x):
        return self.fc(x + x.roll(1, -1))


def test_graded_input_inside_a_network_is_computed_with_as_floats(backend, device):
    """Inside SpikingNetwork.forward a weight layer knows spikes by where they came from; anything
    else it computes with as floats, on every backend alike: the output and weight gradient of a
    plain linear layer, no device-side assertion (tests/test_variants.py: whole networks)."""
    net = SumOfSpikes().double().to(device)
    x = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64, device=device).expand(3, 2, 4).contiguous()
    out = net(x)
    out.pow(2).sum().backward()
    w = net.fc.weight.detach().clone().requires_grad_()
    ref = reference_output(torch.nn.functional.linear(x + x.roll(1, -1), w))
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(net.fc.weight.grad, w.grad, **TOL)


def test_eval_mode_matches_training_forward(backend, device):
    """No grad, no dropout: the same spikes, hence the same output as the training forward."""
    torch.manual_seed(0)
    net = Stack3(7).double().to(device)
    x = signed_spikes((7, 2, 2, 8, 8), device=device)
    train_out = net(x)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), train_out.detach(), rtol=0, atol=0)
        net.time_chunk = 3
        torch.testing.assert_close(net(x), train_out.detach(), rtol=0, atol=0)


def test_bf16_autocast_keeps_spikes_exact_and_membranes_fp32(backend, device):
    torch.manual_seed(0)
    net = Stack3(6).to(device)
    x = signed_spikes((6, 4, 2, 8, 8), device=device).float()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = net(x)
        assert net.conv.u.dtype == torch.float32 and net.pool.u.dtype == torch.float32
        spikes = net.conv(x[:1])
        # bf16 where the currents are (tensor operations, Triton); float32 for numba, which has no bf16
        assert spikes.dtype == (torch.float32 if backend.startswith("numba") else torch.bfloat16)
        assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    out.pow(2).sum().backward()
    assert out.dtype == torch.float32 and torch.isfinite(net.conv.weight.grad).all()
    assert net.conv.weight.grad.dtype == torch.float32


def test_backward_keeps_spikes_in_bytes_and_bits(backend, device):
    """No float currents, membranes or spikes are kept for backward: the synapses keep their input
    spikes in int8, the neurons theirs as bits (T/8 bytes per neuron), besides the weights and
    the per-neuron dropout masks."""
    torch.manual_seed(0)
    T, B = 10, 4
    net = Stack3(T, dropout=0.25).to(device)
    params = {p.data_ptr() for p in net.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        net(signed_spikes((T, B, 2, 8, 8), device=device).float()).sum().backward()
    kept = [t for t in saved if t.data_ptr() not in params]
    assert any(t.dtype == torch.int8 for t in kept), "no synapse input was saved: the hook did not see the engine"
    for t in kept:  # int8 spikes of k·B images; nothing else
        assert t.dtype == torch.int8, (t.dtype, t.shape)
    for name, layer in net.neuron_layers():
        record = layer.window.record
        assert record.dtype == torch.uint8 and record.shape == ((T + 7) // 8, layer.spike_count.numel()), name


def test_synapse_gradcheck(backend, device):
    """The conv/linear synapse is linear, so its hand-written backward must be the exact
    derivative: gradcheck with graded inputs (kept as float) and spike inputs (kept in int8)."""
    conv = sl.Conv2d(2, 3, 3, stride=2, padding=1).double().to(device)
    fc = sl.Linear(5, 4).double().to(device)
    for layer, shape in ((conv, (2, 3, 2, 5, 5)), (fc, (3, 2, 5))):
        for x in (torch.randn(shape, dtype=torch.float64), signed_spikes(shape) * 1.25):
            x = x.to(device).requires_grad_()
            assert torch.autograd.gradcheck(lambda x, w: sl._Synapse.apply(x, w, layer), (x, layer.weight),
                                          fast_mode=True)


def test_weight_gradients_come_in_their_parameters_layout(backend, device):
    """The gradient handed to autograd has its weight's strides (a channels-last grad_w from the CPU
    kernels is what makes DDP warn "Grad strides do not match bucket view strides"): seen by a hook
    on each weight, before autograd would lay it out itself. The values are the same either way."""
    torch.manual_seed(0)
    net = network("mnist_LeNet.py", time_steps=2)[0].to(device)
    seen = {}
    for name, p in net.named_parameters():
        p.register_hook(lambda g, name=name: seen.update({name: (g.stride(), g.clone())}))
    net(torch.rand(3, 1, 28, 28, device=device)).sum().backward()
    assert set(seen) == {name for name, _ in net.named_parameters()}
    for name, p in net.named_parameters():
        assert seen[name][0] == p.stride(), (name, seen[name][0], p.stride())
        assert torch.equal(seen[name][1], p.grad), name


# ----------------------------------------------------------------------------------------------
# The backend switch, and what a GPU step costs

def test_backend_switch(monkeypatch):
    """SPIKING_BACKEND selects the backends per device; an unknown or unavailable one is one line."""
    previous = spiking_kernels.use("auto")
    try:
        assert spiking_kernels.for_tensor(torch.zeros(1)).name == "numba"
        spiking_kernels.use("torch")
        assert spiking_kernels.for_tensor(torch.zeros(1)).name == "torch" and spiking_kernels.active() == "torch"
        with pytest.raises(spiking_kernels.BackendError, match="one of auto, torch, numba, triton"):
            spiking_kernels.use("cuda")
        assert spiking_kernels.active() == "torch"  # a refused choice leaves the previous one
    finally:
        spiking_kernels.use(previous)


@pytest.mark.parametrize("value,phrase", [("bogus", "must be one of auto, torch, numba, triton, got 'bogus'"),
                                          ("triton", "needs a CUDA GPU")])
def test_bad_backend_from_the_shell_is_one_line(value, phrase, run_script, clean_error):
    if value == "triton" and torch.cuda.is_available():
        pytest.skip("a GPU is here: SPIKING_BACKEND=triton is valid")
    p = run_script("mnist_LeNet.py", "--synthetic", env={"SPIKING_BACKEND": value, "TRITON_INTERPRET": "0"})
    clean_error(p, "SPIKING_BACKEND", phrase)


def test_numba_on_a_gpu_is_refused_before_any_work():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    previous = spiking_kernels.use("numba")
    try:
        with pytest.raises(spiking_kernels.BackendError, match="does not run on cuda tensors"):
            spiking_kernels.check_device(torch.device("cuda"))
    finally:
        spiking_kernels.use(previous)


def test_triton_step_launches_do_not_grow_with_T():
    """A VGG9 training step on the Triton backend, all steps in one chunk: the aten operations it
    dispatches (each a launch or host work on a GPU) and its kernel launches are the same at T = 20
    and T = 100 (the per-step tensor operations dispatch ~4.5× more at T = 100), and none of them
    waits for the device (no .item(), torch.equal, .tolist())."""
    if not (torch.cuda.is_available() or spiking_kernels._interpreting()):
        pytest.skip("Triton runs neither compiled (no GPU) nor interpreted here")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from count_ops import training_step_counts
    previous = spiking_kernels.use("triton")
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        (ops20, launches20), (ops100, launches100) = (training_step_counts(T, 1, device) for T in (20, 100))
    finally:
        spiking_kernels.use(previous)
    assert sum(ops100.values()) <= 1.5 * sum(ops20.values()) and sum(ops20.values()) < 1000
    assert launches20 == launches100 and launches20["_fire_kernel"] == 11 and launches20["_backprop_kernel"] == 11
    syncs = {"_local_scalar_dense", "item", "equal", "is_nonzero", "tolist"}
    assert not syncs & set(ops100), {k: ops100[k] for k in syncs & set(ops100)}


COMPILE_FOR_A_GPU = """
import itertools
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from spiking_kernels import triton_gpu as kernels

def compile(fn, arch, signature, **constexprs):
    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    binary = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32), options=kernels.LAUNCH)
    fused = sum("fma" in line for line in binary.asm["ptx"].splitlines())
    print(fn.__name__, arch, len(binary.asm["cubin"]), fused)

for arch in (80, 90):
    for state, current in (("fp32", "bf16"), ("fp32", "fp32"), ("fp64", "fp64")):
        s, c, ints = "*" + state, "*" + current, dict(N="i32", K="i32", t0="i32")
        for leaky_sum, record, mask in itertools.product((True, False), repeat=3):
            out = s if mask or current != "bf16" else "*bf16"
            compile(kernels._fire_kernel, arch, dict(current=c, u=s, lf=s, n=s, record="*u8", mask=s, out=out,
                                                     constants=s, **ints),
                    LEAKY_SUM=leaky_sum, RECORD=record, MASK=mask, BLOCK=1024)
        compile(kernels._backprop_kernel, arch, dict(grad_spikes=c, record="*u8", slope=s, carry=s, grad_current=s,
                                                     **ints), BLOCK=1024)
        compile(kernels._leaky_sum_kernel, arch, dict(current=c, u=s, constants=s, N="i32", K="i32"), BLOCK=1024)
        compile(kernels._pack_kernel, arch, dict(x=c, q="*i8", extremes=s, N="i32"), BLOCK=4096)
"""


def test_triton_kernels_compile_for_a_gpu_without_fp_contraction():
    """Every Triton kernel variant the engine launches (float32 membranes on float32 or bf16
    currents, and float64; every combination of LF, record and mask), compiled for Ampere (sm_80)
    and Hopper (sm_90) with the options of the launches (triton_gpu.LAUNCH): binaries, and no
    fused multiply-add in their PTX, so that each product and sum rounds as the tensor operations
    round them. Compiling needs no GPU (running does), but not the interpreter: a process of its own."""
    p = subprocess.run([sys.executable, "-c", COMPILE_FOR_A_GPU], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    compiled = [line.split() for line in p.stdout.splitlines()]
    assert len(compiled) == 2 * 3 * 11 and all(int(size) > 1000 for _, _, size, _ in compiled), p.stdout
    assert all(fused == "0" for *_, fused in compiled), [line for line in compiled if line[3] != "0"]


# ----------------------------------------------------------------------------------------------
# numba: --amp, threads, event-driven convolutions

def test_amp_drift_from_float32_is_bounded():
    """--amp (bf16 autocast) changes the numerics: currents carry ~3 significant digits, so
    spikes near threshold flip. Five SGD steps of LeNet from the same weights and spikes must
    stay close to float32: loss within 10 % at every step, and each layer's weights within 60 %
    of the float32 update's size (measured here: ≤ 4 % and ≤ 41 %)."""
    import copy

    from mnist_LeNet import LeNet
    torch.manual_seed(0)
    fp32 = LeNet(time_steps=16)
    start, amp = copy.deepcopy(fp32), copy.deepcopy(fp32)
    x = fp32.encode(torch.rand(32, 1, 28, 28))
    target = torch.nn.functional.one_hot(torch.arange(32) % 10, 10).float()
    losses = {}
    for net, bf16 in ((fp32, False), (amp, True)):
        opt = torch.optim.SGD(net.parameters(), lr=0.001)
        losses[bf16] = []
        for _ in range(5):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = (net(x) - target).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[bf16].append(loss.item())
    assert losses[False][-1] < losses[False][0] - 3, "float32 did not learn: the comparison would be vacuous"
    for l32, l16 in zip(losses[False], losses[True]):
        assert abs(l16 - l32) < 0.1 * l32
    for (name, p32), p16, p0 in zip(fp32.named_parameters(), amp.parameters(), start.parameters()):
        assert (p16 - p32).norm() < 0.6 * (p32 - p0).norm(), name


def test_pooling_fused_into_the_neurons_is_pool_then_fire_bit_for_bit(monkeypatch):
    """numba runs PoolIF's pooling and neurons in one pass each way: the same float32 spikes, spike
    counts and input gradients as pooling, then IF neurons, to the bit, split across threads, in
    either layout, of even and odd sizes (the last row and column dropped, as F.avg_pool2d)."""
    calls = []
    fused = numba_cpu.pool_fire
    monkeypatch.setattr(numba_cpu, "pool_fire", lambda *a: calls.append(1) or fused(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        spikes = signed_spikes((6, 8, 20, 28, 28), rate=0.4).abs().float()
        for channels_last, size in itertools.product((False, True), (28, 27)):
            x = spikes[..., :size, :size]
            x = (spiking_kernels.layout.channels_last(x.flatten(0, 1)).unflatten(0, (6, 8)) if channels_last
                 else x.contiguous())
            results = []
            for fuse in (True, False):
                monkeypatch.setattr(numba_cpu, "fuses_pooling", lambda x, fuse=fuse: fuse)
                xx, pool = x.detach().requires_grad_(), sl.PoolIF()
                out = run_chunks(pool, xx, 4)
                g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
                grad = torch.autograd.grad(out, xx, g)[0]
                assert is_channels_last(pool.u) == channels_last
                results.append((out, pool.spike_count, grad))
            assert results[0][0].sum() > 0
            for fused_result, separate in zip(*results):
                assert torch.equal(fused_result, separate)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 2 * 2 * 2
    monkeypatch.undo()
    assert numba_cpu.fuses_pooling(spikes) and numba_cpu.fuses_pooling(spikes[..., :27])


def test_pooling_split_across_threads_is_exact():
    """Large chunks are pooled by several threads, each over its own images, in either layout: the
    result must equal avg_pool2d's and its gradient, to the bit, and keep the input's layout."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        spikes = signed_spikes((3, 8, 20, 28, 28)).float()  # 24 images of 20 maps of 28×28
        for channels_last in (False, True):
            x = (spiking_kernels.layout.channels_last(spikes.flatten(0, 1)).unflatten(0, (3, 8)) if channels_last else spikes)
            x = x.detach().requires_grad_()
            images = numba_cpu._images(x.flatten(0, 1), channels_last)
            assert images.shape[0] // numba_cpu._maps(images) >= 2, "too small to be split: the test would be vacuous"
            y = sl._AvgPool2x2.apply(x)
            ref = torch.nn.functional.avg_pool2d(x.flatten(0, 1), 2).view_as(y)
            g = torch.randn_like(y)
            assert torch.equal(y, ref) and is_channels_last(y) == channels_last
            grad, ref_grad = torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0]
            assert torch.equal(grad, ref_grad) and is_channels_last(grad) == channels_last
    finally:
        torch.set_num_threads(threads)


def test_is_spike_train(backend, device):
    """0 and ±s for one s (or only zeros) is a spike train; graded values, two magnitudes and NaN are
    not; on every backend, in float32 and float64, in any layout."""
    spikes = signed_spikes((3, 2, 4, 6, 6), device=device)
    for dtype in (torch.float32, torch.float64):
        x = spikes.to(dtype)
        assert sl.is_spike_train(x) and sl.is_spike_train(x / 0.7) and sl.is_spike_train(torch.zeros_like(x))
        assert sl.is_spike_train(x.abs().transpose(-1, -2)) and sl.is_spike_train(x[..., ::2])
        for bad in (x * 0.5 + (x > 0) * 0.25, x + 0.1, x.masked_fill(x > 0, math.nan)):
            assert not sl.is_spike_train(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_pack_is_that_of_the_tensor_operations(dtype):
    """numba's pack (on the floats' bits) gives the tensor operations' q and s, and the number of
    events: unit, scaled, signed and all-zero spikes in either layout; graded values, NaN and
    infinity are no spike train."""
    spikes = signed_spikes((3, 2, 4, 6, 6)).to(dtype)
    cl = spiking_kernels.layout.channels_last(spikes.flatten(0, 1))
    for x in (spikes.abs(), spikes, spikes * 1.25, spikes / 0.7, torch.zeros_like(spikes), cl, -cl):
        ours, theirs = numba_cpu.pack(x), spiking_kernels.tensor_ops.pack(x)
        assert torch.equal(ours[0], theirs[0]) and ours[1].item() == theirs[1].item()
        assert ours[2] == x.count_nonzero() and is_channels_last(ours[0]) == is_channels_last(x)
    for x in (spikes * 0.5 + (spikes > 0) * 0.25, spikes.masked_fill(spikes > 0, math.nan),
              spikes.masked_fill(spikes != 0, math.inf)):
        assert numba_cpu.pack(x) is None


@pytest.fixture
def event_calls(monkeypatch):
    """Counts the calls of the event-driven output, weight gradient and input gradient."""
    calls = {"forward": 0, "weight_grad": 0, "input_grad": 0}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)
        return wrapper
    for name in calls:
        attr = "event_current" if name == "forward" else f"event_{name}"
        monkeypatch.setattr(numba_cpu, attr, counted(name, getattr(numba_cpu, attr)))
    return calls


SYNAPSES = ((lambda: sl.Conv2d(3, 5, 3, padding=1), (3, 2, 3, 9, 9)),
            (lambda: sl.Conv2d(4, 6, 5, padding=2), (2, 3, 4, 7, 7)),
            (lambda: sl.Conv2d(3, 4, 3, padding=0), (2, 2, 3, 6, 6)),
            (lambda: sl.Linear(40, 7), (3, 2, 40)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_event_driven_synapses_match_dense(dtype, monkeypatch, event_calls):
    """On events, a convolution's or Linear layer's output and weight gradient equal the dense
    path's up to the order of summation: unit, dropout-scaled and signed spikes, any padding. An
    input that is not a neuron layer's spikes gets the dense input gradient, everywhere."""
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else TOL
    for make, shape in SYNAPSES:
        layer = make().to(dtype)
        for x in (signed_spikes(shape, 0.05).abs(), signed_spikes(shape, 0.05).abs() / 0.7,
                  signed_spikes(shape, 0.05)):
            x = x.to(dtype)
            results = []
            for threshold in (0.0, 1.1):  # dense, then events
                monkeypatch.setattr(numba_cpu, "EVENT_DENSITY", crossovers(threshold))
                xx = x.clone().requires_grad_()
                y = sl.synapse(layer, xx)
                g = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
                grads = torch.autograd.grad(y, (xx, layer.weight), g)
                with torch.no_grad():
                    results.append((y, sl.synapse(layer, x), *grads))
            for dense, events in zip(*results):
                torch.testing.assert_close(events, dense, **tol)
    assert event_calls == {"forward": 24, "weight_grad": 12, "input_grad": 0}, event_calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_input_gradient_on_events_is_the_dense_one_where_the_input_fired(dtype, monkeypatch, event_calls):
    """A neuron layer's spikes into a synapse: on events, ∂L/∂s is computed where they fired, equal
    there to the dense gradient, and 0 elsewhere (where the neurons' backward does not read it);
    through a flatten too (LeNet's fc0)."""
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else TOL
    for make, shape in SYNAPSES:
        layer, neurons = make().to(dtype), sl.LIF(leak=0.9, v_th=0.5)
        current = (torch.rand(shape, dtype=dtype, generator=torch.Generator().manual_seed(2)) - 0.3).requires_grad_()
        grads = []
        for threshold in (0.0, 1.1):
            monkeypatch.setattr(numba_cpu, "EVENT_DENSITY", crossovers(threshold))
            neurons.reset()
            spikes = neurons(current)
            y = sl.synapse(layer, spikes)
            g = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
            grads.append(torch.autograd.grad(y, spikes, g)[0])
        fired = spikes != 0
        assert fired.any() and not fired.all()
        torch.testing.assert_close(grads[1][fired], grads[0][fired], **tol)
        assert not grads[1][~fired].any() and grads[0][~fired].any()
    assert event_calls["input_grad"] == 4, event_calls


def test_input_gradients_on_events_in_lenet(monkeypatch, event_calls):
    """In LeNet, cnn2, fc0 (pool2's spikes, flattened: a copy of a channels-last tensor) and fc1
    take a neuron layer's spikes: their input gradients run on events, once per chunk, and the
    network's weight gradients equal the dense path's."""
    from mnist_LeNet import LeNet
    torch.manual_seed(0)
    model = LeNet(time_steps=6, time_chunk=3).double()
    spikes = model.encode(torch.rand(2, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    grads = []
    for threshold in (0.0, 1.1):
        monkeypatch.setattr(numba_cpu, "EVENT_DENSITY", crossovers(threshold))
        model.zero_grad()
        (model(spikes) * torch.arange(10.0)).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert event_calls["input_grad"] == 3 * 2, event_calls
    for events, dense in zip(*grads):
        assert dense.any()
        torch.testing.assert_close(events, dense, **TOL)


def test_event_weight_rows_follow_the_weights(monkeypatch):
    """The event kernels make each weight's rows once a pass: an in-place update (as an
    optimizer's) or load_state_dict between passes is seen, so the output stays the dense path's
    (every other route: tests/test_variants.py)."""
    torch.manual_seed(0)
    model = Stack3(6).double().eval()
    spikes = signed_spikes((6, 2, 2, 8, 8), rate=0.3).abs()
    other = {k: v * 0.5 for k, v in model.state_dict().items()}

    def outputs():
        results = []
        for threshold in (1.1, 0.0):
            monkeypatch.setattr(numba_cpu, "EVENT_DENSITY", crossovers(threshold))
            with torch.no_grad():
                results.append(model(spikes))
        torch.testing.assert_close(*results, **TOL)
        return results[0]

    first = outputs()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)
    assert not torch.allclose(outputs(), first)
    model.load_state_dict(other)
    outputs()


def test_event_kernels_handle_padding_and_kernel_size():
    """The event kernels against oneDNN's: output, weight gradient and (everywhere the input
    fired) input gradient, for kernel sizes 3 and 5 with and without padding, and spikes at the
    image borders, scaled by s."""
    for c, o, kernel, pad in ((3, 5, 3, 1), (2, 3, 5, 2), (3, 4, 3, 0), (2, 4, 5, 1)):
        layer = sl.Conv2d(c, o, kernel, padding=pad).double()
        x = signed_spikes((2, 3, c, 9, 9), rate=0.2)
        q, s = x.to(torch.int8), torch.tensor(1.5, dtype=torch.float64)
        w = layer.weight.detach()
        out = numba_cpu.event_current(layer, q, s, w)
        ref = torch.nn.functional.conv2d(x.flatten(0, 1) * 1.5, w, None, 1, pad)
        torch.testing.assert_close(out, ref, **TOL)
        g = torch.randn(2, 3, *ref.shape[1:], dtype=torch.float64)
        ref_x, ref_w, _ = torch.ops.aten.convolution_backward(g.flatten(0, 1), x.flatten(0, 1) * 1.5, w, None, [1, 1],
                                                              [pad] * 2, [1, 1], False, [0, 0], 1, [True, True, False])
        torch.testing.assert_close(numba_cpu.event_weight_grad(layer, q, s, w, g), ref_w, **TOL)
        grad_x = numba_cpu.event_input_grad(layer, q, w, g.flatten(0, 1))
        torch.testing.assert_close(grad_x, torch.where(x.flatten(0, 1) != 0, ref_x, 0.0), **TOL)


def test_event_weight_gradient_split_by_images_for_few_channels():
    """A layer with fewer input channels than twice the threads (LeNet's cnn1) sums per-thread
    parts of its weight gradient over images: the same gradient, for any number of images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for images in (1, 3, 7, 64):
            layer = sl.Conv2d(1, 4, 5, padding=2).double()
            x = signed_spikes((images, 1, 1, 12, 12), rate=0.2)
            w = layer.weight.detach()
            g = torch.randn(images, 4, 12, 12, dtype=torch.float64)
            ref_w = torch.ops.aten.convolution_backward(g, x.flatten(0, 1), w, None, [1, 1], [2, 2], [1, 1], False,
                                                        [0, 0], 1, [False, True, False])[1]
            torch.testing.assert_close(numba_cpu.event_weight_grad(layer, x.to(torch.int8), torch.tensor(1.0), w, g),
                                       ref_w, **TOL)
    finally:
        torch.set_num_threads(threads)


def test_event_path_is_taken_by_input_density(event_calls):
    """Only sparse spikes into a Linear layer or a stride-1 convolution on a CPU run on events: not
    dense ones, and not strided convolutions, where events measured slower."""
    conv, strided, fc = sl.Conv2d(4, 6, 3, padding=1), sl.Conv2d(4, 6, 3, stride=2, padding=1), sl.Linear(256, 5)
    sparse = signed_spikes((5, 2, 4, 8, 8), rate=0.01).abs().float().requires_grad_()
    assert 0 < sparse.count_nonzero() < numba_cpu.EVENT_DENSITY["conv"]["weight_grad"] * sparse.numel()
    dense = signed_spikes((5, 2, 4, 8, 8), rate=0.5).abs().float().requires_grad_()
    sl.synapse(conv, sparse).sum().backward()
    sl.synapse(fc, sparse.flatten(2)).sum().backward()
    assert event_calls == {"forward": 2, "weight_grad": 2, "input_grad": 0}
    sl.synapse(conv, dense).sum().backward()
    sl.synapse(fc, dense.flatten(2)).sum().backward()
    sl.synapse(strided, sparse).sum().backward()
    assert event_calls == {"forward": 2, "weight_grad": 2, "input_grad": 0}

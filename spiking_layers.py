"""Spiking layers with the leak-aware approximate derivative, run over many time steps at once.

Lee, Sarwar, Panda, Srinivasan & Roy, "Enabling Spike-based Backpropagation for Training Deep
Neural Network Architectures", Frontiers in Neuroscience 14:119 (2020), doi 10.3389/fnins.2020.00119.
docs/model.md states the model with its derivation; in short, for every time step t:

    I_t   = W * s_t  (+ shortcut current)          step 1: synaptic current
    U'_t  = U_{t-1} + I_t                          step 2: integrate
    o_t   = 1[U'_t > V_th]                         step 3: fire (strictly greater)
    U''_t = U'_t · (1 - o_t)                       step 4: hard reset
    U_t   = λ · U''_t                              step 5: leak
    s_t   = o_t · m                                step 6: time-fixed dropout mask m

Backward, the leak-aware approximate derivative:

    LF = Σ_t λ^(T-1-t) o_t,   N = Σ_t o_t,   G = 1[LF > 1e-3] + ln(λ) · LF / (N + 1[N < 1e-3])
    gU'_t = (G / V_th) · o_t · g_t + (1 - o_t) · gU'_{t+1},   gU'_T = 0,   ∂L/∂I_t = gU'_t

Pooling neurons (2×2 average pool, then integrate-and-fire at 0.75) use the same recursion with
λ = 1 and G / V_th replaced by 1. The output layer integrates U = λ(U + I_t) and reads U_T / V_th / T.

Instead of one autograd graph per time step (the authors' design), a layer processes a *chunk*
of k time steps per call: one convolution over k·B images, then the neuron recursion over the k
steps, with the membrane carried to the next chunk. The recursions over time run in
spiking_kernels/ (tensor operations, numba loops on a CPU, Triton kernels on a GPU: one launch per
layer and chunk). k = T on a GPU; on a CPU, convolutions over a few hundred images are faster, so k
is a parameter. The numerics do not depend on k or on the backend. For backward, each weight layer
keeps its input spikes in one byte, and each neuron layer its spikes in one bit, never the float
currents or membranes.
"""
import contextvars
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import spiking_kernels
from spiking_kernels.layout import channels_last, flat, is_channels_last, logical_order, memory_order


# ----------------------------------------------------------------------------------------------
# Input encoding

def poisson_encode(x, time_steps, scale=1.0, generator=None):
    """Signed Poisson rate code: s_t = sign(x) · 1[u_t < |x|·scale], u_t ~ U(0, 1).

    x: (B, ...) images after the dataset's transform. Returns (T, B, ...) spikes in {-1, 0, 1}.
    scale is 1/2 for MNIST (ToTensor only, rates up to 0.5) and 1 for normalised CIFAR-10/SVHN."""
    u = torch.rand((time_steps, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
    return torch.sign(x) * (u < x.abs() * scale)


def is_spike_train(x):
    """Whether x holds only 0 and ±s for one s > 0 (or only zeros): what weight layers keep in a byte."""
    return spiking_kernels.for_tensor(x).is_spike_train(x)


# ----------------------------------------------------------------------------------------------
# Neurons: steps 2–5 over a chunk, and the leak-aware backward

def leak_correction(lf, n, leak):
    """G = 1[LF > 1e-3] + ln(λ)·LF/N': ≤ 1, and 0 for a neuron that never fired."""
    n = n + (n < 1e-3).to(n.dtype)
    return (lf > 1e-3).to(lf.dtype) + math.log(leak) * lf / n


class _Window:
    """Per-neuron statistics of one forward pass over the T-step window: the spike count N, the
    leaky spike sum LF (from which backward derives ∂o_t/∂U'_t at firing steps), and the record of
    the spikes, one bit per neuron and step (T/8 bytes per neuron), all in the membrane's layout."""

    def __init__(self):
        self.lf = self.n = self.record = self._slope = None
        self.steps = 0

    def start(self, like):
        self.lf, self.n = torch.zeros_like(like), torch.zeros_like(like)
        self.record = torch.zeros(0, like.numel(), dtype=torch.uint8, device=like.device)

    def record_until(self, steps):
        """The record, (planes, N) uint8 in memory order, with room for `steps` steps (grown by
        doubling, for a window whose length is not known in advance)."""
        planes = (steps + 7) // 8
        if planes > self.record.shape[0]:
            grown = self.record.new_zeros(max(planes, 2 * self.record.shape[0]), self.n.numel())
            grown[:self.record.shape[0]] = self.record
            self.record = grown
        return self.record

    def slope(self, leak, v_th, leak_corrected, mask):
        """∂s_t/∂U'_t at firing steps, flat (N,): m · G / V_th for LIF layers, 1 for pooling neurons.
        Complete only after the last chunk, so backward computes it (once per window)."""
        if self._slope is None:
            slope = leak_correction(self.lf, self.n, leak) / v_th if leak_corrected else torch.ones_like(self.n)
            slope = slope if mask is None else slope * mask
            self._slope = memory_order(slope, is_channels_last(self.n)).reshape(-1)
        return self._slope

    def G(self, leak):
        return leak_correction(self.lf, self.n, leak)


def _fire(current_seq, u, window, v_th, leak, leaky_sum, mask, record):
    """Steps 2–5 over a chunk (k, B, ...), in the membrane's layout: returns the spikes (times the
    dropout mask); the membrane u, N, LF and (record) the spike record are updated in place."""
    k, cl = current_seq.shape[0], is_channels_last(u)
    shape = memory_order(u, cl).shape
    current = memory_order(current_seq, cl).reshape(k, -1)
    kernels = spiking_kernels.for_tensor(u)
    bits = window.record_until(window.steps + k) if record else None
    mask = None if mask is None else memory_order(mask, cl).reshape(-1)
    out = kernels.fire(current, flat(u), flat(window.lf), flat(window.n), bits, window.steps, v_th, leak, leaky_sum,
                       mask)
    window.steps += k
    return logical_order(out.view(k, *shape), cl)


def _backprop(grad_spikes, window, t0, slope, grad_u):
    """The backward recursion over the chunk of steps t0, t0+1, ...; returns ∂L/∂I (k, B, ...) and
    gU' at its first step, in the layout of the spikes."""
    g, carry, cl = _backward_operands(grad_spikes, window, slope, grad_u)
    shape = memory_order(window.n, cl).shape
    grad_current, carry = spiking_kernels.for_tensor(slope).backprop(g, window.record, t0, slope, carry)
    return logical_order(grad_current.view(g.shape[0], *shape), cl), logical_order(carry.view(shape), cl)


def _backward_operands(grad_spikes, window, slope, grad_u):
    """∂L/∂s (k, N) and gU' after the chunk (N,), a copy the recursion updates, in the memory order
    of the membranes (channels-last: cl)."""
    k, cl = grad_spikes.shape[0], is_channels_last(window.n)
    carry = torch.zeros_like(slope) if grad_u is None else \
        memory_order(grad_u, cl).reshape(-1).to(slope.dtype, copy=True)
    return memory_order(grad_spikes, cl).reshape(k, -1), carry, cl


class _Neuron(torch.autograd.Function):
    """Steps 2–5 (and the dropout mask) over a chunk of k time steps; the membrane is carried between
    chunks, and its gradient gU' flows back across the chunk boundary."""

    @staticmethod
    def forward(ctx, current_seq, u, window, v_th, leak, leak_corrected, mask):
        ctx.t0 = window.steps
        spikes = _fire(current_seq, u, window, v_th, leak, leak_corrected, mask, record=True)
        ctx.mark_dirty(u)  # the membrane is carried in place: no copy per chunk (backward needs none of it)
        ctx.window, ctx.v_th, ctx.leak, ctx.leak_corrected, ctx.mask = window, v_th, leak, leak_corrected, mask
        return spikes, u

    @staticmethod
    def backward(ctx, grad_spikes, grad_u):
        # ∂s_t/∂U'_t = m · (G / V_th) · 1[o_t = 1]. A silent step passes gU'_{t+1} on unchanged: the
        # leak is identity in backward (the paper's choice, not a bug); a firing step's reset
        # blocks the path from later steps.
        slope = ctx.window.slope(ctx.leak, ctx.v_th, ctx.leak_corrected, ctx.mask)
        grad_current, grad_u = _backprop(grad_spikes, ctx.window, ctx.t0, slope, grad_u)
        return grad_current, grad_u, None, None, None, None, None


def _check_leak(leak):
    if not 0.0 < leak <= 1.0:
        raise ValueError(f"leak must lie in (0, 1], got {leak}")
    return leak


class SpikingNeurons(nn.Module):
    """A layer of neurons with state over one forward pass (membrane, spike counts, LF, dropout mask).

    The dropout mask is drawn once per forward pass and shared by all T steps: a fresh mask every
    step would average out over the window (the paper's Algorithm 1)."""
    v_th = 1.0
    leak = 1.0
    leak_corrected = False
    dropout = 0.0

    def reset(self):
        self.u = self.mask = None
        self.window = _Window()

    @property
    def spike_count(self):
        """Spikes per neuron, (B, ...), over the steps run so far in this forward pass."""
        return self.window.n

    def _start(self, shape, like):
        """The state for a new window: membranes (B, ...) = shape, in at least float32 (also under
        bf16 autocast) and in the layout of the input chunk `like` (k, B, ...)."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        cl = like.dim() == 5 and is_channels_last(like[0])
        self.u = torch.zeros(shape, dtype=dtype, device=like.device)
        self.u = self.u.contiguous(memory_format=torch.channels_last) if cl else self.u
        self.window.start(self.u)
        if self.training and self.dropout > 0:
            keep = torch.full_like(self.u, 1.0 - self.dropout)
            self.mask = torch.bernoulli(keep) / (1.0 - self.dropout)

    def fire(self, current_seq):
        if self.u is None:
            self._start(current_seq.shape[1:], current_seq)
        if torch.is_grad_enabled() and current_seq.requires_grad:
            spikes, self.u = _Neuron.apply(current_seq, self.u, self.window, self.v_th, self.leak,
                                           self.leak_corrected, self.mask)
        else:
            spikes = _fire(current_seq, self.u, self.window, self.v_th, self.leak, False, self.mask, record=False)
        return _made_spikes(spikes)


class LIF(SpikingNeurons):
    """Leaky integrate-and-fire neurons with the leak-aware gradient, on currents (k, B, ...)."""
    leak_corrected = True

    def __init__(self, leak=0.99, v_th=1.0):
        super().__init__()
        self.leak, self.v_th = _check_leak(leak), v_th
        self.reset()

    def forward(self, current_seq):
        return self.fire(current_seq)


class IF(SpikingNeurons):
    """The pooling neurons' integrate-and-fire: threshold 0.75, hard reset, no leak, plain
    straight-through gradient (no 1/V_th, no leak correction), as the paper."""
    v_th = 0.75

    def __init__(self):
        super().__init__()
        self.reset()

    def forward(self, current_seq):
        return self.fire(current_seq)


# ----------------------------------------------------------------------------------------------
# Synapses: a per-image layer applied to a (k, B, ...) spike chunk by folding time into the batch

class _Pass:
    """One forward pass of a network and its backward. It knows which tensors are spike trains by
    where they came from (the encoder's, or a neuron layer's of this pass, unmodified: the version
    counter they had then), so that packing them needs no check, which on a GPU would wait for
    the device; and it holds what a backend derives from a weight (the event kernels' weight
    rows), for this pass only: the next pass sees the weight as it is then, however it changed."""

    def __init__(self):
        self.spikes = torch.utils.weak.WeakIdKeyDictionary()   # tensor -> its version when made
        self.derived = torch.utils.weak.WeakIdKeyDictionary()  # weight -> a backend's layout of it

    def made_spikes(self, x):
        # a view of all of a tensor (a neuron layer's spikes are one of their flat output) stands
        # for that tensor, so that every view of it (a reshape, a chunk) is known too
        whole = x if x._base is None or x.numel() != x._base.numel() else x._base
        self.spikes[whole] = whole._version

    def are_spikes(self, x):
        return any(t is not None and self.spikes.get(t) == t._version for t in (x, x._base))


_PASS = contextvars.ContextVar("forward_pass", default=None)


def _made_spikes(spikes):
    """Marks a neuron layer's output as spikes for the pass it belongs to."""
    current_pass = _PASS.get()
    if current_pass is not None:
        current_pass.made_spikes(spikes)
    return spikes


def _derived():
    """Where a backend keeps what it derives from a weight: the pass's, or None (a layer on its own)."""
    current_pass = _PASS.get()
    return None if current_pass is None else current_pass.derived


def _current(layer, spike_seq, weight, pack=True):
    """I = layer(s) over a chunk (k, B, ...), on events where the backend has them and the input is
    sparse. Also returns the packed input (q, s) of the k·B images for backward (None: kept as it
    is, graded input) and the input's density of events (None: not eligible for events), with
    which backward chooses its paths. Inside a pass, spikes by provenance are packed unchecked;
    any other input is checked where that costs no wait for a device (CPU tensors), and is kept
    as floats elsewhere; outside a pass (a layer on its own) every input is checked."""
    current_pass = _PASS.get()
    trusted = current_pass is not None and current_pass.are_spikes(spike_seq)
    x = spike_seq.flatten(0, 1)
    kernels = spiking_kernels.for_tensor(x)
    if isinstance(layer, nn.Conv2d) and kernels.channels_last:
        x = channels_last(x)
    on_events = kernels.events and kernels.event_eligible(layer, weight)
    packed, density = None, None
    if pack or on_events:
        if trusted or current_pass is None or x.device.type == "cpu":
            packed = kernels.pack(x, check=not trusted)
        if packed is not None and on_events:
            # under bf16 autocast the dense kernels run about twice as fast: halve the crossovers
            density = packed[2] / max(x.numel(), 1) * (2 if torch.is_autocast_enabled("cpu") else 1)
    if density is not None and density < kernels.event_crossovers(layer)["forward"]:
        current = kernels.event_current(layer, packed[0], packed[1], weight, _derived())
    else:
        current = _per_image(layer, x, weight)
    return current.unflatten(0, spike_seq.shape[:2]), x if packed is None else packed[:2], density


# Autograd nodes that only re-index their input, one element to one: a neuron layer's spikes
# passed through them (LeNet's and VGG9's flatten before fc0) are still read only where they fired.
_REINDEXING = frozenset(("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "CloneBackward0",
                         "PermuteBackward0", "TransposeBackward0", "AliasBackward0"))


def _fired_spikes(x):
    """Whether x is a neuron layer's spikes, so that its backward reads ∂L/∂x only where a neuron
    fired (∂s_t/∂U'_t is 0 at silent steps, and the mask's 0 where dropout removed a spike)."""
    fn, output = x.grad_fn, 0
    while fn is not None and type(fn).__name__ in _REINDEXING:
        fn, output = fn.next_functions[0]
    return isinstance(fn, (_Neuron._backward_cls, _PoolNeuron._backward_cls)) and output == 0


class _Synapse(torch.autograd.Function):
    """I = layer(s) for a Conv2d or Linear without bias, over a chunk of time steps.

    autograd's own conv/linear would save the float input; here it is saved in one byte. On events
    (sparse spikes, numba backend), the output, the weight gradient, and the input gradient of a
    neuron layer's spikes, computed only where they fired, as that layer's backward reads it."""

    @staticmethod
    def forward(ctx, spike_seq, weight, layer):
        current, kept, density = _current(layer, spike_seq, weight)
        x, ctx.scale = kept if isinstance(kept, tuple) else (kept, None)
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.chunk, ctx.in_dtype, ctx.derived = layer, spike_seq.shape[:2], spike_seq.dtype, _derived()
        crossover = spiking_kernels.for_tensor(x).event_crossovers(layer) if density is not None else {}
        ctx.events = density is not None and density < crossover["weight_grad"]
        ctx.events_x = density is not None and density < crossover["input_grad"] and _fired_spikes(spike_seq)
        # the dtype of the dense kernels, also when this forward ran on events: bf16 under autocast
        ctx.compute_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") and \
            current.device.type == "cpu" else current.dtype
        return current

    @staticmethod
    def backward(ctx, grad_current):
        q, weight = ctx.saved_tensors
        s, dtype, layer = ctx.scale, ctx.compute_dtype, ctx.layer
        need_w = ctx.needs_input_grad[1]
        need_x = ctx.needs_input_grad[0] and not ctx.events_x
        dense_w = need_w and not ctx.events
        grad_x = grad_w = None
        if need_x or dense_w:
            g = grad_current.flatten(0, 1).to(dtype)
            w = weight.to(dtype)
            x = (q.to(dtype) if s is None else spiking_kernels.for_tensor(q).unpack(q, s, dtype)) if dense_w else None
            if isinstance(layer, nn.Conv2d):
                if is_channels_last(g):  # the kernels follow the input's or the weight's layout
                    w = w.contiguous(memory_format=torch.channels_last)
                shape_only = torch.empty((), dtype=dtype, device=g.device).expand(q.shape)
                grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                    g, x if dense_w else shape_only, w, None, layer.stride, layer.padding, layer.dilation,
                    False, [0, 0], layer.groups, [need_x, dense_w, False])
            else:
                grad_x = g @ w if need_x else None
                grad_w = g.t() @ x if dense_w else None
        kernels = spiking_kernels.for_tensor(q)
        if need_w and ctx.events:
            grad_w = kernels.event_weight_grad(layer, q, s, weight, grad_current)
        if ctx.needs_input_grad[0] and ctx.events_x:
            grad_x = kernels.event_input_grad(layer, q, weight, grad_current.flatten(0, 1).to(weight.dtype),
                                             ctx.derived)
        if grad_x is not None:
            grad_x = grad_x.unflatten(0, ctx.chunk).to(ctx.in_dtype)
        if grad_w is not None and (grad_w.dtype != weight.dtype or grad_w.stride() != weight.stride()):
            # in the weight's own dtype and layout: channels-last kernels return channels-last grad_w,
            # which DDP's buckets (laid out like the parameter) would copy element by element
            grad_w = torch.empty_like(weight).copy_(grad_w)
        return grad_x, grad_w, None


def _per_image(layer, x, weight):
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight)


def synapse(layer, spike_seq):
    """Apply a Conv2d/Linear (no bias) to a (k, B, ...) chunk: one call over k·B images."""
    if torch.is_grad_enabled() and (spike_seq.requires_grad or layer.weight.requires_grad):
        return _Synapse.apply(spike_seq, layer.weight, layer)
    return _current(layer, spike_seq, layer.weight, pack=False)[0]


class Conv2d(nn.Conv2d):
    """nn.Conv2d without bias over spike chunks (k, B, C, H, W) (ResNet shortcuts)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias=False)

    def forward(self, spike_seq):
        return synapse(self, spike_seq)


class Linear(nn.Linear):
    """nn.Linear without bias over spike chunks (k, B, features) (the output layer)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, spike_seq):
        return synapse(self, spike_seq)


# ----------------------------------------------------------------------------------------------
# Pooling

class _AvgPool2x2(torch.autograd.Function):
    """2×2 average pooling of a (k, B, C, H, W) chunk, in its layout; of an odd size, as
    F.avg_pool2d, without the last row or column. Backward needs no saved input (the gradient is
    1/4 everywhere, 0 on a dropped row or column), whereas autograd's avg_pool2d would keep the spikes."""

    @staticmethod
    def forward(ctx, spike_seq):
        x = spike_seq.flatten(0, 1)                                     # (k·B, C, H, W)
        ctx.size = x.shape[2:]
        return spiking_kernels.for_tensor(x).pool2x2(x).unflatten(0, spike_seq.shape[:2])

    @staticmethod
    def backward(ctx, grad):
        g = grad.flatten(0, 1)
        return spiking_kernels.for_tensor(g).unpool2x2(g, ctx.size).unflatten(0, grad.shape[:2])


class _PoolNeuron(torch.autograd.Function):
    """PoolIF over a chunk where the backend fuses the pooling into the neurons: one pass forward
    (pool, integrate, fire) and one backward (the recursion, then 1/4 to each input), with the
    arithmetic of _AvgPool2x2 and _Neuron."""

    @staticmethod
    def forward(ctx, spike_seq, u, window, v_th):
        ctx.t0, ctx.window, ctx.shape = window.steps, window, spike_seq.shape
        spikes = _pool_fire(spike_seq, u, window, v_th, record=True)
        ctx.mark_dirty(u)
        return spikes, u

    @staticmethod
    def backward(ctx, grad_spikes, grad_u):
        window = ctx.window
        slope = window.slope(1.0, 1.0, False, None)
        g, carry, cl = _backward_operands(grad_spikes, window, slope, grad_u)
        grad_x = spiking_kernels.for_tensor(slope).backprop_unpool(g, window.record, ctx.t0, slope, carry,
                                                                   ctx.shape, cl)
        return grad_x, logical_order(carry.view(memory_order(window.n, cl).shape), cl), None, None


def _pool_fire(spike_seq, u, window, v_th, record):
    k = spike_seq.shape[0]
    bits = window.record_until(window.steps + k) if record else None
    spikes = spiking_kernels.for_tensor(u).pool_fire(spike_seq, u, window.n, bits, window.steps, v_th, 1.0)
    window.steps += k
    return spikes


class PoolIF(IF):
    """2×2 average pooling, then IF neurons (in one pass where the backend fuses them)."""

    def forward(self, spike_seq):  # (k, B, C, H, W) -> (k, B, C, ⌊H/2⌋, ⌊W/2⌋)
        if min(spike_seq.shape[-2:]) < 2:
            raise ValueError(f"2×2 pooling needs maps of at least 2×2, got {tuple(spike_seq.shape[-2:])}")
        if not spiking_kernels.for_tensor(spike_seq).fuses_pooling(spike_seq):
            return self.fire(_AvgPool2x2.apply(spike_seq))
        if self.u is None:
            self._start((*spike_seq.shape[1:3], spike_seq.shape[3] // 2, spike_seq.shape[4] // 2), spike_seq)
        if torch.is_grad_enabled() and spike_seq.requires_grad:
            spikes, self.u = _PoolNeuron.apply(spike_seq, self.u, self.window, self.v_th)
        else:
            spikes = _pool_fire(spike_seq, self.u, self.window, self.v_th, record=False)
        return _made_spikes(spikes)


# ----------------------------------------------------------------------------------------------
# Spiking layers: synapse, LIF neurons, time-fixed dropout

class _SpikingLayer(SpikingNeurons):
    """A weight layer followed by leaky integrate-and-fire neurons and time-fixed dropout."""
    leak_corrected = True

    def _setup_neurons(self, leak, v_th, dropout):
        _check_leak(leak)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.leak, self.v_th, self.dropout = leak, v_th, dropout
        self.reset()

    def forward(self, spike_seq, extra_current=None):
        current_seq = synapse(self, spike_seq)
        if extra_current is not None:  # ResNet: the shortcut current joins the second conv's membrane
            current_seq = current_seq + extra_current
        return self.fire(current_seq)

    def extra_repr(self):
        return super().extra_repr() + f", leak={self.leak}, v_th={self.v_th}, dropout={self.dropout}"


class SpikingConv2d(_SpikingLayer, Conv2d):
    """Conv2d (no bias) + LIF neurons + time-fixed dropout. Its only parameter is `weight`, so the
    state_dict keys are the authors' (`cnn1.weight`)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, leak=0.99,
                 v_th=1.0, dropout=0.0):
        Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding)
        self._setup_neurons(leak, v_th, dropout)


class SpikingLinear(_SpikingLayer, Linear):
    """Linear (no bias) + LIF neurons + time-fixed dropout."""

    def __init__(self, in_features, out_features, leak=0.99, v_th=1.0, dropout=0.0):
        Linear.__init__(self, in_features, out_features)
        self._setup_neurons(leak, v_th, dropout)


# ----------------------------------------------------------------------------------------------
# Output integrator

class _Integrate(torch.autograd.Function):
    """U = λ(U + I_t) over a chunk. The leak is identity in backward (the paper's choice), so every
    step's current receives the gradient of the final membrane."""

    @staticmethod
    def forward(ctx, current_seq, u, leak):
        ctx.k = current_seq.shape[0]
        return _leaky_sum(current_seq, u, leak)

    @staticmethod
    def backward(ctx, grad_u):
        return grad_u.expand(ctx.k, *grad_u.shape), grad_u, None


def _leaky_sum(current_seq, u, leak):
    current = current_seq.reshape(current_seq.shape[0], -1)
    return spiking_kernels.for_tensor(u).leaky_sum(current, u.reshape(-1), leak).view(u.shape)


# ----------------------------------------------------------------------------------------------
# Networks

def init_weights(model, gain):
    """The authors' init: weights ~ N(0, sqrt(gain / fan_in)); gain 2 for LeNet and VGG9, 1 for the
    ResNets."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, 0.0, math.sqrt(gain / fan_in))


def default_time_chunk(batch_size, time_steps, device, images=256):
    """k time steps per call: all of them on a GPU; on a CPU about `images` images per convolution
    call, where oneDNN runs fastest (docs/performance.md)."""
    if device.type == "cuda":
        return time_steps
    return max(1, min(time_steps, images // max(batch_size, 1)))


class SpikingNetwork(nn.Module):
    """Runs `step` chunk by chunk over the T-step window and integrates the output layer.

    Subclasses define the layers and `step(x)`: input spikes (k, B, ...) -> output currents
    (k, B, classes). A weight layer given spikes (the encoder's, or a neuron layer's, unmodified)
    keeps them in a byte for backward; given anything else (a sum of spikes) it computes with floats. `model(x)` takes
    images (B, C, H, W), Poisson-encoded here, or a ready spike train (T, B, C, H, W) (event data,
    exact tests), and returns U_out(T) / V_th / T. time_chunk: time steps per call (None: all T on
    a GPU, about `images_per_call` images per convolution on a CPU); results do not depend on it."""
    input_scale = 1.0
    images_per_call = 256  # on a CPU, see default_time_chunk

    def __init__(self, time_steps=100, leak=0.99, time_chunk=None):
        super().__init__()
        if time_steps < 1:
            raise ValueError(f"time_steps must be ≥ 1, got {time_steps}")
        if time_chunk is not None and time_chunk < 1:
            raise ValueError(f"time_chunk must be ≥ 1, got {time_chunk}")
        _check_leak(leak)
        self.time_steps, self.leak, self.time_chunk = time_steps, leak, time_chunk
        self.v_th = 1.0

    def encode(self, images, generator=None):
        return poisson_encode(images, self.time_steps, self.input_scale, generator)

    def forward(self, x, readout_steps=()):
        """readout_steps: also return the readout after each of these step counts (latency sweep);
        then the result is (len(readout_steps) + 1, B, classes), the full window last."""
        # a given spike train is checked once here (graded values are kept as they are); the
        # encoder's spikes need no check, so a step on images never waits for the device
        this_pass = _Pass()
        spike_seq = self.encode(x) if x.dim() == 4 else x
        if x.dim() == 4 or is_spike_train(x):
            this_pass.made_spikes(spike_seq)
        T, B = spike_seq.shape[:2]
        for m in self.modules():
            if isinstance(m, SpikingNeurons):
                m.reset()
        k = self.time_chunk or default_time_chunk(B, T, spike_seq.device, self.images_per_call)
        u, t, readouts = None, 0, []
        token = _PASS.set(this_pass)
        try:
            for chunk in spike_seq.split(k):
                current_seq = self.step(chunk)
                if u is None:
                    u = current_seq.new_zeros(current_seq.shape[1:], dtype=torch.float64
                                              if current_seq.dtype == torch.float64 else torch.float32)
                for j in range(len(chunk)):  # a latency readout may fall inside a chunk
                    if t + j + 1 in readout_steps:
                        u_t = _leaky_sum(current_seq[:j + 1].detach(), u.detach(), self.leak)
                        readouts.append(u_t / self.v_th / (t + j + 1))
                if torch.is_grad_enabled() and current_seq.requires_grad:
                    u = _Integrate.apply(current_seq, u, self.leak)
                else:
                    u = _leaky_sum(current_seq, u, self.leak)
                t += len(chunk)
        finally:
            _PASS.reset(token)
        out = u / self.v_th / T
        return torch.stack(readouts + [out.detach()]) if readout_steps else out

    def step(self, spike_seq):
        raise NotImplementedError

    def neuron_layers(self):
        """(name, module) of every spiking and pooling neuron layer, in network order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, SpikingNeurons)]

    def spike_rates(self):
        """(names, rates): the mean spikes per neuron per time step of each neuron layer in the last
        forward pass, as one float64 tensor on the device, not read by the host (training reads it
        together with the loss, once per step)."""
        layers = [(n, m) for n, m in self.neuron_layers() if m.spike_count is not None]
        rates = [m.spike_count.sum().double() / (m.spike_count.numel() * m.window.steps) for _, m in layers]
        device = next(self.parameters()).device
        return [n for n, _ in layers], torch.stack(rates) if rates else torch.zeros(0, dtype=torch.float64,
                                                                                     device=device)

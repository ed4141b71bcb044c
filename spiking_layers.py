"""Spiking layers with the leak-aware approximate derivative, run over many time steps at once.

Lee, Sarwar, Panda, Srinivasan & Roy, "Enabling Spike-based Backpropagation for Training Deep
Neural Network Architectures", Frontiers in Neuroscience 14:119 (2020), doi 10.3389/fnins.2020.00119.

Forward, for every time step t (SPEC §1):

    I_t   = W * s_t  (+ shortcut current)          step 1: synaptic current
    U'_t  = U_{t-1} + I_t                          step 2: integrate
    o_t   = 1[U'_t > V_th]                         step 3: fire (strictly greater)
    U''_t = U'_t · (1 - o_t)                       step 4: hard reset
    U_t   = λ · U''_t                              step 5: leak
    s_t   = o_t · m                                step 6: time-fixed dropout mask m

Backward, the leak-aware approximate derivative (SPEC §2, the paper's Eq. 10–12):

    LF = Σ_t λ^(T-1-t) o_t,   N = Σ_t o_t,   G = 1[LF > 1e-3] + ln(λ) · LF / (N + 1[N < 1e-3])
    gU'_t = (G / V_th) · o_t · g_t + (1 - o_t) · gU'_{t+1},   gU'_T = 0,   ∂L/∂I_t = gU'_t

Pooling neurons (2×2 average pool, then integrate-and-fire at 0.75) use the same recursion with
λ = 1 and G / V_th replaced by 1. The output layer integrates U = λ(U + I_t) and reads U_T / V_th / T.

Instead of one autograd graph per time step (the authors' design), a layer processes a *chunk*
of k time steps per call: one convolution over k·B images, then the neuron recursion over the k
steps, with the membrane carried to the next chunk. k = T is the fully time-batched case GPUs
want; on a 2-core CPU, convolutions over 64–256 images are fastest (PERF-NOTES), so k is a
parameter. The numerics do not depend on k. For backward, each weight layer keeps its input
spikes in one byte, and each neuron layer its spikes in one bit (a CPU) or one byte (a GPU),
never the float currents or membranes.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.weak


# ----------------------------------------------------------------------------------------------
# Input encoding

def poisson_encode(x, time_steps, scale=1.0, generator=None):
    """Signed Poisson rate code (SPEC §1): s_t = sign(x) · 1[u_t < |x|·scale], u_t ~ U(0, 1).

    x: (B, ...) images after the dataset's transform. Returns (T, B, ...) spikes in {-1, 0, 1}.
    scale is 1/2 for MNIST (ToTensor only, rates up to 0.5) and 1 for normalised CIFAR-10/SVHN."""
    u = torch.rand((time_steps, *x.shape), generator=generator, device=x.device, dtype=x.dtype)
    return torch.sign(x) * (u < x.abs() * scale)


# ----------------------------------------------------------------------------------------------
# Compiled CPU loops. The neuron recursion, 2×2 pooling and spike packing run on a CPU as small
# numba loops: one pass over a chunk instead of several tensor operations per time step (a LIF
# layer ran ~10× faster that way on our 2-core machine, see benchmarks/). On a GPU, or without
# numba, the same arithmetic runs as tensor operations; tests check that both agree exactly.

import concurrent.futures
import functools

try:
    import numba
except ImportError:  # pragma: no cover - numba is in requirements.txt
    numba = None
CPU_KERNELS = numba is not None  # tests switch it off to check the tensor path GPUs use


def _cpu_kernel(fn):
    # nogil: the loops of one call run on several threads at once, each over its own range
    return numba.njit(cache=True, nogil=True)(fn) if numba is not None else fn


def _cpu_helper(fn):
    # inlined into the calling kernels (as a plain call, the event kernels ran 2–3× slower)
    return numba.njit(inline="always", cache=True)(fn) if numba is not None else fn


# unsigned loop indices: numba then skips the negative-index check and vectorizes (4× here)
U64 = numba.uint64 if numba is not None else int
BLOCK = 2048  # neurons per block: their state stays in L1 over a chunk's steps (2.5× here)


def _use_cpu_kernels(t):
    return CPU_KERNELS and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _split(kernel, n, *args, grain=32768):
    """kernel(lo, hi, *args) over [0, n), split across torch's CPU threads into parts of at
    least `grain` (the loops are elementwise along n)."""
    parts = max(1, min(torch.get_num_threads(), n // grain))
    if parts == 1:
        return [kernel(0, n, *args)]
    edges = [n * i // parts // 64 * 64 if grain >= 64 else n * i // parts for i in range(parts)] + [n]
    futures = [_helper_threads(parts - 1).submit(kernel, edges[i], edges[i + 1], *args) for i in range(1, parts)]
    return [kernel(edges[0], edges[1], *args)] + [f.result() for f in futures]


@functools.lru_cache(maxsize=None)
def _helper_threads(workers):
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="spiking")


@_cpu_kernel
def _fire_cpu(lo, hi, current, u, out, lf, n, v_th, leak, leaky_sum, record, t0):
    """Steps 2–5 for k steps of neurons lo..hi, plus N ← N + o_t and LF ← λ·LF + o_t. If record
    is a (planes, N) array, spike o_s (s = t0 + t, the step in the window) goes to bit s % 8 of
    record[s // 8]: 8 steps a byte, and still a loop over contiguous neurons."""
    for b in range(lo, hi, BLOCK):  # a block's membranes stay in cache over the k steps
        for t in range(current.shape[0]):
            plane, bit = (t0 + t) >> 3, (t0 + t) & 7
            for i in range(U64(b), U64(min(b + BLOCK, hi))):
                v = u[i] + current[t, i]             # step 2: integrate
                o = v > v_th                         # step 3: fire, strictly above threshold
                out[t, i] = o
                u[i] = (0.0 if o else v) * leak      # steps 4–5: hard reset, leak
                n[i] += o
                if leaky_sum:
                    lf[i] = lf[i] * leak + o
                if record.shape[0]:
                    record[plane, i] |= o << bit


@_cpu_kernel
def _backprop_cpu(lo, hi, grad_spikes, record, t0, slope, carry, grad_current):
    """gU'_t = slope · o_t · g_t + (1 − o_t) · gU'_{t+1}, backwards over k steps."""
    for b in range(lo, hi, BLOCK):
        for t in range(grad_spikes.shape[0] - 1, -1, -1):
            plane, bit = (t0 + t) >> 3, (t0 + t) & 7
            for i in range(U64(b), U64(min(b + BLOCK, hi))):
                c = grad_spikes[t, i] * slope[i] if (record[plane, i] >> bit) & 1 else carry[i]
                grad_current[t, i] = c
                carry[i] = c


@_cpu_kernel
def _pool_cpu(lo, hi, x, out):
    """out = 2×2 average of x, (M, H, W, C) -> (M, H/2, W/2, C), for images lo..hi."""
    for m in range(U64(lo), U64(hi)):
        for h in range(out.shape[1]):
            for w in range(out.shape[2]):
                for c in range(U64(out.shape[3])):
                    out[m, h, w, c] = (x[m, 2 * h, 2 * w, c] + x[m, 2 * h, 2 * w + 1, c]
                                       + x[m, 2 * h + 1, 2 * w, c] + x[m, 2 * h + 1, 2 * w + 1, c]) * 0.25


@_cpu_kernel
def _unpool_cpu(lo, hi, g, out):
    """The gradient of 2×2 average pooling: each input gets 1/4 of its output's gradient."""
    for m in range(U64(lo), U64(hi)):
        for h in range(g.shape[1]):
            for w in range(g.shape[2]):
                for c in range(U64(g.shape[3])):
                    q = g[m, h, w, c] * 0.25
                    out[m, 2 * h, 2 * w, c] = q
                    out[m, 2 * h, 2 * w + 1, c] = q
                    out[m, 2 * h + 1, 2 * w, c] = q
                    out[m, 2 * h + 1, 2 * w + 1, c] = q


@_cpu_kernel
def _pack_cpu(lo, hi, x, q):
    """q = sign(x) as int8; returns the largest and the smallest nonzero |x|, and how many."""
    largest, smallest, events = 0.0, math.inf, 0
    for i in range(U64(lo), U64(hi)):
        a = abs(x[i])
        largest = max(largest, a)
        smallest = min(smallest, a if a != 0 else math.inf)
        events += a != 0
        q[i] = (x[i] > 0) - (x[i] < 0)
    return largest, smallest, events


# Event-driven convolutions. An input spike adds one signed weight row (O currents) per kernel
# offset, so a layer whose input fires at rate r needs r of a dense convolution's multiply-adds, for
# its output and for its weight gradient (∂L/∂w is a sum over the input's spikes). A trained
# network fires at 1–5 % per step, where this beats the dense kernels; a fresh one on dense input
# fires more, and the dense path is taken (EVENT_DENSITY). The results are the same up to the
# order of summation; the input gradient is always the dense one (oneDNN). Spikes and currents are
# channels-last, and weights are laid out (KH, KW, C, O), so that a spike's rows are contiguous.

@_cpu_helper
def _target(i, k, pad, stride, size):
    """The output index that input index i reaches through kernel offset k, or -1."""
    t = i + pad - k
    if t < 0 or t % stride:
        return -1
    t //= stride
    return t if t < size else -1


@_cpu_helper
def _add_signed(acc, row, sign):
    """acc += row if sign > 0 else acc -= row (a branch per row, not a multiply per element)."""
    if sign > 0:
        for o in range(U64(acc.shape[0])):
            acc[o] += row[o]
    else:
        for o in range(U64(acc.shape[0])):
            acc[o] -= row[o]


@_cpu_helper
def _spread(images, rows, n, iy, ix, c, sign, stride, pad, into_images):
    """For each kernel offset (kh, kw) through which input (iy, ix) of image n reaches an output
    (oy, ox): images[n, oy, ox] ±= rows[kh, kw, c] if into_images, else rows[kh, kw, c] ±=
    images[n, oy, ox] (the output, and the weight gradient, of one spike)."""
    for kh in range(rows.shape[0]):
        oy = _target(iy, kh, pad, stride, images.shape[1])
        if oy < 0:
            continue
        for kw in range(rows.shape[1]):
            ox = _target(ix, kw, pad, stride, images.shape[2])
            if ox < 0:
                continue
            if into_images:
                _add_signed(images[n, oy, ox], rows[kh, kw, c], sign)
            else:
                _add_signed(rows[kh, kw, c], images[n, oy, ox], sign)


@_cpu_kernel
def _events_forward(lo, hi, q, w, out, stride, pad):
    """out[n] (OH, OW, O) = Σ over the events of q[n] (H, W, C) of ±w rows, images lo..hi."""
    for n in range(lo, hi):
        out[n] = 0
        for iy in range(q.shape[1]):
            for ix in range(q.shape[2]):
                for c in range(q.shape[3]):
                    if q[n, iy, ix, c] != 0:
                        _spread(out, w, n, iy, ix, c, q[n, iy, ix, c], stride, pad, True)


@_cpu_kernel
def _events_weight_grad(lo, hi, q, g, dw, stride, pad):
    """dw[:, :, c] (KH, KW, O) = Σ over the events of q (N, H, W, C) at channel c of ±g rows,
    channels lo..hi. g: ∂L/∂I as (N, OH, OW, O)."""
    for n in range(q.shape[0]):  # images outer: an image's gradient stays in cache over the channels
        for iy in range(q.shape[1]):
            for ix in range(q.shape[2]):
                for c in range(lo, hi):
                    if q[n, iy, ix, c] != 0:
                        _spread(g, dw, n, iy, ix, c, q[n, iy, ix, c], stride, pad, False)


# ----------------------------------------------------------------------------------------------
# Memory layout. On a CPU, convolutions run on channels-last tensors (N, H, W, C in memory): oneDNN
# ran LeNet's and VGG9's convolutions 1.1–3.6× faster so than NCHW ones (README, Performance).
# Their currents keep that layout, and so do the neurons fed by them and their spikes: the neuron
# and pooling loops walk memory order, whatever the layout, so no layer transposes a chunk.

CHANNELS_LAST = True  # tests switch it off to check, on a CPU, the NCHW layout GPUs run


def channels_last(x):
    """(N, C, H, W) in channels-last memory order. With C = 1 both orders are the same memory;
    only strides that say so make oneDNN return a channels-last output."""
    if x.shape[1] == 1 and x.is_contiguous():
        return x.view(x.shape[0], *x.shape[2:], 1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def _is_channels_last(x):
    """Whether (..., C, H, W) lies in memory as (..., H, W, C) (and not, ambiguously, also as is)."""
    return x.dim() >= 4 and not x.is_contiguous() and x.movedim(-3, -1).is_contiguous()


def _memory_order(x, channels_last):
    """x (..., C, H, W) with its dims in memory order: (..., H, W, C) if channels_last."""
    return x.movedim(-3, -1) if channels_last else x


def _logical_order(x, channels_last):
    return x.movedim(-1, -3) if channels_last else x


def _flat(x):
    """The elements of x in memory order, as a flat view (x contiguous or channels-last)."""
    return _memory_order(x, _is_channels_last(x)).view(-1)


def _images(x, channels_last):
    """(N, C, H, W) as a (M, H, W, C') view in memory order: (N, H, W, C) if channels-last, else
    (N·C, H, W, 1) — the pooling loops then serve both layouts."""
    if channels_last:
        return x.permute(0, 2, 3, 1)
    return x.view(-1, 1, *x.shape[2:]).permute(0, 2, 3, 1)


# ----------------------------------------------------------------------------------------------
# Synapses: a per-image layer applied to a (k, B, ...) spike chunk by folding time into the batch

# Input densities (spikes per input per step) below which a CPU convolution runs on events: its
# output, and its weight gradient. `python benchmarks/bench_events.py` on our 2-core machine put
# the crossovers against float32 oneDNN at about 9–15 % for the output and 5–15 % for the weight
# gradient (LeNet, VGG9 and ResNet11 layers); at 2 % events were 1.7–2.7× and 1.3–2.7× faster.
EVENT_DENSITY = dict(forward=0.08, weight_grad=0.05)


def _pack(spike_seq):
    """Spike chunks hold only 0 and ±s (s = 1, or the dropout scale 1/(1-p)): keep them in one
    byte plus the scalar s, and (on a CPU) count the events. Anything else (graded event data) is
    kept as it is, exactly. Returns (q, s or None, events or None); q has the layout of spike_seq."""
    if _use_cpu_kernels(spike_seq):
        if not (spike_seq.is_contiguous() or _is_channels_last(spike_seq)):
            spike_seq = spike_seq.contiguous()
        q = torch.empty_like(spike_seq, dtype=torch.int8)
        parts = _split(_pack_cpu, q.numel(), _flat(spike_seq).numpy(), _flat(q).numpy())
        largest, smallest = max(p[0] for p in parts), min(p[1] for p in parts)
        if largest in (0.0, smallest):
            return q, spike_seq.new_tensor(largest), sum(p[2] for p in parts)
        return spike_seq, None, None
    s = spike_seq.abs().amax()
    q = torch.sign(spike_seq).to(torch.int8)
    if torch.equal(q * s, spike_seq):
        return q, s, None
    return spike_seq, None, None


def _scaled(x, s):
    """x · s, skipping the pass for unit spikes (tested on a CPU only: no GPU sync)."""
    if s is None or (s.device.type == "cpu" and s.item() == 1.0):
        return x
    return x * s.to(x.dtype)


def _unpack(q, s, dtype):
    return _scaled(q.to(dtype), s)


def _event_layer(layer, weight):
    """A stride-1, square, ungrouped, undilated convolution on a CPU (ResNet's 1×1 stride-2
    shortcuts and Linear layers measured slower on events in a training step)."""
    return (_use_cpu_kernels(weight) and isinstance(layer, nn.Conv2d) and layer.stride == (1, 1)
            and layer.kernel_size[0] == layer.kernel_size[1] and layer.kernel_size[0] > 1
            and not isinstance(layer.padding, str) and layer.padding[0] == layer.padding[1]
            and layer.dilation == (1, 1) and layer.groups == 1)


_ROWS = torch.utils.weak.WeakIdKeyDictionary()  # weight -> (its version, its rows)


def _rows(weight):
    """The weight as (KH, KW, C, O). Cached while the weight is unchanged (its version counter),
    i.e. over all the chunks of a forward pass and its backward."""
    cached = _ROWS.get(weight)
    if cached is None or cached[0] != weight._version:
        cached = _ROWS[weight] = (weight._version, weight.detach().permute(2, 3, 1, 0).contiguous())
    return cached[1]


def _event_current(layer, q, s, weight):
    """layer(q · s) on events. q: (..., C, H, W) int8 spikes; returns (N, O, OH, OW), channels-last."""
    x, rows, stride, pad = channels_last(q.flatten(0, -4)), _rows(weight), layer.stride[0], layer.padding[0]
    size = [(n + 2 * pad - rows.shape[0]) // stride + 1 for n in x.shape[2:]]
    out = torch.empty(x.shape[0], weight.shape[0], *size, dtype=weight.dtype, memory_format=torch.channels_last)
    _split(_events_forward, x.shape[0], x.permute(0, 2, 3, 1).numpy(), rows.numpy(), out.permute(0, 2, 3, 1).numpy(),
           stride, pad, grain=8)
    return _scaled(out, s)


def _event_weight_grad(layer, q, s, weight, grad_current):
    """∂L/∂w on events: q (..., C, H, W) int8 spikes, grad_current (..., O, OH, OW) = ∂L/∂I."""
    x = channels_last(q.flatten(0, -4)).permute(0, 2, 3, 1)
    g = channels_last(grad_current.flatten(0, -4).to(weight.dtype)).permute(0, 2, 3, 1)  # (N, OH, OW, O)
    o, c, kh, kw = weight.shape
    rows = weight.new_zeros(kh, kw, c, o)
    _split(_events_weight_grad, c, x.numpy(), g.numpy(), rows.numpy(), layer.stride[0], layer.padding[0], grain=1)
    return _scaled(rows.permute(3, 2, 0, 1).contiguous(), s)


def _current(layer, spike_seq, weight, pack=True):
    """I = layer(s) over a chunk (k, B, ...), on events where the input is sparse spikes on a CPU.
    Also returns the packed input (q, s) of the k·B images for backward, and its density (None
    unless counted)."""
    x = spike_seq.flatten(0, 1)
    if isinstance(layer, nn.Conv2d) and x.device.type == "cpu" and CHANNELS_LAST:
        x = channels_last(x)
    q = s = density = None
    on_events = _event_layer(layer, weight)
    if pack or on_events:
        q, s, events = _pack(x)
        if events is not None and on_events:
            # under bf16 autocast the dense kernels run ~1.8× faster: halve the crossovers
            density = events / max(q.numel(), 1) * (2 if torch.is_autocast_enabled("cpu") else 1)
    if density is not None and density < EVENT_DENSITY["forward"]:
        current = _event_current(layer, q, s, weight)
    else:
        current = _per_image(layer, x, weight)
    return current.unflatten(0, spike_seq.shape[:2]), q, s, density


class _Synapse(torch.autograd.Function):
    """I = layer(s) for a Conv2d or Linear without bias, over a chunk of time steps.

    autograd's own conv/linear would save the float input; here it is saved in one byte."""

    @staticmethod
    def forward(ctx, spike_seq, weight, layer):
        current, q, s, density = _current(layer, spike_seq, weight)
        ctx.save_for_backward(q, weight)
        ctx.scale, ctx.layer, ctx.chunk = s, layer, spike_seq.shape[:2]
        ctx.events = density is not None and density < EVENT_DENSITY["weight_grad"]
        ctx.in_dtype = spike_seq.dtype
        # the dtype of the dense kernels, also when this forward ran on events: bf16 under autocast
        ctx.compute_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") and \
            current.device.type == "cpu" else current.dtype
        return current

    @staticmethod
    def backward(ctx, grad_current):
        q, weight = ctx.saved_tensors
        dtype, layer = ctx.compute_dtype, ctx.layer
        need_x, need_w = ctx.needs_input_grad[:2]
        dense_w = need_w and not ctx.events
        grad_x = grad_w = None
        if need_x or dense_w:
            g = grad_current.flatten(0, 1).to(dtype)
            w = weight.to(dtype)
            x = _unpack(q, ctx.scale, dtype) if dense_w else None
            if isinstance(layer, nn.Conv2d):
                if _is_channels_last(g):  # the kernels follow the input's or the weight's layout
                    w = w.contiguous(memory_format=torch.channels_last)
                grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
                    g, x if dense_w else torch.empty((), dtype=dtype).expand(q.shape),  # shape only
                    w, None, layer.stride, layer.padding, layer.dilation, False, [0, 0], layer.groups,
                    [need_x, dense_w, False])
            else:
                grad_x = g @ w if need_x else None
                grad_w = g.t() @ x if dense_w else None
        if need_w and ctx.events:
            grad_w = _event_weight_grad(layer, q, ctx.scale, weight, grad_current)
        if grad_x is not None:
            grad_x = grad_x.unflatten(0, ctx.chunk).to(ctx.in_dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
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


def _maps(x):
    """Images (M, H, W, C) per thread: as many pixels as _split's elementwise loops take."""
    return max(1, 32768 // (x.shape[1] * x.shape[2] * x.shape[3]))


def _pool_images(kernel, x, out_size, channels_last):
    """Runs a 2×2 pooling loop from x (N, C, H, W) to a new (N, C, *out_size), both in one layout."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(*x.shape[:2], *out_size, dtype=x.dtype, memory_format=layout)
    x, o = _images(x, channels_last), _images(out, channels_last)
    _split(kernel, x.shape[0], x.numpy(), o.numpy(), grain=_maps(x if x.shape[1] > o.shape[1] else o))
    return out


class _AvgPool2x2(torch.autograd.Function):
    """2×2 average pooling of a (k, B, C, H, W) chunk, in its layout. Backward needs no saved
    input (the gradient is 1/4 everywhere), whereas autograd's avg_pool2d would keep the spikes."""

    @staticmethod
    def forward(ctx, spike_seq):
        x = spike_seq.flatten(0, 1)                                     # (k·B, C, H, W)
        if _use_cpu_kernels(x):
            cl = _is_channels_last(x)
            out = _pool_images(_pool_cpu, x if cl else x.contiguous(), (x.shape[2] // 2, x.shape[3] // 2), cl)
        else:
            out = F.avg_pool2d(x, 2)
        return out.unflatten(0, spike_seq.shape[:2])

    @staticmethod
    def backward(ctx, grad):
        g = grad.flatten(0, 1)
        if _use_cpu_kernels(g):
            cl = _is_channels_last(g)
            out = _pool_images(_unpool_cpu, g if cl else g.contiguous(), (2 * g.shape[2], 2 * g.shape[3]), cl)
        else:
            out = (g * 0.25).repeat_interleave(2, -1).repeat_interleave(2, -2)
        return out.unflatten(0, grad.shape[:2])


# ----------------------------------------------------------------------------------------------
# Neurons

def _fire(current_seq, u, window, v_th, leak, leaky_sum, record):
    """Steps 2–5 over a chunk (k, B, ...). Returns the spikes as floats for the next layer and the
    new membrane (B, ...), both in the membrane's layout, and, if record, the spikes backward
    needs: on a CPU as bits in window.record (None is returned), else as bool (k, N). Under bf16
    autocast the float spikes are bf16 on a GPU, but stay float32 on a CPU, where the compiled
    pooling and packing loops read them (numba has no bf16); a convolution casts them exactly."""
    k, cl = current_seq.shape[0], _is_channels_last(u)
    shape = _memory_order(u, cl).shape
    current = _memory_order(current_seq, cl).reshape(k, -1).to(u.dtype)  # bf16 currents: fp32 membranes
    u = _memory_order(u, cl).reshape(-1).clone()
    lf, n, t0, fired = _flat(window.lf), _flat(window.n), window.steps, None
    if _use_cpu_kernels(u):
        out = torch.empty(current.shape, dtype=u.dtype)
        bits = window.record_until(t0 + k) if record else torch.empty(0, 0, dtype=torch.uint8)
        _split(_fire_cpu, u.numel(), current.contiguous().numpy(), u.numpy(), out.numpy(), lf.numpy(),
               n.numpy(), v_th, leak, leaky_sum, bits.numpy(), t0)
    else:
        fired = torch.empty(current.shape, dtype=torch.bool, device=u.device)
        for t in range(k):
            u += current[t]                      # step 2: integrate
            torch.gt(u, v_th, out=fired[t])      # step 3: fire, strictly above threshold
            u.masked_fill_(fired[t], 0.0)        # step 4: hard reset
            u *= leak                            # step 5: leak
            n.add_(fired[t])
            if leaky_sum:
                lf.mul_(leak).add_(fired[t])
        out = fired.to(current_seq.dtype)
        fired = fired if record else None
    window.steps += k
    return fired, _logical_order(out.view(k, *shape), cl), _logical_order(u.view(shape), cl)


def _backprop(grad_spikes, fired, window, t0, slope, grad_u):
    """The backward recursion over the chunk of steps t0, t0+1, ...; returns ∂L/∂I (k, B, ...) and
    gU' at its first step, in the layout of the spikes. fired: the chunk's bool spikes, or None
    when they are bits in window.record."""
    k, cl = grad_spikes.shape[0], _is_channels_last(window.n)
    shape = _memory_order(window.n, cl).shape
    g = _memory_order(grad_spikes, cl).reshape(k, -1).to(slope.dtype)
    carry = torch.zeros_like(slope) if grad_u is None else \
        _memory_order(grad_u, cl).reshape(-1).to(slope.dtype, copy=True)
    grad_current = torch.empty(g.shape, dtype=slope.dtype, device=g.device)
    if fired is None:
        _split(_backprop_cpu, carry.numel(), g.contiguous().numpy(), window.record.numpy(), t0, slope.numpy(),
               carry.numpy(), grad_current.numpy())
    else:
        g = g * slope
        for t in range(k - 1, -1, -1):
            carry = torch.where(fired[t], g[t], carry, out=grad_current[t])
    return _logical_order(grad_current.view(k, *shape), cl), _logical_order(carry.view(shape), cl)


def leak_correction(lf, n, leak):
    """G = 1[LF > 1e-3] + ln(λ)·LF/N' (SPEC §2): ≤ 1, and 0 for a neuron that never fired."""
    n = n + (n < 1e-3).to(n.dtype)
    return (lf > 1e-3).to(lf.dtype) + math.log(leak) * lf / n


class _Window:
    """Per-neuron statistics of one forward pass over the T-step window: the spike count N and
    the leaky spike sum LF, from which backward derives ∂o_t/∂U'_t at firing steps; on a CPU
    also the record of the spikes, one bit per neuron and step (T/8 bytes per neuron)."""

    def __init__(self):
        self.lf = self.n = self.record = self._slope = None
        self.steps = 0

    def start(self, like):
        self.lf, self.n = torch.zeros_like(like), torch.zeros_like(like)
        self.record = torch.zeros(0, like.numel(), dtype=torch.uint8)

    def record_until(self, steps):
        """The record, (planes, N) uint8 in memory order, with room for `steps` steps (grown by
        doubling, for a window whose length is not known in advance)."""
        planes = (steps + 7) // 8
        if planes > self.record.shape[0]:
            grown = torch.zeros(max(planes, 2 * self.record.shape[0]), self.n.numel(), dtype=torch.uint8)
            grown[:self.record.shape[0]] = self.record
            self.record = grown
        return self.record

    def slope(self, leak, v_th, leak_corrected):
        """G / V_th for LIF layers, 1 for pooling neurons; flat (N,). Complete only after the
        last chunk, so backward computes it (once per window)."""
        if self._slope is None:
            if leak_corrected:
                self._slope = _flat(leak_correction(self.lf, self.n, leak) / v_th)
            else:
                self._slope = _flat(torch.ones_like(self.n))
        return self._slope

    def G(self, leak):
        return leak_correction(self.lf, self.n, leak)


class _Neuron(torch.autograd.Function):
    """Steps 2–5 over a chunk of k time steps; the membrane is carried between chunks, and its
    gradient gU' flows back across the chunk boundary."""

    @staticmethod
    def forward(ctx, current_seq, u, window, v_th, leak, leak_corrected):
        ctx.t0 = window.steps
        fired, spikes, u = _fire(current_seq, u, window, v_th, leak, leak_corrected, record=True)
        ctx.save_for_backward(fired)
        ctx.window, ctx.v_th, ctx.leak, ctx.leak_corrected = window, v_th, leak, leak_corrected
        return spikes, u

    @staticmethod
    def backward(ctx, grad_spikes, grad_u):
        fired, = ctx.saved_tensors
        # ∂o_t/∂U'_t = (G / V_th) · 1[o_t = 1]. A silent step passes gU'_{t+1} on unchanged: the
        # leak is identity in backward (the paper's choice, not a bug); a firing step's reset
        # blocks the path from later steps.
        slope = ctx.window.slope(ctx.leak, ctx.v_th, ctx.leak_corrected)
        grad_current, grad_u = _backprop(grad_spikes, fired, ctx.window, ctx.t0, slope, grad_u)
        return grad_current, grad_u, None, None, None, None


def _check_leak(leak):
    if not 0.0 < leak <= 1.0:
        raise ValueError(f"leak must lie in (0, 1], got {leak}")
    return leak


class SpikingNeurons(nn.Module):
    """A layer of neurons with state over one forward pass (membrane, spike counts, LF).

    Subclasses decide what the current is; `fire` runs the neuron over a chunk."""
    v_th = 1.0
    leak = 1.0
    leak_corrected = False

    def reset(self):
        self.u = None
        self.window = _Window()

    @property
    def spike_count(self):
        """Spikes per neuron, (B, ...), over the steps run so far in this forward pass."""
        return self.window.n

    def fire(self, current_seq):
        if self.u is None:  # the membrane is kept in at least float32, also under bf16 autocast
            dtype = torch.float64 if current_seq.dtype == torch.float64 else torch.float32
            cl = current_seq.dim() == 5 and _is_channels_last(current_seq[0])  # the layer keeps its input's layout
            self.u = torch.zeros_like(current_seq[0], dtype=dtype,
                                      memory_format=torch.channels_last if cl else torch.contiguous_format)
            self.window.start(self.u)
        if torch.is_grad_enabled() and current_seq.requires_grad:
            spikes, self.u = _Neuron.apply(current_seq, self.u, self.window, self.v_th, self.leak,
                                           self.leak_corrected)
        else:
            _, spikes, self.u = _fire(current_seq, self.u, self.window, self.v_th, self.leak, False, record=False)
        return spikes


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


class PoolIF(IF):
    """2×2 average pooling, then IF neurons."""

    def forward(self, spike_seq):  # (k, B, C, H, W) -> (k, B, C, H/2, W/2)
        return self.fire(_AvgPool2x2.apply(spike_seq))


class _SpikingLayer(SpikingNeurons):
    """A weight layer followed by leaky integrate-and-fire neurons and time-fixed dropout.

    The dropout mask is drawn once per forward pass and shared by all T steps: a fresh mask every
    step would average out over the window (SPEC §1)."""
    leak_corrected = True

    def _setup_neurons(self, leak, v_th, dropout):
        _check_leak(leak)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.leak, self.v_th, self.dropout = leak, v_th, dropout
        self.reset()

    def reset(self):
        super().reset()
        self.mask = None

    def forward(self, spike_seq, extra_current=None):
        current_seq = synapse(self, spike_seq)
        if extra_current is not None:  # ResNet: the shortcut current joins the second conv's membrane
            current_seq = current_seq + extra_current
        spikes = self.fire(current_seq)
        if self.training and self.dropout > 0:
            if self.mask is None:
                keep = torch.full_like(spikes[0], 1.0 - self.dropout)
                self.mask = torch.bernoulli(keep) / (1.0 - self.dropout)
            spikes = spikes * self.mask
        return spikes

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
    """U = λ(U + I_t) over a chunk. The leak is identity in backward (SPEC §2), so every step's
    current receives the gradient of the final membrane."""

    @staticmethod
    def forward(ctx, current_seq, u, leak):
        ctx.k = current_seq.shape[0]
        return _leaky_sum(current_seq, u, leak)

    @staticmethod
    def backward(ctx, grad_u):
        return grad_u.expand(ctx.k, *grad_u.shape), grad_u, None


def _leaky_sum(current_seq, u, leak):
    u = u.clone()
    for t in range(current_seq.shape[0]):
        u += current_seq[t]
        u *= leak
    return u


# ----------------------------------------------------------------------------------------------
# Networks

def init_weights(model, gain):
    """Faithful init (SPEC §3): weights ~ N(0, sqrt(gain / fan_in)); gain 2 for LeNet and VGG9,
    1 for the ResNets."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, 0.0, math.sqrt(gain / fan_in))


def default_time_chunk(batch_size, time_steps, device, images=256):
    """k time steps per call: all of them on a GPU; on a CPU about `images` images per convolution
    call (LeNet's convolutions ran fastest at 64–256, PERF-NOTES)."""
    if device.type == "cuda":
        return time_steps
    return max(1, min(time_steps, images // max(batch_size, 1)))


class SpikingNetwork(nn.Module):
    """Runs `step` chunk by chunk over the T-step window and integrates the output layer.

    Subclasses define the layers and `step(x)`: input spikes (k, B, ...) -> output currents
    (k, B, classes). `model(x)` takes images (B, C, H, W), Poisson-encoded here, or a ready spike
    train (T, B, C, H, W) (event data, exact tests), and returns U_out(T) / V_th / T."""
    input_scale = 1.0
    images_per_call = 256  # on a CPU, see default_time_chunk

    def __init__(self, time_steps=100, leak=0.99):
        super().__init__()
        if time_steps < 1:
            raise ValueError(f"time_steps must be ≥ 1, got {time_steps}")
        _check_leak(leak)
        self.time_steps, self.leak = time_steps, leak
        self.v_th = 1.0
        self.time_chunk = None  # None: default_time_chunk

    def encode(self, images, generator=None):
        return poisson_encode(images, self.time_steps, self.input_scale, generator)

    def forward(self, x, readout_steps=()):
        """readout_steps: also return the readout after each of these step counts (latency sweep);
        then the result is (len(readout_steps) + 1, B, classes), the full window last."""
        spike_seq = self.encode(x) if x.dim() == 4 else x
        T, B = spike_seq.shape[:2]
        for m in self.modules():
            if isinstance(m, SpikingNeurons):
                m.reset()
        k = self.time_chunk or default_time_chunk(B, T, spike_seq.device, self.images_per_call)
        u, t, readouts = None, 0, []
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
        out = u / self.v_th / T
        return torch.stack(readouts + [out.detach()]) if readout_steps else out

    def step(self, spike_seq):
        raise NotImplementedError

    def neuron_layers(self):
        """(name, module) of every spiking and pooling neuron layer, in network order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, SpikingNeurons)]

    def firing_rates(self):
        """Mean spikes per neuron per time step of each neuron layer in the last forward pass
        (one device-to-host copy for all layers: the health monitor reads it every batch)."""
        layers = [(n, m) for n, m in self.neuron_layers() if m.spike_count is not None]
        if not layers:
            return {}
        rates = torch.stack([m.spike_count.sum().double() / (m.spike_count.numel() * m.window.steps)
                             for _, m in layers]).tolist()
        return dict(zip((n for n, _ in layers), rates))

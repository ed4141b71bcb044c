"""The recursions as compiled loops for CPU tensors (numba), and event-driven synapses.

One pass over a chunk instead of several tensor operations per time step; the loops of one call
run on torch's CPU threads, each over its own range of neurons (or images, or channels). The
arithmetic is that of tensor_ops.py, operation for operation, so spikes and gradients are the same
bits. float32 and float64 run compiled; other dtypes (bf16 spikes of a user's own code) run as
tensor operations. Convolutions run channels-last (layout.py), and the loops walk memory order.
"""
import concurrent.futures
import functools

import numpy as np
import torch

from . import numba_events, tensor_ops
from .numba_events import U64, _inlined, _kernel
from .layout import channels_last as to_channels_last, flat, is_channels_last

name = "numba"
channels_last = True  # oneDNN's convolutions are fastest so on a CPU (docs/performance.md)
events = True         # event-driven synapses: event_eligible, event_current, event_*_grad


def runs_on(t):
    return t.device.type == "cpu"


def _compiled(t):
    return t.dtype in (torch.float32, torch.float64)


BLOCK = 65536       # neurons per block: their state stays in L2 cache over a chunk's steps, in long streaming runs


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


# ----------------------------------------------------------------------------------------------
# Neurons

@_kernel
def _fire_cpu(lo, hi, current, u, out, lf, n, v_th, leak, record, t0, mask):
    """Steps 2–5 for k steps of neurons lo..hi, N ← N + o_t, LF ← λ·LF + o_t if there is an lf;
    spike o_s (s = t0 + t) goes to bit s % 8 of record[s // 8] if there is a record, out[t] = o_t
    (times mask[i] if there is a mask). lf, record and mask may be None: numba then compiles a
    kernel without them. V_th and λ come in the membrane's dtype: the kernel then runs in it."""
    zero = u.dtype.type(0)
    for b in range(lo, hi, BLOCK):  # a block's membranes stay in cache over the k steps
        for t in range(current.shape[0]):
            plane, bit = (t0 + t) >> 3, (t0 + t) & 7
            for i in range(U64(b), U64(min(b + BLOCK, hi))):
                v = u[i] + current[t, i]             # step 2: integrate
                o = v > v_th                         # step 3: fire, strictly above threshold
                if mask is None:
                    out[t, i] = o
                else:
                    out[t, i] = mask[i] if o else zero
                u[i] = (zero if o else v) * leak     # steps 4–5: hard reset, leak
                n[i] += o
                if lf is not None:
                    lf[i] = lf[i] * leak + o
                if record is not None:
                    record[plane, i] |= o << bit


@_kernel
def _backprop_cpu(lo, hi, grad_spikes, record, t0, slope, carry, grad_current):
    """gU'_t = slope · o_t · g_t + (1 − o_t) · gU'_{t+1}, backwards over k steps."""
    for b in range(lo, hi, BLOCK):
        for t in range(grad_spikes.shape[0] - 1, -1, -1):
            plane, bit = (t0 + t) >> 3, (t0 + t) & 7
            for i in range(U64(b), U64(min(b + BLOCK, hi))):
                c = grad_spikes[t, i] * slope[i] if (record[plane, i] >> bit) & 1 else carry[i]
                grad_current[t, i] = c
                carry[i] = c


@_kernel
def _leaky_sum_cpu(lo, hi, current, u, leak):
    """U ← λ(U + I_t) over k steps, for outputs lo..hi."""
    for i in range(lo, hi):
        v = u[i]
        for t in range(current.shape[0]):
            v = (v + current[t, i]) * leak
        u[i] = v


def fire(current, u, lf, n, record, t0, v_th, leak, leaky_sum, mask):
    """tensor_ops.fire, compiled; the spikes are in the membrane's dtype (numba has no bf16)."""
    current = current.to(u.dtype).contiguous()
    out = torch.empty(current.shape, dtype=u.dtype)
    _split(_fire_cpu, u.numel(), current.numpy(), u.numpy(), out.numpy(), lf.numpy() if leaky_sum else None,
           n.numpy(), _as(u, v_th), _as(u, leak), None if record is None else record.numpy(), t0,
           None if mask is None else mask.to(u.dtype).numpy())
    return out


def backprop(grad_spikes, record, t0, slope, carry):
    """tensor_ops.backprop, compiled; carry is updated in place."""
    grad_spikes = grad_spikes.to(slope.dtype).contiguous()
    grad_current = torch.empty(grad_spikes.shape, dtype=slope.dtype)
    _split(_backprop_cpu, carry.numel(), grad_spikes.numpy(), record.numpy(), t0, slope.numpy(), carry.numpy(),
           grad_current.numpy())
    return grad_current, carry


def leaky_sum(current, u, leak):
    """tensor_ops.leaky_sum, compiled."""
    if not _compiled(u):
        return tensor_ops.leaky_sum(current, u, leak)
    u = u.clone()
    _split(_leaky_sum_cpu, u.numel(), current.to(u.dtype).contiguous().numpy(), u.numpy(), _as(u, leak))
    return u


def _as(u, value):
    """A kernel constant (V_th, λ, the pooling's 1/4) in u's dtype, as the tensor operations use
    them: a float64 λ would make every float32 leak step λ·U round differently (and, over many
    steps, flip spikes), and a float64 V_th that float32 cannot hold (0.3) would let
    U = float32(0.3) fire."""
    return u.numpy().dtype.type(value)


# ----------------------------------------------------------------------------------------------
# 2×2 pooling, on images (M, H, W, C) in memory order: (N, H, W, C) channels-last, else (N·C, H, W, 1)

@_kernel
def _pool_cpu(lo, hi, x, out, quarter, channels):
    """out (M, h·w·C) = 2×2 average of x (1, M, H, W·C), h = ⌊H/2⌋, w = ⌊W/2⌋, images lo..hi
    (_pool_step)."""
    pairs = np.empty(x.shape[3] - channels, dtype=x.dtype)
    for m in range(lo, hi):
        _pool_step(x, 0, m, out[m], quarter, channels, pairs)


@_kernel
def _unpool_cpu(lo, hi, g, out, quarter, channels):
    """The gradient of 2×2 average pooling: out (1, M, H, W·C) gets 1/4 of g (M, h·w·C) at each
    of an output's inputs, images lo..hi (_unpool_step)."""
    for m in range(lo, hi):
        _unpool_step(g[m], 0, m, out, quarter, channels)


def _images(x, channels_last):
    """(N, C, H, W) as a (M, H, W, C') view in memory order: (N, H, W, C) if channels-last, else
    (N·C, H, W, 1); the pooling loops then serve both layouts."""
    if channels_last:
        return x.permute(0, 2, 3, 1)
    return x.view(-1, 1, *x.shape[2:]).permute(0, 2, 3, 1)


def _rows(images):
    """Images (..., H, W, C) in memory order as rows (..., H, W·C), a view."""
    return images.view(*images.shape[:-2], -1)


def _maps(x):
    """Images (M, H, W, C) per thread: as many pixels as _split's elementwise loops take."""
    return max(1, 32768 // (x.shape[1] * x.shape[2] * x.shape[3]))


def _pool_images(x, out_size, pooling):
    """Runs 2×2 pooling (or, not pooling, its gradient) from x (N, C, H, W) to a new
    (N, C, *out_size), both in x's layout, with the loops of the fused pooling neurons."""
    cl = is_channels_last(x)
    x = x if cl else x.contiguous()
    out = torch.empty(*x.shape[:2], *out_size, dtype=x.dtype,
                      memory_format=torch.channels_last if cl else torch.contiguous_format)
    x, o = _images(x, cl), _images(out, cl)
    kernel, fine, coarse = (_pool_cpu, x, o) if pooling else (_unpool_cpu, o, x)
    rows = _rows(fine[None])
    args = (rows, coarse.reshape(coarse.shape[0], -1)) if pooling else (coarse.reshape(coarse.shape[0], -1), rows)
    _split(kernel, x.shape[0], *(a.numpy() for a in args), _as(x, 0.25), fine.shape[3],
           grain=_maps(fine))
    return out


def pool2x2(x):
    if not _compiled(x):
        return tensor_ops.pool2x2(x)
    return _pool_images(x, (x.shape[2] // 2, x.shape[3] // 2), True)


def unpool2x2(g, size):
    if not _compiled(g):
        return tensor_ops.unpool2x2(g, size)
    return _pool_images(g, tuple(size), False)


# ----------------------------------------------------------------------------------------------
# 2×2 pooling fused into the pooling neurons: one pass each way instead of pool + fire and
# backprop + unpool, with the arithmetic of those (the same spikes and gradients, bit for bit)

@_inlined
def _pool_step(x, t, m, current, quarter, channels, pairs):
    """current (h·w·C) = 2×2 average of x[t, m] (H, W·C), h = ⌊H/2⌋, w = ⌊W/2⌋ (an odd last row or
    column dropped, as F.avg_pool2d does), summed in F.avg_pool2d's order: an input, its right
    neighbour, then the two below. Along a row pair every input is summed with its neighbours into
    pairs (C less than a row), one long loop that vectorizes, of which the even inputs' sums are
    kept (all unsigned: int64 with uint64 would be float64 indices)."""
    c_, row, two = U64(channels), U64(x.shape[3]), U64(2)
    h, w = U64(x.shape[2]) // two, row // (two * c_)
    for y in range(h):
        top, bottom = x[t, m, two * y], x[t, m, two * y + U64(1)]
        for j in range(row - c_):
            pairs[j] = top[j] + top[j + c_] + bottom[j] + bottom[j + c_]
        for xx in range(w):
            a, b = (y * w + xx) * c_, two * xx * c_
            for c in range(c_):
                current[a + c] = pairs[b + c] * quarter


@_inlined
def _unpool_step(g, t, m, grad_x, quarter, channels):
    """grad_x[t, m] (H, W·C) = 1/4 of g (h·w·C) at each of its 2×2 inputs: the upper row input
    by input, the lower row a copy of it; 0 on an odd last row or column (the pooling drops them)."""
    c_, row, two = U64(channels), U64(grad_x.shape[3]), U64(2)
    h, w = U64(grad_x.shape[2]) // two, row // (two * c_)
    for y in range(h):
        top, bottom = grad_x[t, m, two * y], grad_x[t, m, two * y + U64(1)]
        for xx in range(w):
            a, b = (y * w + xx) * c_, two * xx * c_
            for c in range(c_):
                q = g[a + c] * quarter
                top[b + c] = q
                top[b + c_ + c] = q
        for j in range(two * w * c_, row):
            top[j] = 0
        for j in range(row):
            bottom[j] = top[j]
    if U64(grad_x.shape[2]) > two * h:
        last = grad_x[t, m, two * h]
        for j in range(row):
            last[j] = 0


@_kernel
def _pool_fire_cpu(lo, hi, x, u, out, n, record, t0, v_th, leak, quarter, channels):
    """The pooled neurons of images lo..hi, (M, h·w·C) flat in u, n, out[t] and record: each step's
    current, the 2×2 average of x[t] (k, M, H, W·C), h = ⌊H/2⌋, w = ⌊W/2⌋, is computed into a
    cached buffer, then steps 2–5 run on it as in _fire_cpu (record may be None)."""
    size = u.shape[0] // x.shape[1]
    current, zero = np.empty(size, dtype=x.dtype), u.dtype.type(0)
    pairs = np.empty(x.shape[3] - channels, dtype=x.dtype)
    for m in range(lo, hi):
        for t in range(x.shape[0]):
            _pool_step(x, t, m, current, quarter, channels, pairs)
            plane, bit = (t0 + t) >> 3, (t0 + t) & 7
            base = U64(m * size)
            for i in range(base, base + U64(size)):
                v = u[i] + current[i - base]
                o = v > v_th
                out[t, i] = o
                u[i] = (zero if o else v) * leak
                n[i] += o
                if record is not None:
                    record[plane, i] |= o << bit


@_kernel
def _backprop_unpool_cpu(lo, hi, grad_spikes, record, t0, slope, carry, grad_x, quarter, channels):
    """_backprop_cpu for the pooled neurons of images lo..hi into a cached buffer per step, which
    then goes as 1/4 to each of the step's 2×2 inputs in grad_x (k, M, H, W·C)."""
    size = carry.shape[0] // grad_x.shape[1]
    g = np.empty(size, dtype=carry.dtype)
    for m in range(lo, hi):
        for t in range(grad_spikes.shape[0] - 1, -1, -1):
            plane, bit = (t0 + t) >> 3, (t0 + t) & 7
            base = U64(m * size)
            for i in range(base, base + U64(size)):
                c = grad_spikes[t, i] * slope[i] if (record[plane, i] >> bit) & 1 else carry[i]
                g[i - base] = c
                carry[i] = c
            _unpool_step(g, t, m, grad_x, quarter, channels)


def fuses_pooling(x):
    """Whether pool_fire and backprop_unpool serve spikes x (k, B, C, H, W): compiled dtypes."""
    return _compiled(x)


def _step_images(x, cl):
    """x (k, B, C, H, W) in the layout cl as (k, M, H, W, C') in memory order (see _images)."""
    k = x.shape[0]
    x = x.flatten(0, 1)
    x = to_channels_last(x) if cl else x.contiguous()
    return _images(x, cl).unflatten(0, (k, -1))


def pool_fire(x, u, n, record, t0, v_th, leak):
    """IF neurons u (B, C, ⌊H/2⌋, ⌊W/2⌋) on the 2×2 average pooling of spikes x (k, B, C, H, W), in
    one pass: returns the spikes (k, B, C, ⌊H/2⌋, ⌊W/2⌋) in u's layout; u, n and record are updated in
    place (as fire with no leaky sum and no mask)."""
    cl = is_channels_last(u)
    images = _step_images(x, cl)
    shape = (x.shape[0], *(u.permute(0, 2, 3, 1) if cl else u).shape)
    out = torch.empty(x.shape[0], u.numel(), dtype=u.dtype)
    _split(_pool_fire_cpu, images.shape[1], _rows(images).numpy(), flat(u).numpy(), out.numpy(), flat(n).numpy(),
           None if record is None else record.numpy(), t0, _as(u, v_th), _as(u, leak),
           _as(images, 0.25), images.shape[4], grain=_maps(images[0]))
    out = out.view(shape)
    return out.permute(0, 1, 4, 2, 3) if cl else out


def backprop_unpool(grad_spikes, record, t0, slope, carry, shape, cl):
    """backprop for pooling neurons (grad_spikes (k, N) in their memory order) and the gradient of
    their 2×2 pooling, in one pass: returns ∂L/∂x (k, B, C, H, W) = `shape` for the spikes x of
    pool_fire, channels-last if cl (the membranes' layout); carry (N,) is updated in place."""
    k = grad_spikes.shape[0]
    grad_x = torch.empty(k * shape[1], *shape[2:], dtype=slope.dtype,
                         memory_format=torch.channels_last if cl else torch.contiguous_format)
    images = _images(grad_x, cl).unflatten(0, (k, -1))
    _split(_backprop_unpool_cpu, images.shape[1], grad_spikes.to(slope.dtype).contiguous().numpy(), record.numpy(),
           t0, slope.numpy(), carry.numpy(), _rows(images).numpy(), _as(images, 0.25), images.shape[4],
           grain=_maps(images[0]))
    return grad_x.unflatten(0, (k, shape[1]))


# ----------------------------------------------------------------------------------------------
# Spike packing

# On the bits of the floats: |x| is the bits without the sign, ordered as the magnitudes are (NaN
# above infinity), so the extremes are integer max/min reductions, which vectorize.
_BITS = {torch.float32: (np.uint32, np.uint32(0x7FFFFFFF), np.uint32(31), np.float32, 0x7F800000),
         torch.float64: (np.uint64, np.uint64(0x7FFFFFFFFFFFFFFF), np.uint64(63), np.float64, 0x7FF0000000000000)}


@_kernel
def _pack_cpu(lo, hi, bits, q, magnitude, sign):
    """q = sign(x) as int8 for the float bits of x; returns the largest and the smallest nonzero |x|
    (as bits; the smallest is the magnitude mask if there is none) and how many are nonzero. All in
    uint64: numba would turn mixed signed and unsigned integers into floats."""
    largest, smallest, events, magnitude, sign = U64(0), U64(magnitude), U64(0), U64(magnitude), U64(sign)
    for i in range(U64(lo), U64(hi)):
        b = U64(bits[i])
        a = b & magnitude
        nonzero = U64(a != 0)
        largest = max(largest, a)
        smallest = min(smallest, a if nonzero else magnitude)
        events += nonzero
        q[i] = np.int8(nonzero) - np.int8(2 * ((b >> sign) & nonzero))
    return largest, smallest, events


@_kernel
def _magnitudes_cpu(lo, hi, bits, magnitude):
    """_pack_cpu's largest and smallest nonzero |x|, without q."""
    largest, smallest, magnitude = U64(0), U64(magnitude), U64(magnitude)
    for i in range(U64(lo), U64(hi)):
        a = U64(bits[i]) & magnitude
        largest = max(largest, a)
        smallest = min(smallest, a if a != 0 else magnitude)
    return largest, smallest


def _float_bits(x):
    """x (float32/64, contiguous or channels-last) as its flat bits, and the masks for _pack_cpu."""
    unsigned, magnitude, sign = _BITS[x.dtype][:3]
    return flat(x.detach()).numpy().view(unsigned), magnitude, sign


def _spike_value(parts, dtype):
    """From the parts' (largest, smallest nonzero) |x| bits: the spike value s as a float, 0.0 for no
    spikes, or None if x is not 0 and ±s (two magnitudes, NaN or infinity)."""
    unsigned, _, _, real, infinity = _BITS[dtype]
    largest, smallest = max(int(p[0]) for p in parts), min(int(p[1]) for p in parts)
    if largest == 0:
        return 0.0
    if largest != smallest or largest >= infinity:
        return None
    return float(np.array(largest, unsigned).view(real))


def is_spike_train(x):
    """tensor_ops.is_spike_train in one pass, without temporaries."""
    if not _compiled(x) or x.numel() == 0:
        return tensor_ops.is_spike_train(x)
    if not (x.is_contiguous() or is_channels_last(x)):
        x = x.contiguous()
    bits, magnitude, _ = _float_bits(x)
    return _spike_value(_split(_magnitudes_cpu, bits.shape[0], bits, magnitude), x.dtype) is not None


def pack(x, check=True):
    """tensor_ops.pack in one pass, always checked (the pass sees every value anyway); also returns
    the number of events (nonzero inputs), which decides whether a layer runs on events."""
    if not _compiled(x) or x.numel() == 0:
        return tensor_ops.pack(x, check)
    if not (x.is_contiguous() or is_channels_last(x)):
        x = x.contiguous()
    bits, magnitude, sign = _float_bits(x)
    q = torch.empty_like(x, dtype=torch.int8)
    parts = _split(_pack_cpu, bits.shape[0], bits, flat(q).numpy(), magnitude, sign)
    s = _spike_value(parts, x.dtype)
    if s is None:
        return None
    return q, x.new_tensor(s), sum(p[2] for p in parts)


# ----------------------------------------------------------------------------------------------
# Event-driven synapses (numba_events.py), on this backend's threads

EVENT_DENSITY = numba_events.EVENT_DENSITY


def event_eligible(layer, weight):
    return numba_events.eligible(layer, weight)


def event_crossovers(layer):
    return numba_events.crossovers(layer, EVENT_DENSITY)


def event_current(layer, q, s, weight, kept=None):
    return numba_events.current(layer, q, s, weight, kept, _split)


def event_weight_grad(layer, q, s, weight, grad_current):
    return numba_events.weight_grad(layer, q, s, weight, grad_current, _split)


def event_input_grad(layer, q, weight, grad_current, kept=None):
    return numba_events.input_grad(layer, q, weight, grad_current, kept, _split)


def unpack(q, s, dtype):
    """tensor_ops.unpack, without the multiply for unit spikes."""
    return numba_events._scaled(q.to(dtype), s)

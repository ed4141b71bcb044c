"""Event-driven synapses for CPU tensors (numba): convolutions and fully connected layers on spikes.

An input spike adds one signed weight row (O currents) to the outputs it reaches, so a layer whose
input fires at rate r needs r of a dense layer's multiply-adds, for its output and for its weight
gradient (∂L/∂w is a sum over the input's spikes). Its input gradient is needed only where the
input fired, when the input is a neuron layer's spikes: that layer's backward reads ∂L/∂s_t only at
its firing steps (spiking_layers.py), so it is computed there, as one dot product per spike, and is
0 elsewhere. A trained network fires sparsely enough for this to beat the dense kernels; a fresh
one on dense input does not, and the dense path is taken (EVENT_DENSITY). The results equal the
dense ones up to the order of summation. Convolutions run channels-last: spikes (N, H, W, C),
currents and their gradients (N, OH, OW, O), weights as rows (see below), so that a spike's rows
are contiguous.
"""
import numba
import numpy as np
import torch
import torch.nn as nn

from .layout import channels_last as to_channels_last

U64 = numba.uint64  # unsigned loop indices: numba then skips the negative-index check and vectorizes

# Input densities (spikes per input per step) below which a layer runs on events: its output, its
# weight gradient, and its input gradient at the spikes (the crossovers that
# benchmarks/bench_events.py measures; docs/performance.md).
EVENT_DENSITY = dict(conv=dict(forward=0.12, weight_grad=0.12, input_grad=0.15),
                     linear=dict(forward=0.2, weight_grad=0.2, input_grad=0.2))


def _kernel(fn):
    # nogil: the loops of one call run on several threads at once, each over its own range
    return numba.njit(cache=True, nogil=True)(fn)


def _dot_kernel(fn):
    # a dot product may be summed in any order (as oneDNN's and MKL's are): its loop then vectorizes
    return numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})(fn)


def _inlined(fn):
    # inlined into the calling kernels (numba_cpu's too): as a plain call, the event kernels ran
    # several times slower
    return numba.njit(inline="always", cache=True)(fn)


@numba.njit(inline="always", cache=True, fastmath={"reassoc", "contract"})
def _dot(a, b, zero):
    """a · b, in any order (a loop of its own: inside a kernel's branches it did not vectorize)."""
    acc = zero
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@_inlined
def _add_signed(acc, row, sign):
    """acc += row if sign > 0 else acc -= row (a branch per row, not a multiply per element)."""
    if sign > 0:
        for o in range(U64(acc.shape[0])):
            acc[o] += row[o]
    else:
        for o in range(U64(acc.shape[0])):
            acc[o] -= row[o]


# ----------------------------------------------------------------------------------------------
# Convolutions (stride 1). Images are (N, H, W·C) and (N, OH, OW·O), weights (C, KH, KW·O) with
# kw reversed: the outputs that a spike reaches through one kernel row, at consecutive ox, then
# meet consecutive weights, so that each kernel row is one long vector operation.

@_inlined
def _window(iy, ix, pad, out_h, out_w, kernel, o):
    """For a spike at (iy, ix): the kernel rows kh0..kh1 through which it reaches outputs, oy at
    kh0 (oy - (kh - kh0) at kh), and along the W·O axes the outputs' and the weights' offsets a,
    b and the length m: out[oy, a:a + m] meets w[kh, b:b + m]."""
    kh0, kh1 = max(0, iy + pad - out_h + 1), min(kernel, iy + pad + 1)
    kw0, kw1 = max(0, ix + pad - out_w + 1), min(kernel, ix + pad + 1)
    return kh0, kh1, iy + pad - kh0, (ix + pad - kw1 + 1) * o, (kernel - kw1) * o, (kw1 - kw0) * o


@_kernel
def _conv_forward(lo, hi, q, w, out, pad, o):
    """out[n] = Σ over the spikes of q[n] (H, W, C) of ±w rows, images lo..hi."""
    for n in range(lo, hi):
        out[n] = 0
        for iy in range(q.shape[1]):
            for ix in range(q.shape[2]):
                kh0, kh1, oy, a, b, m = _window(iy, ix, pad, out.shape[1], out.shape[2] // o, w.shape[1], o)
                for c in range(q.shape[3]):
                    if q[n, iy, ix, c] != 0:
                        for kh in range(kh0, kh1):
                            _add_signed(out[n, oy + kh0 - kh, a:a + m], w[c, kh, b:b + m], q[n, iy, ix, c])


@_kernel
def _conv_weight_grad(n_lo, n_hi, c_lo, c_hi, q, g, dw, pad, o):
    """dw[c] += Σ over the spikes of q[n_lo:n_hi] at channel c of ±g rows, channels c_lo..c_hi;
    g = ∂L/∂I."""
    for n in range(n_lo, n_hi):  # images outer: an image's gradient stays in cache over the channels
        for iy in range(q.shape[1]):
            for ix in range(q.shape[2]):
                kh0, kh1, oy, a, b, m = _window(iy, ix, pad, g.shape[1], g.shape[2] // o, dw.shape[1], o)
                for c in range(c_lo, c_hi):
                    if q[n, iy, ix, c] != 0:
                        for kh in range(kh0, kh1):
                            _add_signed(dw[c, kh, b:b + m], g[n, oy + kh0 - kh, a:a + m], q[n, iy, ix, c])


@_kernel
def _conv_weight_grad_channels(lo, hi, q, g, dw, pad, o):
    _conv_weight_grad(0, q.shape[0], lo, hi, q, g, dw, pad, o)


@_kernel
def _conv_weight_grad_images(lo, hi, q, g, dw, pad, o):
    """Images lo..hi into dw[i] (for layers with fewer channels than threads), where part i of P
    starts at lo = N·i // P (numba_cpu._split's edges for grain < 64)."""
    part = (lo * dw.shape[0] + q.shape[0] - 1) // q.shape[0]
    _conv_weight_grad(lo, hi, 0, q.shape[3], q, g, dw[part], pad, o)


@_dot_kernel
def _conv_input_grad(lo, hi, q, g, w, out, pad, o, zero):
    """out[n, iy, ix, c] = Σ over the kernel rows through which (iy, ix) reaches outputs of g rows ·
    w rows where q[n, iy, ix, c] ≠ 0, else 0; images lo..hi."""
    for n in range(lo, hi):
        for iy in range(q.shape[1]):
            for ix in range(q.shape[2]):
                kh0, kh1, oy, a, b, m = _window(iy, ix, pad, g.shape[1], g.shape[2] // o, w.shape[1], o)
                for c in range(q.shape[3]):
                    acc = zero
                    if q[n, iy, ix, c] != 0:
                        for kh in range(kh0, kh1):
                            acc += _dot(g[n, oy + kh0 - kh, a:a + m], w[c, kh, b:b + m], zero)
                    out[n, iy, ix, c] = acc


# ----------------------------------------------------------------------------------------------
# Fully connected layers: q (N, I) spikes, g = ∂L/∂I (N, O). The output and the input gradient read
# the weight as rows (I, O), one per input (kept as the convolutions' rows are: _rows); the weight
# gradient is summed in blocks of BLOCK inputs' rows, in a buffer that stays in cache while the
# images go by, then written into dw (O, I).

BLOCK = 64


@_kernel
def _linear_forward(lo, hi, q, rows, out):
    """out[n] = Σ over the spikes q[n, i] of ±rows[i], images lo..hi."""
    out[lo:hi] = 0
    for n in range(lo, hi):
        for i in range(q.shape[1]):
            if q[n, i] != 0:
                _add_signed(out[n], rows[i], q[n, i])


@_kernel
def _linear_weight_grad(lo, hi, q, g, dw):
    """Columns lo..hi of dw (O, I): dw[:, i] = Σ_n ±g[n] over the spikes q[n, i], summed block by
    block in a buffer of rows one cache line longer than O (rows 4 KiB apart, as for O = 1024,
    would all fall into the same cache sets), then written out."""
    buffer = np.empty((BLOCK, g.shape[1] + 16), dtype=dw.dtype)
    for i0 in range(lo, hi, BLOCK):
        i1 = min(i0 + BLOCK, hi)
        buffer[:] = 0
        for n in range(q.shape[0]):
            for i in range(i0, i1):
                if q[n, i] != 0:
                    _add_signed(buffer[i - i0, :g.shape[1]], g[n], q[n, i])
        for o in range(dw.shape[0]):
            for j in range(i1 - i0):
                dw[o, i0 + j] = buffer[j, o]


@_dot_kernel
def _linear_input_grad(lo, hi, q, g, rows, out, zero):
    """out[n, i] = g[n] · rows[i] where q[n, i] ≠ 0, else 0, images lo..hi."""
    for n in range(lo, hi):
        for i in range(q.shape[1]):
            out[n, i] = _dot(g[n], rows[i], zero) if q[n, i] != 0 else zero


# ----------------------------------------------------------------------------------------------
# The backend's entry points (numba_cpu re-exports them)

def eligible(layer, weight):
    """A Linear layer, or a stride-1, square, ungrouped, undilated convolution (strided ones measured
    slower on events in a training step), in float32 or float64."""
    if weight.dtype not in (torch.float32, torch.float64):
        return False
    if isinstance(layer, nn.Linear):
        return True
    return (isinstance(layer, nn.Conv2d) and layer.stride == (1, 1)
            and layer.kernel_size[0] == layer.kernel_size[1] and layer.kernel_size[0] > 1
            and not isinstance(layer.padding, str) and layer.padding[0] == layer.padding[1]
            and layer.dilation == (1, 1) and layer.groups == 1)


def crossovers(layer, table):
    """The layer's densities of table (EVENT_DENSITY) below which it runs each part on events."""
    return table["linear" if isinstance(layer, nn.Linear) else "conv"]


def _rows(weight, kept):
    """A weight as the event kernels read it: a Linear layer's as rows (I, O), a convolution's as
    rows (C, KH, KW·O), kw reversed. kept: a mapping weight -> rows shared by the calls of one
    forward pass and its backward (spiking_layers._Pass), so that the rows are made once a pass
    and the next pass sees the weight as it is then, however it was changed (through .data too);
    None: made afresh (a layer called on its own)."""
    rows = None if kept is None else kept.get(weight)
    if rows is None:
        rows = (_linear_rows if weight.dim() == 2 else _conv_rows)(weight.detach())
        if kept is not None:
            kept[weight] = rows
    return rows


def _linear_rows(w):
    """(O, I) -> (I, O)."""
    return w.t().contiguous()


def _conv_rows(w):
    """(O, C, KH, KW) -> (C, KH, KW·O), kw reversed."""
    return w.flip(3).permute(1, 2, 3, 0).reshape(w.shape[1], w.shape[2], -1).contiguous()


def _conv_weight(rows, shape):
    """The way back: (C, KH, KW·O) rows -> (O, C, KH, KW)."""
    o, c, kh, kw = shape
    return rows.view(c, kh, kw, o).permute(3, 0, 1, 2).flip(3)


def _scaled(x, s):
    """x · s, skipping the pass for unit spikes."""
    return x if s.item() == 1.0 else x * s.to(x.dtype)


def _zero(x):
    """0 in x's dtype: the dot products then sum in it (float32 vectors are twice as wide)."""
    return x.numpy().dtype.type(0)


def _images(x):
    """(..., C, H, W) as channels-last images (N, H, W, C), a view."""
    return to_channels_last(x.flatten(0, -4)).permute(0, 2, 3, 1)


def _rows_of_images(x):
    """(..., C, H, W) as (N, H, W·C) arrays, a view of the channels-last images."""
    x = _images(x)
    return x.reshape(x.shape[0], x.shape[1], -1).numpy()


def current(layer, q, s, weight, kept, split):
    """layer(q · s) on events. q: (..., C, H, W) or (..., I) int8 spikes; returns (N, O, OH, OW)
    channels-last, or (N, O)."""
    if isinstance(layer, nn.Linear):
        x = q.reshape(-1, q.shape[-1])
        out = weight.new_empty(x.shape[0], weight.shape[0])
        split(_linear_forward, x.shape[0], x.numpy(), _rows(weight, kept).numpy(), out.numpy(), grain=8)
        return _scaled(out, s)
    rows = _rows(weight, kept)
    x, pad, o, kernel = _images(q), layer.padding[0], weight.shape[0], weight.shape[2]
    out = torch.empty(x.shape[0], o, *(n + 2 * pad - kernel + 1 for n in x.shape[1:3]), dtype=weight.dtype,
                      memory_format=torch.channels_last)
    split(_conv_forward, x.shape[0], x.numpy(), rows.numpy(), _rows_of_images(out), pad, o, grain=8)
    return _scaled(out, s)


def weight_grad(layer, q, s, weight, grad_current, split):
    """∂L/∂w on events: q (..., C, H, W) or (..., I) int8 spikes, grad_current = ∂L/∂I."""
    if isinstance(layer, nn.Linear):
        x, g = q.reshape(-1, q.shape[-1]), grad_current.reshape(-1, weight.shape[0]).to(weight.dtype).contiguous()
        dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
        split(_linear_weight_grad, dw.shape[1], x.numpy(), g.numpy(), dw.numpy(), grain=BLOCK)
        return _scaled(dw, s)
    x, g = _images(q), _rows_of_images(grad_current.to(weight.dtype))
    o, c, kernel, pad = weight.shape[0], weight.shape[1], weight.shape[2], layer.padding[0]
    threads = torch.get_num_threads()
    if c >= 2 * threads:  # each thread its own channels
        rows = weight.new_zeros(c, kernel, kernel * o)
        split(_conv_weight_grad_channels, c, x.numpy(), g, rows.numpy(), pad, o, grain=1)
    else:  # each thread its own images, into a part of its own; the parts are summed
        parts = max(1, min(threads, x.shape[0]))
        rows = weight.new_zeros(parts, c, kernel, kernel * o)
        split(_conv_weight_grad_images, x.shape[0], x.numpy(), g, rows.numpy(), pad, o,
              grain=max(1, min(63, x.shape[0] // parts)))
        rows = rows.sum(0)
    return _scaled(_conv_weight(rows, weight.shape), s)


def input_grad(layer, q, weight, grad_current, kept, split):
    """∂L/∂s where the input q (int8, (..., C, H, W) or (..., I)) fired, 0 elsewhere: what a neuron
    layer's backward reads of it. Returns (N, C, H, W) channels-last, or (N, I)."""
    if isinstance(layer, nn.Linear):
        x, g = q.reshape(-1, q.shape[-1]), grad_current.reshape(-1, weight.shape[0]).contiguous()
        out = g.new_empty(x.shape)
        split(_linear_input_grad, x.shape[0], x.numpy(), g.numpy(), _rows(weight, kept).to(g.dtype).numpy(),
              out.numpy(), _zero(g), grain=8)
        return out
    rows = _rows(weight, kept).to(grad_current.dtype)
    x, g = _images(q), _rows_of_images(grad_current)
    out = torch.empty(x.shape[0], x.shape[3], *x.shape[1:3], dtype=grad_current.dtype,
                      memory_format=torch.channels_last)
    split(_conv_input_grad, x.shape[0], x.numpy(), g, rows.numpy(), out.permute(0, 2, 3, 1).numpy(),
          layer.padding[0], weight.shape[0], _zero(grad_current), grain=8)
    return out

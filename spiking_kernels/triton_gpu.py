"""The recursions as Triton kernels: one launch per layer and chunk, whatever the number of steps.

Each program owns a block of neurons and keeps their membrane, N and LF in registers while it walks
the chunk's time steps (forward: t = 0 … k−1; backward: t = k−1 … 0); currents, spikes and
gradients stream through once, and the spike record is kept as bits. The arithmetic is that of
tensor_ops.py, operation for operation, and every launch compiles without FP contraction
(LAUNCH), so each product and each sum is rounded on its own, as the tensor operations and the
numba loops round them: given the same currents, the spikes, membranes, N, LF and the backward
recursion's gradients are the same bits as theirs, on any device (the currents themselves, sums
of convolution libraries, are not: docs/engine.md). Membranes, N, LF and gradients are float32
(float64 for float64 models); currents may be bf16 (autocast), read as such. Nothing here
synchronises with the host.

On CUDA tensors the kernels are compiled; with TRITON_INTERPRET=1 (set before triton is imported)
they run on CPU tensors in Triton's interpreter, which is how the tests check them without a GPU.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from . import tensor_ops

name = "triton"
channels_last = False  # cuDNN takes NCHW
events = False

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on(t):
    return t.device.type == "cuda" or (INTERPRETED and t.device.type == "cpu")


def _grid(n, block=1024):
    """(BLOCK, programs): `block` elements a program on a GPU; in the interpreter, where every tensor
    operation of a program costs a numpy call, as few programs as possible."""
    if INTERPRETED:
        block = min(triton.next_power_of_2(max(n, 1)), 1 << 16)
    return block, (triton.cdiv(n, block),)


@functools.lru_cache(maxsize=None)
def _constants(values, dtype, device):
    """Kernel constants (V_th, λ) as a tensor: Triton passes Python floats as float32, which would
    round λ = 0.99 in a float64 model. Made once per value, dtype and device."""
    return torch.tensor(values, dtype=dtype, device=device)


# The options of every launch here. Triton contracts a multiply and an add into one fused
# multiply-add by default (LF ← λ·LF + o, U ← (U + I)·λ): one rounding instead of two, a different
# last bit than the tensor operations', the authors' PyTorch and a CPU give.
LAUNCH = dict(enable_fp_fusion=False)

# Triton compiles a kernel once per specialisation of its integer arguments (== 1, divisible by 16).
# The chunk length K and its first step t0 only bound loops and pick bits: one binary serves them all,
# where specialising would compile a new one for every chunk length and offset a run or test meets.
# N stays specialised: its divisibility lets the compiler vectorise the loads of each step's row.
_ONE_BINARY_FOR_ANY_CHUNK = dict(do_not_specialize=["K", "t0"])


# ----------------------------------------------------------------------------------------------
# Neurons

@triton.jit(**_ONE_BINARY_FOR_ANY_CHUNK)
def _fire_kernel(current, u, lf, n, record, mask, out, constants, N, K, t0,
                 LEAKY_SUM: tl.constexpr, RECORD: tl.constexpr, MASK: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit offsets: T·N may pass 2³¹
    ok, n64 = i < N, tl.cast(N, tl.int64)
    v_th, leak = tl.load(constants), tl.load(constants + 1)
    v = tl.load(u + i, mask=ok)
    count = tl.load(n + i, mask=ok)
    if LEAKY_SUM:
        leaky = tl.load(lf + i, mask=ok)
    if MASK:
        scale = tl.load(mask + i, mask=ok)
    if RECORD:  # a chunk may start inside a byte of the record: keep its earlier bits
        byte = tl.load(record + (t0 // 8) * n64 + i, mask=ok).to(tl.int32)
    for t in range(K):
        s = t0 + t
        v = v + tl.load(current + t * n64 + i, mask=ok).to(v.dtype)  # step 2: integrate
        fired = v > v_th                                              # step 3: fire, strictly above threshold
        spike = fired.to(v.dtype)
        if MASK:
            tl.store(out + t * n64 + i, (spike * scale).to(out.dtype.element_ty), mask=ok)
        else:
            tl.store(out + t * n64 + i, spike.to(out.dtype.element_ty), mask=ok)
        v = tl.where(fired, 0.0, v) * leak                            # steps 4–5: hard reset, leak
        count = count + spike
        if LEAKY_SUM:
            leaky = leaky * leak + spike
        if RECORD:
            byte = byte | (fired.to(tl.int32) << (s % 8))
            if (s % 8 == 7) | (t == K - 1):
                tl.store(record + (s // 8) * n64 + i, byte.to(tl.uint8), mask=ok)
                byte = byte * 0
    tl.store(u + i, v, mask=ok)
    tl.store(n + i, count, mask=ok)
    if LEAKY_SUM:
        tl.store(lf + i, leaky, mask=ok)


@triton.jit(**_ONE_BINARY_FOR_ANY_CHUNK)
def _backprop_kernel(grad_spikes, record, slope, carry, grad_current, N, K, t0, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit offsets: T·N may pass 2³¹
    ok, n64 = i < N, tl.cast(N, tl.int64)
    c = tl.load(carry + i, mask=ok)
    a = tl.load(slope + i, mask=ok)
    for step in range(K):
        t = K - 1 - step
        s = t0 + t
        fired = ((tl.load(record + (s // 8) * n64 + i, mask=ok).to(tl.int32) >> (s % 8)) & 1) != 0
        g = tl.load(grad_spikes + t * n64 + i, mask=ok).to(c.dtype)
        c = tl.where(fired, g * a, c)
        tl.store(grad_current + t * n64 + i, c, mask=ok)
    tl.store(carry + i, c, mask=ok)


@triton.jit(do_not_specialize=["K"])
def _leaky_sum_kernel(current, u, constants, N, K, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit offsets: T·N may pass 2³¹
    ok, n64 = i < N, tl.cast(N, tl.int64)
    leak = tl.load(constants)
    v = tl.load(u + i, mask=ok)
    for t in range(K):
        v = (v + tl.load(current + t * n64 + i, mask=ok).to(v.dtype)) * leak
    tl.store(u + i, v, mask=ok)


def fire(current, u, lf, n, record, t0, v_th, leak, leaky_sum, mask):
    """tensor_ops.fire in one launch."""
    current = current.contiguous()
    k, N = current.shape
    out = torch.empty(current.shape, device=u.device,
                      dtype=current.dtype if mask is None else torch.promote_types(current.dtype, mask.dtype))
    block, grid = _grid(N)
    _fire_kernel[grid](current, u, lf, n, u if record is None else record, u if mask is None else mask, out,
                       _constants((v_th, leak), u.dtype, u.device), N, k, t0, LEAKY_SUM=leaky_sum,
                       RECORD=record is not None, MASK=mask is not None, BLOCK=block, **LAUNCH)
    return out


def backprop(grad_spikes, record, t0, slope, carry):
    """tensor_ops.backprop in one launch; carry is updated in place."""
    grad_spikes = grad_spikes.contiguous()
    k, N = grad_spikes.shape
    grad_current = torch.empty(grad_spikes.shape, dtype=slope.dtype, device=slope.device)
    block, grid = _grid(N)
    _backprop_kernel[grid](grad_spikes, record, slope, carry, grad_current, N, k, t0, BLOCK=block, **LAUNCH)
    return grad_current, carry


def leaky_sum(current, u, leak):
    """tensor_ops.leaky_sum in one launch."""
    current, u = current.contiguous(), u.clone()
    block, grid = _grid(u.numel())
    _leaky_sum_kernel[grid](current, u, _constants((leak,), u.dtype, u.device), u.numel(), current.shape[0],
                            BLOCK=block, **LAUNCH)
    return u


# ----------------------------------------------------------------------------------------------
# Spike packing

@triton.jit
def _pack_kernel(x, q, extremes, N, BLOCK: tl.constexpr):
    """q = sign(x) as int8; extremes[0] ← max |x|, extremes[1] ← max −|x| over nonzero x (= −min)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit offsets: T·N may pass 2³¹
    ok = i < N
    v = tl.load(x + i, mask=ok, other=0.0).to(extremes.dtype.element_ty)
    tl.store(q + i, ((v > 0).to(tl.int8) - (v < 0).to(tl.int8)), mask=ok)
    a = tl.abs(v)
    tl.atomic_max(extremes, tl.max(a, 0))
    tl.atomic_max(extremes + 1, tl.max(tl.where(a != 0, -a, float("-inf")), 0))


def pack(x, check=True):
    """tensor_ops.pack in one launch (unchecked: no wait for the device)."""
    x = x.contiguous()
    q = torch.empty_like(x, dtype=torch.int8)
    extremes = torch.full((2,), float("-inf"), device=x.device,
                          dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    block, grid = _grid(x.numel(), 4096)  # larger blocks: fewer atomics on the two extremes
    _pack_kernel[grid](x, q, extremes, x.numel(), BLOCK=block, **LAUNCH)
    largest, smallest = extremes[0], -extremes[1]
    if check and not bool((largest == smallest) | (largest <= 0)):
        return None
    return q, largest.clamp_min(0).to(x.dtype), None


# ----------------------------------------------------------------------------------------------
# 2×2 pooling (one cuDNN call each way) and unpacking, as tensor operations

pool2x2 = tensor_ops.pool2x2
unpool2x2 = tensor_ops.unpool2x2
unpack = tensor_ops.unpack
is_spike_train = tensor_ops.is_spike_train

fuses_pooling = tensor_ops.fuses_pooling

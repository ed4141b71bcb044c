"""The recursions as PyTorch tensor operations, one step at a time: runs on any device.

This is the readable statement of what the compiled backends do (and the fallback on devices they
do not serve, e.g. Apple MPS). Its launches grow with T, so it is not what a GPU should run.
Tensors are flat, in memory order: currents and spikes (k, N), per-neuron state (N,). Spike records
hold step s at bit s % 8 of record[s // 8] (uint8, (planes, N)).
"""
import torch
import torch.nn.functional as F

name = "torch"
channels_last = False  # convolutions keep their inputs' layout
events = False         # no event-driven convolutions


def runs_on(t):
    return True


def fire(current, u, lf, n, record, t0, v_th, leak, leaky_sum, mask):
    """Steps 2–5 of the model for the k steps of a chunk. Updates the membrane u, the spike count N
    and (leaky_sum) LF ← λ·LF + o_t in place, records o_t in `record` (None: not kept), and returns
    the spikes o_t (k, N), multiplied by the dropout mask (N,) if there is one."""
    fired = torch.empty(current.shape[1:], dtype=torch.bool, device=u.device)
    out = torch.empty(current.shape, device=u.device,
                      dtype=current.dtype if mask is None else torch.promote_types(current.dtype, mask.dtype))
    for t in range(current.shape[0]):
        u += current[t]                      # step 2: integrate
        torch.gt(u, v_th, out=fired)         # step 3: fire, strictly above threshold
        u.masked_fill_(fired, 0.0)           # step 4: hard reset
        u *= leak                            # step 5: leak
        n += fired
        if leaky_sum:
            lf.mul_(leak).add_(fired)
        if record is not None:
            s = t0 + t
            record[s // 8] |= fired.to(torch.uint8) << (s % 8)
        out[t] = fired
    if mask is not None:
        out *= mask
    return out


def backprop(grad_spikes, record, t0, slope, carry):
    """gU'_t = slope · o_t · g_t + (1 − o_t) · gU'_{t+1}, from the chunk's last step back to its first.
    carry: gU' of the step after the chunk. Returns ∂L/∂I (k, N) and gU' of the chunk's first step."""
    g = grad_spikes.to(slope.dtype) * slope
    grad_current = torch.empty_like(g)
    for t in range(g.shape[0] - 1, -1, -1):
        s = t0 + t
        fired = ((record[s // 8] >> (s % 8)) & 1).bool()
        carry = torch.where(fired, g[t], carry, out=grad_current[t])
    return grad_current, carry


def pool2x2(x):
    """2×2 average pooling of images (M, C, H, W), in their layout."""
    return F.avg_pool2d(x, 2)


def unpool2x2(g, size):
    """The gradient of 2×2 average pooling of images of `size` (H, W): each input receives 1/4 of
    its output's gradient; an odd last row or column, which the pooling drops (F.avg_pool2d's
    floor), receives 0."""
    grad = (g * 0.25).repeat_interleave(2, -1).repeat_interleave(2, -2)
    dropped = (0, size[1] - grad.shape[-1], 0, size[0] - grad.shape[-2])
    return F.pad(grad, dropped) if any(dropped) else grad


def is_spike_train(x):
    """Whether x holds only 0 and ±s for one s > 0 (or only zeros)."""
    a = x.abs()
    return bool(((a == 0) | (a == a.amax())).all())


def pack(x, check=True):
    """(q, s, None) with x = q·s, q = sign(x) in int8, s = max|x|, if x holds only 0 and ±s; else
    None. check=False: x is spikes by construction (where it came from), and nothing is checked
    (no wait for the device)."""
    s = x.abs().amax()
    q = torch.sign(x).to(torch.int8)
    if check and not torch.equal(q * s, x):
        return None
    return q, s, None


def unpack(q, s, dtype):
    """The spikes that pack() kept, as floats of `dtype`."""
    return q.to(dtype) * s.to(dtype)


def leaky_sum(current, u, leak):
    """The output integrator over a chunk: U ← λ(U + I_t) for each step; returns the new U."""
    u = u.clone()
    for t in range(current.shape[0]):
        u += current[t]
        u *= leak
    return u


def fuses_pooling(x):
    """Whether pool_fire and backprop_unpool (2×2 pooling fused into IF neurons) serve x: not here."""
    return False

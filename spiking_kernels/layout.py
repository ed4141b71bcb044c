"""Memory layouts. Convolutions on a CPU run channels-last (N, H, W, C in memory), where oneDNN is
fastest (docs/performance.md); the currents, membranes and spikes that follow keep that layout. The
kernels see every tensor as a flat array in memory order, so they serve both layouts alike."""
import torch


def channels_last(x):
    """(N, C, H, W) in channels-last memory order. With C = 1 both orders are the same memory;
    only strides that say so make oneDNN return a channels-last output."""
    if x.shape[1] == 1 and x.is_contiguous():
        return x.view(x.shape[0], *x.shape[2:], 1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def is_channels_last(x):
    """Whether (..., C, H, W) lies in memory as (..., H, W, C) (and not, ambiguously, also as is)."""
    return x.dim() >= 4 and not x.is_contiguous() and x.movedim(-3, -1).is_contiguous()


def memory_order(x, channels_last):
    """x (..., C, H, W) with its dims in memory order: (..., H, W, C) if channels_last."""
    return x.movedim(-3, -1) if channels_last else x


def logical_order(x, channels_last):
    return x.movedim(-1, -3) if channels_last else x


def flat(x):
    """The elements of x in memory order, as a flat view (x contiguous or channels-last)."""
    return memory_order(x, is_channels_last(x)).view(-1)

"""Per-step autograd reference for the spiking dynamics and the leak-aware gradient.

Lee, Sarwar, Panda, Srinivasan & Roy, "Enabling Spike-based Backpropagation for Training Deep
Neural Network Architectures", Frontiers in Neuroscience 14:119 (2020), doi 10.3389/fnins.2020.00119.

This follows the authors' design: the network is run one time step at a time and autograd
records one graph per step, built only from autograd pieces:

* fire:  ex = threshold(U', V_th) (U' where U' > V_th, else 0), o = Spike(ex) = 1[ex > 0]; Spike's
  backward is straight-through at firing steps, so ∂o_t/∂U'_t = 1[o_t = 1];
* reset: U'' = U' - ex, hence ∂U''/∂U' = 1 - o_t (the reset blocks the path at firing steps);
* 1/V_th: o.detach() + (o/V_th - (o/V_th).detach()) (value o, gradient scaled by 1/V_th);
* leak:  λ·U.detach() + (U - U.detach()) (value leaked, gradient identity: the paper's choice);
* leak correction: a hook on every step's spike o_t (before the dropout mask) multiplies its
  gradient by G = 1[LF > 1e-3] + ln(λ)·LF/N', with LF, N accumulated during the forward pass.
  G is only known once the time loop is over, so hooks read it from a cell filled afterwards.

Pooling neurons (2×2 average pool, then IF at 0.75) have no leak, no 1/V_th and no G. The output
layer integrates U = λ(U + I_t) with the same leak trick and returns U_T / V_th / T.
The time-batched engine in the repository must agree with this file to float tolerance.
"""
import math

import torch
import torch.nn.functional as F

V_TH = 1.0        # LIF threshold
V_TH_POOL = 0.75  # pooling-neuron threshold


class Spike(torch.autograd.Function):
    """o = 1[ex > 0]; backward passes the gradient straight through where the neuron fired."""

    @staticmethod
    def forward(ctx, ex):
        out = (ex > 0).to(ex.dtype)
        ctx.save_for_backward(out)  # the 0/1 spike doubles as the straight-through mask
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad * out


def leak_correction(lf, n, leak):
    """G = 1[LF > 1e-3] + ln(λ)·LF/N' with N' = N + 1[N < 1e-3]; 0 for silent neurons."""
    n_safe = n + (n < 1e-3).to(n.dtype)  # avoid 0/0 for silent neurons (their LF is 0 anyway)
    return (lf > 1e-3).to(lf.dtype) + math.log(leak) * lf / n_safe


def _leaky(u, leak):
    # Value λ·u, gradient identity. The bracket is exactly 0, so the value is bit-identical to λ·u
    # (written as ((λu + u) - u) it could be off by an ulp and flip a spike at threshold).
    return leak * u.detach() + (u - u.detach())


def neuron_step(u, current, v_th, leak=None, grad_scale=True):
    """One time step of an (L)IF neuron: integrate, fire, hard reset, leak. Returns (o_t, new U).

    u is None on the first step (U starts at 0, so U' = I_t exactly and no zeros are allocated).
    """
    u = current if u is None else u + current
    ex = F.threshold(u, v_th, 0.0)  # U' where it fires (its gradient flows there only), else 0
    u = u - ex                      # hard reset to exactly 0; ∂U''/∂U' = 1 - o_t
    o = Spike.apply(ex)
    if grad_scale and v_th != 1.0:  # the bracket is exactly 0: value stays o, gradient gets 1/V_th
        o = o.detach() + (o / v_th - (o / v_th).detach())
    if leak is not None:
        u = _leaky(u, leak)
    return o, u


class _Neuron:
    """State of one spiking layer across time: the membrane, and for LIF layers LF, N and G."""

    def __init__(self, v_th, leak=None, correct=False, mask=None, keep=False):
        self.v_th, self.leak, self.correct, self.mask = v_th, leak, correct, mask
        self.u = self.lf = self.n = self.G = None
        self.cell = {}                               # filled with G by finish(), read by the hooks
        self.spikes = [] if keep else None

    def step(self, current):
        o, self.u = neuron_step(self.u, current, self.v_th, self.leak, grad_scale=self.correct)
        if self.correct:
            with torch.no_grad():                    # LF ← λ·LF + o_t,  N ← N + o_t
                s = o.detach()
                if self.lf is None:
                    self.lf, self.n = torch.zeros_like(s), torch.zeros_like(s)
                self.lf.mul_(self.leak).add_(s)
                self.n.add_(s)
            if o.requires_grad:
                cell = self.cell
                o.register_hook(lambda g: g * cell['G'])
        if self.spikes is not None:
            self.spikes.append(o.detach())
        return o if self.mask is None else o * self.mask

    def finish(self):
        """Call after the last step: G becomes available to the hooks (before backward runs)."""
        if self.correct and self.lf is not None:
            self.G = self.cell['G'] = leak_correction(self.lf, self.n, self.leak)
        return self.G


class _Integrator:
    """Output layer: U = λ·(U + I_t) with identity leak gradient; read out U_T / V_th / T."""

    def __init__(self, leak, v_th=V_TH):
        self.leak, self.v_th, self.u, self.steps = leak, v_th, None, 0

    def step(self, current):
        u = current if self.u is None else self.u + current
        self.u = _leaky(u, self.leak)
        self.steps += 1

    def result(self):
        return self.u / self.v_th / self.steps


# ----------------------------------------------------------------------------------------------
# Single-layer helpers (current_seq: (T, B, ...); gradients w.r.t. it are what unit tests check)

def reference_lif(current_seq, v_th=V_TH, leak=0.99, mask=None):
    """LIF layer with the leak-aware gradient. Returns (output spikes (T, B, ...) after the mask, G)."""
    neuron = _Neuron(v_th, leak, correct=True, mask=mask)
    out = torch.stack([neuron.step(i) for i in current_seq])
    return out, neuron.finish()


def reference_pool_neuron(current_seq, v_th=V_TH_POOL):
    """Integrate-and-fire pooling neuron: hard reset, no leak, no 1/V_th, no leak correction."""
    neuron = _Neuron(v_th)
    return torch.stack([neuron.step(i) for i in current_seq])


def reference_output(current_seq, leak=0.99, v_th=V_TH):
    """Output integrator: returns U_out(T) / V_th / T, shape (B, ...)."""
    out = _Integrator(leak, v_th)
    for i in current_seq:
        out.step(i)
    return out.result()


# ----------------------------------------------------------------------------------------------
# Networks (the paper's architectures). A plan is a list of ops; names are the weight names without '.weight'.

def _conv(name, stride=1, pad=1):
    return ('conv', name, stride, pad)


def _block(c1, c2, shortcut, stride):
    # shortcut None = identity (subsampled by `stride`); the 1×1 convs share the block's stride
    return ('block', c1, c2, shortcut, stride)


_RES_STEM = [_conv('cnn11'), ('pool',),
             _block('cnn21', 'cnn22', 'shortcut1.0', 1), _block('cnn31', 'cnn32', 'shortcut2.0', 2)]

_PLANS = {
    'lenet': [_conv('cnn1', pad=2), ('pool',), _conv('cnn2', pad=2), ('pool',),
              ('fc', 'fc0'), ('out', 'fc1')],
    'vgg9': [_conv('cnn11'), _conv('cnn12'), ('pool',), _conv('cnn21'), _conv('cnn22'), ('pool',),
             _conv('cnn31'), _conv('cnn32'), _conv('cnn33'), ('pool',), ('fc', 'fc0'), ('out', 'fc1')],
    'resnet11': _RES_STEM + [_block('cnn41', 'cnn42', 'shortcut3.0', 1),
                             _block('cnn51', 'cnn52', None, 2), ('fc', 'fc0'), ('out', 'fc1')],
    'resnet7': _RES_STEM + [('fc', 'fc0'), ('out', 'fc1')],
    'stack3': [_conv('conv'), ('pool',), ('out', 'fc')],
    # a user's own: residuals that add two layers' spikes (SEW-ResNet's ADD, values 0, 1, 2) into a
    # convolution and a Linear layer; odd maps into 2×2 pooling (11×9 -> 5×4 -> 2×2)
    'sew': [_conv('conv'), ('sew', 'conv', 'res1', 'res2'), _conv('mix'), ('pool',), ('fc', 'fc0'),
            ('sew', 'fc', 'fc1', 'fc2'), ('out', 'fc3')],
    'odd': [_conv('conv'), ('pool',), _conv('conv2'), ('pool',), ('out', 'fc')],
}


def _neuron_names(plan):
    """LIF layer names and pooling-neuron names ('pool1', 'pool2', ...) in network order."""
    lif, pools = [], []
    for op in plan:
        if op[0] in ('conv', 'fc'):
            lif.append(op[1])
        elif op[0] == 'block':
            lif += [op[1], op[2]]
        elif op[0] == 'sew':
            lif += [op[2], op[3]]
        elif op[0] == 'pool':
            pools.append(f'pool{len(pools) + 1}')
    return lif, pools


def reference_forward(arch, weights, spike_seq, leak=0.99, masks=None, record=None):
    """Per-step reference. spike_seq: (T, B, C, H, W) input spikes (any float values).

    weights: the paper's weight names -> tensors, used directly so gradients land on them. masks: LIF-layer
    name -> (B, ...) dropout mask for one step, held for all T (missing = no dropout). Returns
    U_out(T) / V_th / T, shape (B, 10). If `record` is a dict it receives, detached, the binary
    spikes (T, B, ...) of every LIF layer (before its mask) and pooling neuron ('pool1', ...),
    and 'G.<name>' = the G tensor (B, ...) of every LIF layer.
    """
    plan, masks, keep = _PLANS[arch], masks or {}, record is not None
    w = lambda name: weights[name + '.weight']
    lif_names, pool_names = _neuron_names(plan)
    lif = {n: _Neuron(V_TH, leak, correct=True, mask=masks.get(n), keep=keep) for n in lif_names}
    pools = [_Neuron(V_TH_POOL, keep=keep) for _ in pool_names]
    out = _Integrator(leak)

    def conv(x, name, stride=1, pad=1):
        return F.conv2d(x, w(name), stride=stride, padding=pad)

    for x in spike_seq:                      # one autograd graph per time step, layer by layer
        pool_iter = iter(pools)
        for op in plan:
            kind = op[0]
            if kind == 'conv':
                x = lif[op[1]].step(conv(x, op[1], op[2], op[3]))
            elif kind == 'pool':
                x = next(pool_iter).step(F.avg_pool2d(x, 2))
            elif kind == 'fc':
                x = lif[op[1]].step(F.linear(x.flatten(1), w(op[1])))
            elif kind == 'out':
                out.step(F.linear(x.flatten(1), w(op[1])))
            elif kind == 'sew':                  # x + the spikes of two layers after it: 0, 1, 2
                _, layer, c1, c2 = op
                apply = conv if layer == 'conv' else lambda x, name: F.linear(x, w(name))
                x = x + lif[c2].step(apply(lif[c1].step(apply(x, c1)), c2))
            else:                            # residual block: shortcut current enters the 2nd conv
                _, c1, c2, sc, stride = op
                h = lif[c1].step(conv(x, c1))
                short = x[..., ::stride, ::stride] if sc is None else conv(x, sc, stride, 0)
                x = lif[c2].step(conv(h, c2, stride) + short)

    for n in lif_names:                      # G is now known: the hooks registered above read it
        lif[n].finish()
    if keep:
        for n in lif_names:
            record[n] = torch.stack(lif[n].spikes)
            record['G.' + n] = lif[n].G
        for n, p in zip(pool_names, pools):
            record[n] = torch.stack(p.spikes)
    return out.result()

"""NIR export and import of the networks: take a trained network to other simulators and chips.

NIR, the Neuromorphic Intermediate Representation (Pedersen et al., Nature Communications 15:8122
(2024), doi 10.1038/s41467-024-52259-9; https://neuroir.org/docs), describes a spiking network as a
graph of continuous-time nodes that each importer discretises with its own step dt. Our layers map
onto its nodes exactly under forward Euler with step dt (docs/nir.md has the table):

    Conv2d / Linear (no bias)      Conv2d (bias 0) / Linear               I_t = W * s_t
    LIF neurons, leak λ, V_th      LIF  tau = dt/(1-λ), r = tau/dt,       v ← λ·v + I, fire v > V_th,
                                        v_leak = 0, v_reset = 0           then v = 0
    2×2 average pool + IF(0.75)    AvgPool2d(2, 2) + IF r = 1/dt,         v ← v + I, fire, v = 0
                                        v_threshold = 0.875
    output integrator              LI   tau = dt/(1-λ), r = λ/(1-λ)       U ← λ·U + λ·I = λ(U + I)
    ResNet shortcut current        an edge into the second conv's LIF     (a node sums its inputs)
    identity shortcut, stride 2    SumPool2d(kernel 1, stride 2)          x[..., ::2, ::2]

The pooling neuron's membrane is a sum of quarters (its inputs are 2×2 averages of 0/1 spikes), so
0.875 fires exactly when the paper's "> 0.75" does, whether an importer compares with > or ≥.
Every parameter is written per neuron (the node's shape). The graph's metadata holds what NIR has no
node for: dt, T, the readout U_out(T) / V_th / T, and the input code (signed Poisson spikes,
s_t = sign(x)·1[u_t < |x|·scale], with the script's scale), or with on_off=True two unsigned input
channels per image channel, ON = 1[s_t > 0] and OFF = 1[s_t < 0], whose first-layer weights are
[W, -W], for hardware that takes only positive events.

    graph = to_nir(net, (1, 28, 28)); write(graph, "lenet.nir")        export
    net = from_nir(read("lenet.nir"))                                   import: a SpikingNetwork

from_nir accepts the node kinds the export writes (and the SumPool2d form of the pooling neuron);
anything it cannot run exactly raises NIRError, one line naming the node.
"""
import functools
import io
import math
import operator
import os
import stat

import numpy as np
import torch
import torch.fx
import torch.nn as nn

import data
import nir_checks
import paths
from checkpoints import (HDF5_MAGIC, WriteError, atomic_write, load_checkpoint, log, resume_settings,
                         take_settings)
from spiking_layers import (Conv2d, Linear, PoolIF, SpikingConv2d, SpikingLinear, SpikingNetwork,
                            SpikingNeurons)

DT = 1e-4  # the step snnTorch's importer assumes; the spikes do not depend on it when an importer uses the file's dt
POOL_THRESHOLD = 0.875  # between the pooling membrane's values 0.75 and 1: the same spikes under > and ≥
SIGNED, ON_OFF = "signed_poisson", "on_off_poisson"
READOUT = "U_out(T) / readout_v_th / T: the output integrator's membrane after the last step"


class NIRError(ValueError):
    """A network or graph that this module cannot translate exactly; the message is one line."""


# ----------------------------------------------------------------------------------------------
# Export

class _Tracer(torch.fx.Tracer):
    """Records `step` with our layers as single calls: the graph follows the script's own lines."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, (SpikingNeurons, Conv2d, Linear)) or super().is_leaf_module(m, qualname)


class _Step(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, spike_seq):
        return self.net.step(spike_seq)


def _full(shape, value):
    return np.full(tuple(int(s) for s in shape), value, dtype=np.float64)


def _pair(v):
    return np.array(v if isinstance(v, (tuple, list)) else (v, v), dtype=np.int64)


def _conv_shape(conv, name, shape):
    if len(shape) != 3 or conv.in_channels != shape[0]:
        raise NIRError(f"layer {name!r}: {conv.in_channels} input channels, but its input has shape {tuple(shape)}")
    c, h, w = shape
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return conv.out_channels, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def _synapse_node(layer, name, shape):
    """(NIR node, output shape) of a Conv2d or Linear weight layer without bias."""
    weight = layer.weight.detach().cpu().numpy().copy()
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or tuple(layer.dilation) != (1, 1):
            raise NIRError(f"layer {name!r}: grouped or dilated convolutions are not exported")
        out = _conv_shape(layer, name, shape)
        node = _nir().Conv2d(input_shape=tuple(int(s) for s in shape[1:]), weight=weight, stride=_pair(layer.stride),
                             padding=_pair(layer.padding), dilation=_pair(1), groups=1,
                             bias=np.zeros(layer.out_channels, dtype=weight.dtype))  # NIR's Conv2d carries a bias
        return node, out
    if tuple(shape) != (layer.in_features,):
        raise NIRError(f"layer {name!r}: {layer.in_features} inputs, but its input has shape {tuple(shape)}")
    return _nir().Linear(weight=weight), (layer.out_features,)


def _lif_node(name, leak, v_th, shape, dt):
    if not 0.0 < leak < 1.0:
        raise NIRError(f"layer {name!r}: leak λ = {leak:g}; NIR's LIF needs 0 < λ < 1")
    tau = dt / (1.0 - leak)  # forward Euler: v ← (1 - dt/tau)·v + (dt/tau)·R·I = λ·v + I
    return _nir().LIF(tau=_full(shape, tau), r=_full(shape, tau / dt), v_leak=_full(shape, 0.0),
                      v_threshold=_full(shape, v_th), v_reset=_full(shape, 0.0))


def to_nir(net, input_shape, dt=DT, on_off=False):
    """The network as a nir.NIRGraph (weights, per-neuron parameters, the graph of `step`).

    input_shape: one image, (C, H, W). dt: the Euler step the time constants are stated in; the
    discrete dynamics (λ, V_th) are the same for every dt. on_off: two unsigned input channels per
    image channel (weights [W, -W]); the network's first weight layers must be convolutions."""
    nir = _nir()
    if not isinstance(net, SpikingNetwork):
        raise NIRError(f"{type(net).__name__} is not a SpikingNetwork")
    if not 0.0 < net.leak < 1.0:
        raise NIRError(f"the output integrator's leak λ = {net.leak}: NIR's LI needs 0 < λ < 1")
    try:
        graph = _Tracer().trace(_Step(net))
    except Exception as e:  # torch.fx records `step` symbolically: no branches on values
        raise NIRError(f"{type(net).__name__}.step cannot be traced ({type(e).__name__}: {e})") from None
    modules = dict(net.named_modules())
    input_shape = tuple(int(s) for s in input_shape)
    nodes, edges, made = {}, [], {}  # made: fx node -> (NIR node that outputs its value, shape)
    for fx in graph.nodes:
        args = [a for a in fx.args if isinstance(a, torch.fx.Node)]
        srcs = [made[a][0] for a in args]
        shape = made[args[0]][1] if args else None
        if fx.op == "placeholder":
            c = input_shape[0] * (2 if on_off else 1)
            nodes["input"] = nir.Input(input_type={"input": np.array((c, *input_shape[1:]))})
            made[fx] = ("input", input_shape)
        elif fx.op == "call_module":
            name = fx.target.removeprefix("net.")
            m = modules[name]
            if isinstance(m, PoolIF):
                h, w = shape[1] // 2, shape[2] // 2
                nodes[name] = nir.AvgPool2d(kernel_size=_pair(2), stride=_pair(2), padding=_pair(0))
                nodes[f"{name}.if"] = nir.IF(r=_full((shape[0], h, w), 1.0 / dt),
                                             v_threshold=_full((shape[0], h, w), POOL_THRESHOLD),
                                             v_reset=_full((shape[0], h, w), 0.0))
                edges += [(srcs[0], name), (name, f"{name}.if")]
                made[fx] = (f"{name}.if", (shape[0], h, w))
            elif isinstance(m, (Conv2d, Linear)):
                nodes[name], out = _synapse_node(m, name, shape)
                edges.append((srcs[0], name))
                if isinstance(m, SpikingNeurons):  # SpikingConv2d / SpikingLinear: the synapse, then LIF neurons
                    nodes[f"{name}.lif"] = _lif_node(name, m.leak, m.v_th, out, dt)
                    # the ResNet shortcut current joins this layer's membrane: a second edge into it
                    edges += [(name, f"{name}.lif")] + [(s, f"{name}.lif") for s in srcs[1:]]
                    made[fx] = (f"{name}.lif", out)
                else:
                    made[fx] = (name, out)
            else:
                raise NIRError(f"{name} ({type(m).__name__}): not a layer the export knows")
        elif fx.op == "call_method" and fx.target == "flatten" and fx.args[1:] in ((2,), (2, -1)):
            nodes[fx.name] = nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0, end_dim=-1)
            edges.append((srcs[0], fx.name))
            made[fx] = (fx.name, (int(np.prod(shape)),))
        elif fx.op == "call_function" and fx.target is operator.getitem and _subsample(fx.args[1]):
            s = _subsample(fx.args[1])
            name = f"{str(next(iter(fx.users)).target).removeprefix('net.')}.shortcut"
            nodes[name] = nir.SumPool2d(kernel_size=_pair(1), stride=_pair(s), padding=_pair(0))
            edges.append((srcs[0], name))
            made[fx] = (name, (shape[0], -(-shape[1] // s), -(-shape[2] // s)))
        elif fx.op == "output":
            classes = shape[0]
            tau = dt / (1.0 - net.leak)  # U ← λ·U + (dt/tau)·R·I with (dt/tau)·R = λ: the paper's λ(U + I)
            nodes["integrator"] = nir.LI(tau=_full((classes,), tau), r=_full((classes,), net.leak / (1.0 - net.leak)),
                                         v_leak=_full((classes,), 0.0))
            nodes["output"] = nir.Output(output_type={"output": np.array((classes,))})
            edges += [(srcs[0], "integrator"), ("integrator", "output")]
        else:
            raise NIRError(f"{type(net).__name__}.step: {fx.format_node()} has no NIR node here")
    if on_off:
        _split_on_off(nodes, edges)
    metadata = dict(dt=dt, time_steps=int(net.time_steps), readout=READOUT, readout_v_th=float(net.v_th),
                    input_code=ON_OFF if on_off else SIGNED, input_scale=float(net.input_scale),
                    input_code_formula="s_t = sign(x) * 1[u_t < |x| * input_scale], u_t ~ U(0, 1) each step"
                    + ("; ON = 1[s_t > 0] and OFF = 1[s_t < 0] as channels [ON, OFF]" if on_off else ""),
                    network=type(net).__name__, source="Lee et al., Front. Neurosci. 14:119 (2020), "
                    "doi 10.3389/fnins.2020.00119; docs/nir.md")
    try:
        return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata)
    except (ValueError, AssertionError) as e:
        raise NIRError(f"the graph of {type(net).__name__} does not type-check in NIR ({e})") from None


def _subsample(index):
    """s for the index (..., ::s, ::s) of the identity shortcut, else None."""
    if isinstance(index, tuple) and len(index) == 3 and index[0] is Ellipsis and \
            all(isinstance(i, slice) and i.start is None and i.stop is None for i in index[1:]) and \
            index[1].step == index[2].step and (index[1].step or 1) > 1:
        return index[1].step
    return None


def _split_on_off(nodes, edges):
    """Signed input spikes s = ON - OFF, so W·s = [W, -W]·[ON, OFF]: the input's consumers get both."""
    for src, dst in edges:
        if src == "input":
            node = nodes[dst]
            if type(node).__name__ != "Conv2d":
                raise NIRError(f"node {dst!r} ({type(node).__name__}) reads the input: ON/OFF input channels "
                               f"need convolutions there")
            nodes[dst] = _nir().Conv2d(input_shape=node.input_shape, weight=np.concatenate(
                [node.weight, -node.weight], axis=1), stride=node.stride, padding=node.padding,
                dilation=node.dilation, groups=1, bias=node.bias)


def on_off_spikes(spike_seq):
    """Signed spikes (T, B, C, ...) as the unsigned channels [ON, OFF] (T, B, 2C, ...) of an on_off export."""
    return torch.cat([(spike_seq > 0), (spike_seq < 0)], dim=2).to(spike_seq.dtype)


# ----------------------------------------------------------------------------------------------
# Files

def write(graph, path, overwrite=False):
    """nir.write through a temp file and a rename: never a half-written file. NIRError (one line) for
    an existing file (unless overwrite) or one that cannot be written."""
    st, why = paths.look(path)
    if st is not None and not stat.S_ISREG(st.st_mode):  # the rename would replace it, a device included
        raise NIRError(f"{path} is {paths.kind(st.st_mode)}: only a regular file is ever replaced")
    if st is None and "loop" in why:
        raise NIRError(f"{path} {why}")
    if os.path.lexists(path) and not overwrite:
        raise NIRError(f"{path} exists: add --overwrite to replace it")
    buffer = io.BytesIO()  # h5py writes through a file that it can also read: build the file in memory
    _nir().write(buffer, graph)
    try:
        atomic_write(path, lambda f: f.write(buffer.getvalue()))
    except WriteError as e:  # "cannot write PATH (why); ..."
        raise NIRError(str(e)) from None


def read(path):
    """nir.read, with NIRError (one line) for a file that is missing or not a NIR graph, or one that
    declares more than a network of this repository can be (nir_checks: before any array is read)."""
    st, why = paths.look(path)
    if st is None or not stat.S_ISREG(st.st_mode):
        raise NIRError(f"{path}: {why}" if st is None and why.startswith("no such") else
                       f"{path} {why}" if st is None else f"{path} is {paths.kind(st.st_mode)}, not a NIR file")
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise NIRError(f"{path} cannot be read ({e.strerror or e})") from None
    if magic != HDF5_MAGIC:
        raise NIRError(f"{path} is not a NIR file (NIR files are HDF5)")
    nir = _nir()
    nir_checks.check_bounds(path, NIRError, {k.__name__ for k in vars(nir).values()
                                             if isinstance(k, type) and issubclass(k, nir.NIRNode)} - {"NIRNode"})
    try:
        return nir.read(path)
    except Exception as e:  # h5py's, and nir's KeyError / AssertionError / ValueError on a foreign layout
        raise NIRError(f"{path} is not a NIR graph nir {_nir().version} can read ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None


def _nir():
    try:
        import nir
    except ImportError:
        raise NIRError("the nir package is not installed: pip install nir (requirements.txt)") from None
    return nir


# ----------------------------------------------------------------------------------------------
# Import

class NIRNetwork(SpikingNetwork):
    """A SpikingNetwork built from a NIR graph by from_nir: our layers, named after the graph's nodes
    (a synapse node's name is its layer's name, so our own files give the scripts' state_dict keys),
    run in the graph's order by `step`."""

    def __init__(self, program, input_node, readout, time_steps=100, leak=0.99, time_chunk=None):
        super().__init__(time_steps, leak, time_chunk)
        # program: (kind, output node, module name, input nodes, stride) in the graph's order
        self.program, self.input_node, self.readout = program, input_node, readout

    def step(self, spike_seq):
        values = {self.input_node: spike_seq}
        for kind, out, name, inputs, extra in self.program:
            x = values[inputs[0]]
            if kind == "layer":  # further inputs: shortcut currents into the membrane
                shortcut = functools.reduce(operator.add, [values[s] for s in inputs[1:]]) if inputs[1:] else None
                values[out] = self.get_submodule(name)(x, shortcut)
            elif kind in ("synapse", "pool"):
                values[out] = self.get_submodule(name)(x)
            elif kind == "flatten":
                values[out] = x.flatten(2)
            else:  # subsample: the identity shortcut with a stride
                values[out] = x[..., ::extra, ::extra]
        return values[self.readout]


def from_nir(graph, dt=None, time_steps=None):
    """A NIRNetwork that runs `graph` (a nir.NIRGraph) in our engine, trainable with the leak-aware
    derivative. dt: the Euler step of the graph's time constants (default: its metadata's dt);
    time_steps: T (default: the metadata's, else 100). NIRError, naming the node, for anything this
    engine cannot run exactly."""
    nir = _nir()
    meta = dict(graph.metadata or {})
    if dt is None and "dt" not in meta:
        raise NIRError("the graph's metadata holds no dt, the Euler step its time constants are stated in")
    dt = _scalar(dt if dt is not None else meta["dt"], "dt")
    if not math.isfinite(dt) or dt <= 0:
        raise NIRError(f"the graph's dt is {dt:g}, not a positive Euler step (its time constants are in units of it)")
    steps = _scalar(time_steps or meta.get("time_steps", 100), "time_steps")
    if not (math.isfinite(steps) and steps == int(steps) and 1 <= steps < 2 ** 63):
        raise NIRError(f"the graph's time_steps is {steps:g}, not a whole number of steps ≥ 1")
    kinds = (nir.Input, nir.Output, nir.Conv2d, nir.Linear, nir.Affine, nir.LIF, nir.IF, nir.LI, nir.AvgPool2d,
             nir.SumPool2d, nir.Flatten)
    for name, node in graph.nodes.items():
        if not isinstance(node, kinds):
            raise NIRError(f"node {name!r} ({type(node).__name__}): not a node kind this engine runs "
                           f"(it runs {', '.join(k.__name__ for k in kinds)})")
    sources = {n: [a for a, b in graph.edges if b == n] for n in graph.nodes}
    users = {n: [b for a, b in graph.edges if a == n] for n in graph.nodes}
    inputs = [n for n, node in graph.nodes.items() if isinstance(node, nir.Input)]
    if len(inputs) != 1:
        fed = [u for n in inputs if n.startswith("input_") for u in users[n]]  # nir adds these for nodes without inputs
        hint = f" (nir adds an Input node for a node without incoming edges: is an edge into {fed[0]!r} missing?)" \
            if fed else ""
        raise NIRError(f"the graph has {len(inputs)} Input nodes{': ' if inputs else ''}"
                       f"{', '.join(map(repr, inputs))}; this engine runs networks with one input{hint}")
    for n in graph.nodes:
        if not isinstance(graph.nodes[n], (nir.Input, nir.LIF)) and len(sources[n]) != 1:
            raise NIRError(f"node {n!r} ({type(graph.nodes[n]).__name__}) has {len(sources[n])} inputs, not one")
    on_off = meta.get("input_code") == ON_OFF
    net_modules, program, readout, leak = {}, [], None, None
    for n in _topological(graph.nodes, graph.edges):
        node = graph.nodes[n]
        src = sources[n]
        if isinstance(node, nir.LIF):
            own = _own_synapse(graph, n, sources[n], users)
            layer = _spiking_layer(graph.nodes[own], own, node, n, dt, on_off and sources[own] == inputs[:1])
            net_modules[own] = layer
            rest = [s for s in sources[n] if s != own]
            program.append(("layer", n, own, [sources[own][0]] + rest, None))
        elif isinstance(node, (nir.Conv2d, nir.Linear, nir.Affine)):
            if len(users[n]) == 1 and isinstance(graph.nodes[users[n][0]], nir.LIF) and \
                    _own_synapse(graph, users[n][0], sources[users[n][0]], users) == n:
                continue  # built with its LIF neurons
            net_modules[n] = _synapse(node, n, on_off and src == inputs)
            program.append(("synapse", n, n, src, None))
        elif isinstance(node, (nir.AvgPool2d, nir.SumPool2d)):
            k, s, p = _ints(node.kernel_size), _ints(node.stride), _ints(node.padding)
            if isinstance(node, nir.SumPool2d) and k == (1, 1) and s[0] == s[1] and p == (0, 0):
                program.append(("subsample", n, None, src, s[0]))
            elif (k, s, p) == ((2, 2), (2, 2), (0, 0)) and [type(graph.nodes[u]) for u in users[n]] == [nir.IF]:
                continue  # built with its IF neurons
            else:
                raise NIRError(f"node {n!r} ({type(node).__name__} kernel {k}, stride {s}, padding {p}): this engine "
                               f"pools 2×2 windows with stride 2 into IF neurons, or subsamples a shortcut")
        elif isinstance(node, nir.IF):
            pool = sources[n][0]
            net_modules[pool] = _pool_neurons(graph.nodes[pool], pool, node, n, dt)
            program.append(("pool", n, pool, sources[pool], None))
        elif isinstance(node, nir.Flatten):
            if node.start_dim != 0 or node.end_dim != -1:
                raise NIRError(f"node {n!r} (Flatten dims {node.start_dim}..{node.end_dim}): this engine flattens "
                               f"all of an image's dimensions (0..-1)")
            program.append(("flatten", n, None, src, None))
        elif isinstance(node, nir.LI):
            if readout is not None or [type(graph.nodes[u]) for u in users[n]] != [nir.Output]:
                raise NIRError(f"node {n!r} (LI): this engine reads out one LI node that feeds the Output")
            leak = _integrator_leak(node, n, dt)
            readout = src[0]
        elif isinstance(node, nir.Output):
            if not isinstance(graph.nodes[sources[n][0]], nir.LI):
                raise NIRError(f"node {n!r} (Output) reads {sources[n][0]!r}, not an LI output integrator")
    if readout is None:
        raise NIRError("the graph has no LI node before its Output: this engine reads out an output integrator")
    net = NIRNetwork(program, inputs[0], readout, time_steps=int(steps), leak=leak)
    for name, m in net_modules.items():
        _add(net, name, m)
    net.input_scale = float(meta.get("input_scale", 1.0))
    net.v_th = float(meta.get("readout_v_th", 1.0))
    return net


def _scalar(value, name):
    """A number from the metadata (h5py gives numpy scalars and arrays); NIRError for anything else."""
    try:
        return float(np.asarray(value, dtype=np.float64).reshape(()))
    except (TypeError, ValueError):
        raise NIRError(f"the graph's {name} is {str(value)[:40]!r}, not a number") from None


def _topological(nodes, edges):
    order, indegree = [], {n: 0 for n in nodes}
    for _, b in edges:
        indegree[b] += 1
    ready = [n for n in nodes if indegree[n] == 0]
    while ready:
        n = ready.pop(0)
        order.append(n)
        for a, b in edges:
            if a == n:
                indegree[b] -= 1
                if indegree[b] == 0:
                    ready.append(b)
    if len(order) != len(nodes):
        raise NIRError(f"the graph has a cycle through {sorted(set(nodes) - set(order))[:3]}: this engine runs "
                       f"feed-forward networks")
    return order


def _own_synapse(graph, lif, sources, users):
    """The weight layer whose neurons `lif` are: its namesake (ours: 'cnn22' -> 'cnn22.lif'), else its
    first weight input that feeds nothing else. Any other inputs are shortcut currents."""
    nir = _nir()
    weights = [s for s in sources if isinstance(graph.nodes[s], (nir.Conv2d, nir.Linear, nir.Affine))
               and users[s] == [lif]]
    if not weights:
        raise NIRError(f"node {lif!r} (LIF): none of its inputs is a weight layer of its own")
    named = [s for s in weights if lif == f"{s}.lif"]
    return (named or weights)[0]


def _uniform(node, name, attr):
    values = np.asarray(getattr(node, attr), dtype=np.float64)
    if values.size == 0 or not np.all(values == values.flat[0]) or not math.isfinite(values.flat[0]):
        raise NIRError(f"node {name!r} ({type(node).__name__}): {attr} differs between neurons (or is not "
                       f"finite); this engine's layers share one value")
    return float(values.flat[0])


def _close(a, b):
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def _lif_params(node, name, dt):
    """(λ, V_th) of a NIR LIF under forward Euler with step dt."""
    tau, r = _uniform(node, name, "tau"), _uniform(node, name, "r")
    for attr in ("v_leak", "v_reset"):
        if _uniform(node, name, attr) != 0.0:
            raise NIRError(f"node {name!r} (LIF): {attr} ≠ 0; this engine's neurons leak to and reset to 0")
    leak = 1.0 - dt / tau
    if not 0.0 < leak < 1.0 or not _close(r * dt / tau, 1.0):
        raise NIRError(f"node {name!r} (LIF): tau = {tau:g}, r = {r:g} at dt = {dt:g} is not v ← λ·v + I with "
                       f"0 < λ < 1 (it needs r = tau/dt)")
    return leak, _uniform(node, name, "v_threshold")


def _integrator_leak(node, name, dt):
    tau, r = _uniform(node, name, "tau"), _uniform(node, name, "r")
    leak = 1.0 - dt / tau
    if _uniform(node, name, "v_leak") != 0.0 or not 0.0 < leak < 1.0 or not _close(r * dt / tau, leak):
        raise NIRError(f"node {name!r} (LI): tau = {tau:g}, r = {r:g} at dt = {dt:g} is not the output integrator "
                       f"U ← λ(U + I) (it needs v_leak = 0 and r = λ/(1-λ))")
    return leak


def _weight(node, name, on_off):
    """The node's weight as float32 (it must hold exactly), with [W, -W] ON/OFF input channels folded."""
    w = np.asarray(node.weight)
    if w.dtype.kind not in "fiu":
        raise NIRError(f"node {name!r} ({type(node).__name__}): weights of type {w.dtype}, not real numbers")
    if not np.isfinite(w).all():
        raise NIRError(f"node {name!r} ({type(node).__name__}): weights that are NaN or infinite")
    if not np.array_equal(w.astype(np.float32).astype(w.dtype), w):
        raise NIRError(f"node {name!r} ({type(node).__name__}): weights that float32 does not hold exactly")
    bias = getattr(node, "bias", None)
    if bias is not None and np.any(np.asarray(bias) != 0):
        raise NIRError(f"node {name!r} ({type(node).__name__}): a non-zero bias; the paper's layers have none")
    w = torch.from_numpy(w.astype(np.float32))
    if on_off:
        c = w.shape[1] // 2
        if w.dim() != 4 or not torch.equal(w[:, c:], -w[:, :c]):
            raise NIRError(f"node {name!r}: an ON/OFF input whose weights are not [W, -W]")
        w = w[:, :c].clone()
    return w


def _conv_args(node, name):
    if int(node.groups) != 1 or any(int(d) != 1 for d in np.broadcast_to(node.dilation, 2)) or \
            isinstance(node.padding, str):
        raise NIRError(f"node {name!r} (Conv2d): groups, dilation or string padding; this engine runs plain "
                       f"convolutions")
    return _ints(node.stride), _ints(node.padding)


def _ints(pair):
    return tuple(int(v) for v in np.broadcast_to(pair, 2))


def _synapse(node, name, on_off=False):
    """A Conv2d or Linear without neurons (a shortcut's, or the output layer's)."""
    w = _weight(node, name, on_off)
    if w.dim() == 4:
        stride, padding = _conv_args(node, name)
        m = Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), stride, padding)
    else:
        m = Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        m.weight.copy_(w)
    return m


def _spiking_layer(synapse, synapse_name, lif, lif_name, dt, on_off=False):
    leak, v_th = _lif_params(lif, lif_name, dt)
    w = _weight(synapse, synapse_name, on_off)
    if w.dim() == 4:
        stride, padding = _conv_args(synapse, synapse_name)
        m = SpikingConv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), stride, padding, leak=leak, v_th=v_th)
    else:
        m = SpikingLinear(w.shape[1], w.shape[0], leak=leak, v_th=v_th)
    with torch.no_grad():
        m.weight.copy_(w)
    return m


def _pool_neurons(pool, pool_name, node, name, dt):
    """PoolIF for AvgPool2d(2, 2) + IF (threshold in [0.75, 1): the same spikes as > 0.75 on quarters),
    or SumPool2d(2, 2) + IF (threshold in [3, 4) on sums of four spikes)."""
    nir = _nir()
    if not isinstance(pool, (nir.AvgPool2d, nir.SumPool2d)):
        raise NIRError(f"node {name!r} (IF): this engine's IF neurons follow a 2×2 pool, not "
                       f"{type(pool).__name__} {pool_name!r}")
    r, v_th = _uniform(node, name, "r"), _uniform(node, name, "v_threshold")
    low, high = (0.75, 1.0) if isinstance(pool, nir.AvgPool2d) else (3.0, 4.0)
    if not _close(r * dt, 1.0) or _uniform(node, name, "v_reset") != 0.0 or not low <= v_th < high:
        raise NIRError(f"node {name!r} (IF): r = {r:g}, v_threshold = {v_th:g}, at dt = {dt:g}: this engine's "
                       f"pooling neurons need r = 1/dt, v_reset = 0 and a threshold in [{low:g}, {high:g})")
    return PoolIF()


def _add(net, path, module):
    """net.<path> = module, with containers for dotted paths ('shortcut1.0': the authors' Sequential)."""
    *parents, leaf = path.split(".")
    owner = net
    try:
        for p in parents:
            if not hasattr(owner, p):
                owner.add_module(p, nn.Sequential())
            owner = getattr(owner, p)
        owner.add_module(leaf, module)
    except (KeyError, TypeError, AttributeError) as e:
        raise NIRError(f"node {path!r}: its name cannot name a layer here ({e})") from None


# ----------------------------------------------------------------------------------------------
# The scripts' --export-nir and --resume FILE.nir

def export_checkpoint(Model, args, given=()):
    """--resume CKPT --export-nir PATH: the script's network with the checkpoint's weights, written to
    PATH as NIR; no data is read. T and λ are the checkpoint's (a --time-steps given replaces T, with a
    note; a --leak that differs is refused: the file would describe another network). Returns the network."""
    ckpt, held = resume_settings(args.resume)
    take_settings(held, args, given, args.resume, refuse=("leak",),
                  why="the file describes the network as trained: drop --leak")
    net = data.network(Model, args)  # --dataset's width and input scale
    if ckpt is None:
        load_into(args.resume, net)
    else:
        load_checkpoint(args.resume, net, ckpt)
    try:
        graph = to_nir(net, tuple(args.image_shape), on_off=args.nir_on_off)
        write(graph, args.export_nir, args.overwrite)
    except NIRError as e:
        raise SystemExit(f"error: --export-nir {e}")
    kinds = ", ".join(sorted({type(n).__name__ for n in graph.nodes.values()}))
    log(args, f"=> wrote {args.export_nir}: {type(net).__name__} as {len(graph.nodes)} NIR nodes ({kinds}), dt {DT:g}, "
        f"T {net.time_steps}, {'ON/OFF' if args.nir_on_off else 'signed'} input spikes")
    return net


def file_settings(path):
    """The network settings a NIR file holds, as a checkpoint's args would: T (its metadata's) and λ (its
    output integrator's). One line (SystemExit) for a file that is not a graph this engine runs."""
    try:
        graph = read(path)
        net = from_nir(graph)
    except NIRError as e:
        raise SystemExit(f"error: --resume {e}" if str(e).startswith(str(path)) else f"error: --resume {path}: {e}")
    return dict(time_steps=int(net.time_steps), leak=float(net.leak))


def load_into(path, net):
    """--resume FILE.nir: the weights of a NIR graph into `net`, which must be the same network (the same
    nodes, edges and neuron parameters as its own export). Returns {} (a file without training state)."""
    arch = type(net).__name__
    try:
        graph = read(path)
    except NIRError as e:
        raise SystemExit(f"error: --resume {e}")
    try:
        other = from_nir(graph, time_steps=net.time_steps)
        shape = tuple(int(s) for s in graph.nodes[other.input_node].input_type["input"])
        on_off = graph.metadata.get("input_code") == ON_OFF
        try:
            own = to_nir(net, (shape[0] // 2 if on_off else shape[0], *shape[1:]), on_off=on_off)
        except NIRError:
            raise NIRError(f"not a {arch}: its input has shape {shape}") from None
        _same_network(own, graph, arch)
        mine = dict(net.neuron_layers())
        for name, m in other.neuron_layers():
            if m.leak != mine[name].leak:
                raise NIRError(f"layer {name!r} has λ = {m.leak:g} in the file, and {mine[name].leak:g} in {arch}")
            if m.v_th != mine[name].v_th:
                raise NIRError(f"layer {name!r} has the threshold V_th = {m.v_th:g} in the file, and "
                               f"{mine[name].v_th:g} in {arch}")
        if other.input_scale != net.input_scale or other.leak != net.leak:
            raise NIRError(f"its input scale {other.input_scale:g} and output leak {other.leak:g} are "
                           f"{net.input_scale:g} and {net.leak:g} in {arch}")
    except NIRError as e:
        raise SystemExit(f"error: --resume {path}: {e}")
    net.load_state_dict(other.state_dict())
    return {}


def _same_network(own, graph, arch):
    """NIRError naming the first node in which `graph` differs from `own`, our export of the network."""
    for name in list(own.nodes) + [n for n in graph.nodes if n not in own.nodes]:
        a, b = own.nodes.get(name), graph.nodes.get(name)
        if type(a) is not type(b):
            found = f"a {type(b).__name__}" if b is not None else "no node"
            raise NIRError(f"not a {arch}: node {name!r} is {found} in the file, {type(a).__name__} in {arch}")
        shape_a, shape_b = (getattr(n, "weight", np.empty(0)).shape for n in (a, b))
        if shape_a != shape_b:
            raise NIRError(f"not a {arch}: node {name!r} has weights {shape_b} in the file, {shape_a} in {arch}")
    if set(own.edges) != set(graph.edges):
        diff = sorted(set(own.edges) ^ set(graph.edges))[0]
        raise NIRError(f"not a {arch}: the edge {diff[0]!r} → {diff[1]!r} is in one of the two graphs only")

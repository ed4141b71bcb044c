"""Sparse computation: spike counts, synaptic operations, energy, latency, and their tables and plots.

The paper's second claim is that a trained network computes sparsely (Lee et al. 2020, Section 4).
`SpikeStats` counts, during an evaluation pass, every weight layer's input spikes and every neuron
layer's spikes; `summary()` turns them into the per-sample figures of stats.json (docs/sparsity.md).
The plots are matplotlib Figures; the last section writes them, and stats.json, each atomically.
"""
import csv
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure  # no pyplot: no global backend state, renders headless (Agg)

from checkpoints import atomic_write


# ----------------------------------------------------------------------------------------------
# Counting

# Energy per operation in 45 nm CMOS, 32-bit float: M. Horowitz, "Computing's energy problem (and what we
# can do about it)", ISSCC 2014; the figures used by the Panda/Roy-group SNN papers.
AC_PJ, MAC_PJ = 0.9, 4.6
ENERGY_SOURCE = "Horowitz, ISSCC 2014, 45 nm: AC 0.9 pJ, MAC 4.6 pJ"


def fan_out(layer, in_shape):
    """Synapses each input neuron drives, per input position, and the layer's MACs as an ANN (one pass).

    in_shape is one sample's input, (C, H, W) or (F,). A conv is padding- and stride-aware: a spike at the
    border reaches fewer outputs. ANN MACs are the closed form C_out·H_out·W_out·C_in·kh·kw (or in·out)."""
    if isinstance(layer, nn.Linear):
        return torch.full(in_shape, float(layer.out_features), dtype=torch.float64), layer.weight.numel()
    ones_w = torch.ones(layer.weight.shape, dtype=torch.float64)
    x = torch.zeros(1, *in_shape, dtype=torch.float64)
    out = F.conv2d(x, ones_w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    # the gradient of an all-ones output w.r.t. the input counts the (output, kernel offset) pairs per input
    fan = torch.nn.grad.conv2d_input(x.shape, ones_w, torch.ones_like(out), layer.stride, layer.padding,
                                     layer.dilation, layer.groups)
    return fan[0], out.numel() * layer.weight[0].numel()


class SpikeStats:
    """Exact spike and synaptic-operation counts of every forward pass of `model` inside `with SpikeStats(model)`.

    A forward pre-hook on each weight layer (nn.Conv2d/nn.Linear, shortcut convs and the first layer
    included) sums its input spikes per input position; a forward hook on the model adds up each neuron
    layer's spike counts over the window. Hooks only read, so the outputs are unchanged. Counts stay on the
    device (no sync per batch); under torchrun `gather()` sums them over the ranks. ResNet11's block-4
    shortcut is an identity subsample with no weights, so no synapses: it adds no synops (its spikes are
    counted once, as inputs of cnn51)."""

    def __init__(self, model):
        self.model, self.modules = model, dict(model.named_modules())
        self.order = []      # layer names in the order they first ran: network order (ResNet shortcuts too)
        self.inputs = {}     # name -> input spikes per input position, summed over steps and samples
        self.spikes = {}     # name -> spikes of the neuron layer, summed over neurons, steps and samples
        self.neurons = {}    # name -> neurons of the layer, per sample
        self.samples, self.time_steps, self._handles = 0, 0, []

    def __enter__(self):
        for name, m in self.modules.items():
            if isinstance(m, (nn.Conv2d, nn.Linear)) or hasattr(m, "spike_count"):
                self._handles.append(m.register_forward_pre_hook(self._pre_hook(name, m)))
        self._handles.append(self.model.register_forward_hook(self._after_forward))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre_hook(self, name, module):
        def hook(_, args):
            if name not in self.order:
                self.order.append(name)
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                count = args[0].ne(0).sum((0, 1))  # (k, B, ...) chunk -> spikes per input position
                self.inputs[name] = self.inputs[name] + count if name in self.inputs else count
        return hook

    def _after_forward(self, model, args, output):
        x = args[0]  # images (B, C, H, W), Poisson-encoded inside, or a spike train (T, B, ...)
        T, B = (model.time_steps, x.shape[0]) if x.dim() == 4 else x.shape[:2]
        self.samples, self.time_steps = self.samples + B, T
        for name, m in model.neuron_layers():
            if m.spike_count is not None:  # None: a layer this forward pass did not run
                self.spikes[name] = self.spikes.get(name, 0) + m.spike_count.double().sum()
                self.neurons[name] = m.spike_count[0].numel()

    def gather(self):
        """Sum the counts of all torchrun ranks (each saw its own share of the test set) into every rank.
        One all_gather of small CPU tensors, after the pass; a rank that saw no batch adds nothing."""
        mine = dict(order=self.order, inputs={k: v.cpu() for k, v in self.inputs.items()},
                    spikes={k: float(v) for k, v in self.spikes.items()}, neurons=self.neurons,
                    samples=self.samples, time_steps=self.time_steps)
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        self.order = max((p["order"] for p in parts), key=len)
        self.samples, self.time_steps = sum(p["samples"] for p in parts), max(p["time_steps"] for p in parts)
        self.inputs, self.spikes, self.neurons = {}, {}, {}
        for p in parts:
            for k, v in p["inputs"].items():
                self.inputs[k] = self.inputs[k] + v if k in self.inputs else v
            for k, v in p["spikes"].items():
                self.spikes[k] = self.spikes.get(k, 0.0) + v
            self.neurons.update(p["neurons"])

    def summary(self):
        """The stats.json dict (less accuracy): per-layer entries in network order, totals, energy."""
        n, T, layers = max(self.samples, 1), self.time_steps, []
        for name in self.order:
            entry = {"name": name}
            if name in self.spikes:
                per_neuron = float(self.spikes[name]) / (n * self.neurons[name])
                entry.update(neurons=self.neurons[name], spikes_per_neuron=per_neuron, rate=per_neuron / T)
            if name in self.inputs:
                fan, macs = fan_out(self.modules[name], tuple(self.inputs[name].shape))
                entry.update(synops=(self.inputs[name].cpu().double() * fan).sum().item() / n, ann_macs=macs)
            layers.append(entry)
        synops = sum(l.get("synops", 0.0) for l in layers)
        macs = sum(l.get("ann_macs", 0) for l in layers)
        totals = dict(neurons=sum(l.get("neurons", 0) for l in layers),
                      spikes=sum(l.get("neurons", 0) * l.get("spikes_per_neuron", 0.0) for l in layers),
                      synops=synops, ann_macs=macs, synops_per_ann_mac=synops / max(macs, 1))
        snn_uj, ann_uj = synops * AC_PJ * 1e-6, macs * MAC_PJ * 1e-6
        energy = dict(ac_pj=AC_PJ, mac_pj=MAC_PJ, snn_uj=snn_uj, ann_uj=ann_uj,
                      ann_over_snn=ann_uj / snn_uj if snn_uj else None, source=ENERGY_SOURCE)
        result = dict(layers=layers, totals=totals, energy=energy, time_steps=T, samples=self.samples)
        if self.spikes and totals["spikes"] == 0:
            mark_undefined(result, "no neuron spiked")
        elif not snn_uj:
            energy["undefined"] = "no synaptic operations"
        return result


def mark_undefined(result, why):
    """The ratios of a network that computed nothing (no spike, or no answer) are undefined, not an
    advantage: the synops per ANN MAC and ANN/SNN energy become None (null in stats.json), with `why`."""
    result["totals"]["synops_per_ann_mac"] = None
    result["energy"].update(ann_over_snn=None, undefined=why)


# ----------------------------------------------------------------------------------------------
# Tables

def format_stats_table(stats):
    """The per-layer table, totals and energy lines, as printed by --stats."""
    lines = [f"=> spike statistics over T = {stats['time_steps']} steps, {stats['samples']} samples (per sample)",
             f"{'layer':<12}{'neurons':>10}{'spikes/neuron':>15}{'rate':>9}{'synops':>16}{'ANN MACs':>15}"
             f"{'ratio':>9}"]
    for l in stats["layers"]:
        row = f"{l['name']:<12}"
        row += f"{l['neurons']:>10,}{l['spikes_per_neuron']:>15.3f}{l['rate']:>9.4f}" if "neurons" in l else " " * 34
        if "synops" in l:
            row += f"{l['synops']:>16,.0f}{l['ann_macs']:>15,}{l['synops'] / l['ann_macs']:>9.3f}"
        lines.append(row.rstrip())
    t, e = stats["totals"], stats["energy"]
    ratio = f"{'undefined':>10}" if t["synops_per_ann_mac"] is None else f"{t['synops_per_ann_mac']:>9.3f}"
    lines.append(f"{'total':<12}{t['neurons']:>10,}{'':>24}{t['synops']:>16,.0f}{t['ann_macs']:>15,}{ratio}")
    saving = f"undefined ({e.get('undefined', 'no synaptic operations')})" if e["ann_over_snn"] is None \
        else f"{e['ann_over_snn']:.2f}x"
    lines.append(f"=> energy per sample: SNN {e['snn_uj']:.3f} uJ (synops × {e['ac_pj']} pJ), ANN {e['ann_uj']:.3f} "
                 f"uJ (MACs × {e['mac_pj']} pJ), ANN/SNN {saving}")
    lines.append(f"   ({e['source']}; arithmetic only: memory access and neuron updates are not counted)")
    return "\n".join(lines)


def time_sweep_table(steps, prec1s):
    """Accuracy read out after each number of time steps: the latency/accuracy trade-off."""
    return "\n".join(["=> accuracy vs time steps", f"{'steps':>6}{'Prec@1':>9}"]
                     + [f"{t:>6}{p:>9.3f}" for t, p in zip(steps, prec1s)])


# ----------------------------------------------------------------------------------------------
# Plots (Figures; save_figure below writes them)

def plot_spike_rates(stats):
    """Bar chart: firing rate per step of each spiking and pooling neuron layer."""
    named = [(l["name"], l["rate"]) for l in stats["layers"] if "rate" in l]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.bar([n for n, _ in named], [r for _, r in named], color="tab:blue")
    ax.set(xlabel="layer", ylabel="spikes per neuron per step", title=f"Firing rates (T = {stats['time_steps']})")
    ax.tick_params(axis="x", labelrotation=45)
    return fig


def plot_time_sweep(steps, prec1s):
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(steps, prec1s, "o-")
    ax.set(xlabel="time steps", ylabel="Prec@1 (%)", title="Accuracy vs time steps")
    ax.grid(alpha=0.3)
    return fig


def plot_training_curves(csv_path):
    """Accuracy and loss vs epoch from the run's CSV log; missing columns are left out (None if none)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))

    def column(key):  # empty cells (a column added on resume) become NaN: a gap in the curve
        return [float(r[key]) if r.get(key) not in (None, "") else math.nan for r in rows]

    panels = [("Prec@1 (%)", ["train_prec1", "test_prec1"]), ("loss", ["train_loss", "test_loss"])]
    panels = [(label, [k for k in keys if rows and k in rows[0]]) for label, keys in panels]
    panels = [(label, keys) for label, keys in panels if keys]
    if not panels:
        return None
    epochs = column("epoch") if "epoch" in rows[0] else list(range(1, len(rows) + 1))
    fig = Figure(figsize=(5 * len(panels), 3.5))
    for ax, (label, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for k in keys:
            ax.plot(epochs, column(k), "o-", label=k, markersize=3)
        ax.set(xlabel="epoch", ylabel=label)
        ax.legend()
        ax.grid(alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------------
# Files

def write_stats_json(result, out_dir):
    """stats.json, strict JSON: a value that is undefined (non-finite) is written as null."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "stats.json")
    text = json.dumps(_finite_or_none(result), indent=1, allow_nan=False)
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_figure(fig, path):
    if fig is None:
        return None
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    return path


def save_stats_outputs(result, out_dir):
    """stats.json and the PNGs in out_dir (a run's is --out-dir/stats_<tag>); returns the text to print
    (tables and the files written)."""
    text, files = [], [write_stats_json(result, out_dir)]  # creates out_dir
    if "layers" in result:
        text.append(format_stats_table(result))
        files.append(save_figure(plot_spike_rates(result), os.path.join(out_dir, "spike_rates.png")))
    if "time_sweep" in result:
        sweep = result["time_sweep"]
        text.append(time_sweep_table(sweep["steps"], sweep["prec1"]))
        files.append(save_figure(plot_time_sweep(sweep["steps"], sweep["prec1"]),
                                 os.path.join(out_dir, "time_sweep.png")))
    text.append("=> wrote " + ", ".join(f for f in files if f))
    return "\n".join(text)

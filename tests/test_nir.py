"""NIR export and import (nir_exchange.py, docs/nir.md).

The exported file, read back with nir.read and run by code that is not ours (snnTorch 1.0's neurons,
wired by nirtorch.nir_to_torch), gives our engine's spikes in every layer and its output, on the same
input spike trains; the shipped Fashion-MNIST LeNet predicts the same 256 test images there at T = 100.
Our files import back (from_nir) to the same state_dict and outputs; what from_nir cannot run exactly,
and each bad input of --export-nir and --resume FILE.nir, is one line.
"""
import gzip
import os
import tracemalloc

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

import nir
import nirtorch
import snntorch as snn
from snntorch import import_nir as snntorch_import

import nir_checks
import nir_exchange
import utils
from conftest import NETWORKS, exit_message, network, run_main

PRETRAINED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pretrained",
                          "lenet_fashion_T20.pth.tar")
# fresh weights times these gains fire in every layer within T = 8 steps (asserted below)
GAINS = {"mnist_LeNet.py": 1.0, "cifar10_VGG9.py": 2.0, "cifar10_ResNet11.py": 2.0, "svhn_ResNet.py": 2.0}
T, B = 8, 2


# ----------------------------------------------------------------------------------------------
# The independent simulator

class _Readout(nn.Module):
    """NIR's LI in snnTorch: a Leaky neuron that never resets, fed the LI's input gain r·dt/tau; its
    membrane is the output."""

    def __init__(self, node, dt):
        super().__init__()
        self.gain = float(np.unique(node.r * dt / node.tau)[0])
        self.leaky = snn.Leaky(beta=torch.from_numpy(1 - dt / node.tau), reset_mechanism="none", threshold=1e30,
                               init_hidden=True, reset_delay=False)

    def forward(self, current):
        self.leaky(self.gain * current)
        return self.leaky.mem


def _pool_neurons(node, dt):
    """NIR's IF in snnTorch. The 1.0.0 wheel maps IF to Leaky(beta=0.9), a leaking neuron, and asserts
    r == 1 (snnTorch #416); this is the neuron NIR states: no leak, input r·dt (= 1 here), hard reset."""
    assert np.allclose(node.r * dt, 1.0) and not node.v_reset.any()
    return snn.Leaky(beta=1.0, threshold=float(np.unique(node.v_threshold)[0]), reset_mechanism="zero",
                     init_hidden=True, reset_delay=False)


def snntorch_network(graph):
    """graph in snnTorch: snnTorch's importer maps Conv2d, Linear, AvgPool2d and LIF (to Leaky with
    beta = 1 - dt/tau, dt = 1e-4, reset to zero), nirtorch wires the graph (a node with two inputs
    sums them), and three nodes are mapped here: IF (see _pool_neurons), LI (the importer has none),
    and Flatten, whose start_dim the importer passes to torch.nn.Flatten unshifted, so that it would
    also flatten the batch (NIR's dimensions exclude it)."""
    dt = float(graph.metadata["dt"])
    theirs = {kind: (lambda node: snntorch_import._nir_to_snntorch_module(node, init_hidden=True))
              for kind in (nir.Conv2d, nir.Linear, nir.AvgPool2d, nir.LIF)}
    ours = {nir.IF: lambda node: _pool_neurons(node, dt), nir.LI: lambda node: _Readout(node, dt),
            nir.Flatten: lambda node: nn.Flatten(node.start_dim + 1, node.end_dim)}
    return nirtorch.nir_to_torch(graph, {**theirs, **ours})


def run_snntorch(graph, spike_seq, record=True):
    """(spikes of each neuron node (T, B, ...) if record, readout U(T) / V_th / T) of graph in snnTorch."""
    module = snntorch_network(graph)
    spikes = {}
    for name, m in module.named_modules():
        if record and isinstance(m, snn.Leaky) and name.endswith(("_lif", "_if")):
            m.register_forward_hook(lambda m, i, out, name=name: spikes.setdefault(name, []).append(out))
    state = None
    with torch.no_grad():
        for t in range(len(spike_seq)):
            u, state = module(spike_seq[t], state)
    return {n: torch.stack(s) for n, s in spikes.items()}, u / float(graph.metadata["readout_v_th"]) / len(spike_seq)


def run_ours(net, spike_seq):
    """(spikes of each neuron layer (T, B, ...), the output) in our engine."""
    spikes = {}
    hooks = [m.register_forward_hook(lambda m, i, out, name=name: spikes.setdefault(name, []).append(out.clone()))
             for name, m in net.neuron_layers()]
    with torch.no_grad():
        out = net(spike_seq)
    for h in hooks:
        h.remove()
    return {n: torch.cat(s) for n, s in spikes.items()}, out


def input_spikes(net, script, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand((B, *NETWORKS[script][2]), generator=g)
    if NETWORKS[script][2][0] == 3:  # normalised CIFAR-10/SVHN images: negative pixels too
        images = 3 * images - 1.5
    return net.encode(images, generator=g)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """script -> (fresh network times its gain, its NIR file), each written once for the module."""
    made = {}

    def get(script, on_off=False):
        if (script, on_off) not in made:
            torch.manual_seed(0)
            net = network(script, time_steps=T, dropout=0.0)[0].eval()
            with torch.no_grad():
                for p in net.parameters():
                    p.mul_(GAINS[script])
            path = str(tmp_path_factory.mktemp("nir") / f"{script[:-3]}{'_onoff' if on_off else ''}.nir")
            nir_exchange.write(nir_exchange.to_nir(net, NETWORKS[script][2], on_off=on_off), path)
            made[script, on_off] = net, path
        return made[script, on_off]
    return get


# ----------------------------------------------------------------------------------------------
# Export: the same spikes in snnTorch

@pytest.mark.parametrize("script, on_off", [("mnist_LeNet.py", False), ("cifar10_VGG9.py", False),
                                            ("cifar10_ResNet11.py", False), ("mnist_LeNet.py", True),
                                            ("cifar10_VGG9.py", True)])  # ON/OFF: the VGG9 input has OFF spikes
def test_snntorch_runs_the_file_spike_for_spike(exported, script, on_off):
    net, path = exported(script, on_off)
    graph = nir.read(path)
    spike_seq = input_spikes(net, script)
    ours, out = run_ours(net, spike_seq)
    theirs, readout = run_snntorch(graph, nir_exchange.on_off_spikes(spike_seq) if on_off else spike_seq)
    for name, s in ours.items():
        node = name.replace(".", "_") + ("_if" if name.startswith("pool") else "_lif")
        assert s.sum() > 0, f"{name} is silent: the comparison would prove nothing"
        assert torch.equal(theirs[node], s), f"{name}: {(theirs[node] != s).sum().item()} spikes differ"
    assert len(theirs) == len(ours)
    # the integrator's float32 sums round in another order (λU + λI against λ(U + I)): equal to rounding
    torch.testing.assert_close(readout, out, rtol=1e-5, atol=1e-6)
    assert torch.equal(readout.argmax(1), out.argmax(1))


def fashion_mnist_test_images(folder, n):
    """The first n test images as torchvision's ToTensor gives them, read from the Debian package."""
    with gzip.open(os.path.join(folder, "t10k-images-idx3-ubyte.gz")) as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16)[:n * 784].copy()
    return torch.from_numpy(pixels).view(n, 1, 28, 28).float().div(255)


def test_shipped_lenet_predicts_the_same_in_snntorch(fashion_mnist, tmp_path):
    """The shipped Fashion-MNIST LeNet, exported by the CLI, on the first 256 test images at T = 100."""
    from mnist_LeNet import DEFAULTS, LeNet
    path = str(tmp_path / "lenet.nir")
    net = utils.main(LeNet, DEFAULTS, ("mnist", "fashion-mnist"),
                     argv=["--resume", PRETRAINED, "--export-nir", path, "--dataset", "fashion-mnist",
                           "--time-steps", "100"]).eval()  # T = 20 (the checkpoint's) unless given
    torch.manual_seed(0)
    spike_seq = net.encode(fashion_mnist_test_images(fashion_mnist, 256))  # (100, 256, 1, 28, 28)
    with torch.no_grad():
        ours = net(spike_seq)
    theirs = run_snntorch(nir.read(path), spike_seq, record=False)[1]
    assert torch.equal(theirs.argmax(1), ours.argmax(1))


def test_export_states_the_network(exported):
    graph = nir.read(exported("cifar10_ResNet11.py")[1])
    m = graph.metadata
    assert (m["dt"], m["time_steps"], m["input_code"], m["input_scale"]) == (1e-4, T, "signed_poisson", 1.0)
    assert ("shortcut1.0", "cnn22.lif") in graph.edges and ("cnn22", "cnn22.lif") in graph.edges
    assert ("cnn52.shortcut", "cnn52.lif") in graph.edges
    assert tuple(graph.nodes["input"].input_type["input"]) == (3, 32, 32)
    assert tuple(graph.nodes["output"].output_type["output"]) == (10,)
    lif = graph.nodes["cnn32.lif"]
    assert lif.tau.shape == (256, 8, 8) and np.allclose(1 - 1e-4 / lif.tau, 0.99) and (lif.v_threshold == 1).all()
    assert tuple(graph.nodes["cnn32"].stride) == (2, 2) and tuple(graph.nodes["cnn32"].padding) == (1, 1)
    lenet = nir.read(exported("mnist_LeNet.py", on_off=True)[1])
    w = lenet.nodes["cnn1"].weight
    assert w.shape == (20, 2, 5, 5) and np.array_equal(w[:, 1], -w[:, 0])
    assert lenet.metadata["input_code"] == "on_off_poisson" and lenet.metadata["input_scale"] == 0.5


# ----------------------------------------------------------------------------------------------
# Import

@pytest.mark.parametrize("script", ["mnist_LeNet.py", "cifar10_VGG9.py", "cifar10_ResNet11.py"])  # ResNet7: below
def test_our_files_import_to_the_same_network(exported, script):
    for on_off in (False, True) if script == "mnist_LeNet.py" else (False,):
        net, path = exported(script, on_off)
        back = nir_exchange.from_nir(nir_exchange.read(path)).eval()
        mine, theirs = net.state_dict(), back.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert (back.time_steps, back.input_scale, back.leak) == (net.time_steps, net.input_scale, net.leak)
        again = nir_exchange.to_nir(back, NETWORKS[script][2], on_off=on_off)  # and it exports as it came
        assert set(again.edges) == set(nir.read(path).edges) and again.nodes.keys() == nir.read(path).nodes.keys()
        spike_seq = input_spikes(net, script, seed=1)
        with torch.no_grad():
            assert torch.equal(back(spike_seq), net(spike_seq))


def lenet_graph():
    net = network("mnist_LeNet.py", time_steps=T)[0]
    return nir_exchange.to_nir(net, (1, 28, 28))


def _replace(graph, name, node):
    graph.nodes[name] = node
    return graph


def _lif(graph, name, **change):
    n = graph.nodes[name]
    kw = dict(tau=n.tau, r=n.r, v_leak=n.v_leak, v_threshold=n.v_threshold, v_reset=n.v_reset)
    return _replace(graph, name, nir.LIF(**{**kw, **change}))


def _cuba(g):
    n = g.nodes["cnn1.lif"]
    return _replace(g, "cnn1.lif", nir.CubaLIF(tau_syn=n.tau, tau_mem=n.tau, r=n.r, v_leak=n.v_leak,
                                               v_threshold=n.v_threshold))


def _biased(g):
    n = g.nodes["cnn1"]
    return _replace(g, "cnn1", nir.Conv2d(input_shape=n.input_shape, weight=n.weight, stride=n.stride,
                                          padding=n.padding, dilation=n.dilation, groups=1,
                                          bias=np.full(20, 0.1, np.float32)))


def _tau_varies(g):
    tau = g.nodes["cnn2.lif"].tau.copy()
    tau[0] *= 2
    return _lif(g, "cnn2.lif", tau=tau)


CANNOT = {
    "a CubaLIF": (_cuba, "'cnn1.lif' (CubaLIF)"),
    "a leak to a non-zero potential": (lambda g: _lif(g, "fc0.lif", v_leak=g.nodes["fc0.lif"].v_leak + 0.1),
                                       "'fc0.lif'"),
    "a time constant per neuron": (_tau_varies, "'cnn2.lif'"),
    "a conv bias": (_biased, "'cnn1'"),
    "an input gain other than 1": (lambda g: _lif(g, "cnn1.lif", r=g.nodes["cnn1.lif"].r * 2), "'cnn1.lif'"),
    "a pooling threshold with other spikes": (lambda g: _replace(g, "pool1.if", nir.IF(
        r=g.nodes["pool1.if"].r, v_threshold=np.ones_like(g.nodes["pool1.if"].r))), "'pool1.if'"),
    "an integrator U ← λU + I": (lambda g: _replace(g, "integrator", nir.LI(
        tau=g.nodes["integrator"].tau, r=g.nodes["integrator"].tau / 1e-4, v_leak=g.nodes["integrator"].v_leak)),
        "'integrator'"),
    "float64 weights": (lambda g: _replace(g, "fc1", nir.Linear(weight=g.nodes["fc1"].weight.astype(np.float64)
                                                                 + 1e-12)), "'fc1'"),
}


def refusal(edit):
    """The one line from_nir refuses the shipped LeNet's graph with, once `edit` has changed it."""
    with pytest.raises(nir_exchange.NIRError) as e:
        nir_exchange.from_nir(edit(lenet_graph()))
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.parametrize("change", CANNOT)
def test_what_from_nir_cannot_run_is_one_line_naming_the_node(change):
    edit, phrase = CANNOT[change]
    message = refusal(edit)
    assert phrase in message, message


def test_from_nir_runs_the_equivalent_forms_of_our_nodes():
    """Sum pooling into IF neurons with a threshold in [3, 4), and Affine with a zero bias: the same network."""
    net = network("mnist_LeNet.py", time_steps=T)[0].eval()
    graph = nir_exchange.to_nir(net, (1, 28, 28))
    graph.nodes["pool2"] = nir.SumPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]), padding=np.array([0, 0]))
    graph.nodes["pool2.if"] = nir.IF(r=graph.nodes["pool2.if"].r, v_threshold=np.full((50, 7, 7), 3.5))
    graph.nodes["fc0"] = nir.Affine(weight=graph.nodes["fc0"].weight, bias=np.zeros(200, np.float32))
    back = nir_exchange.from_nir(graph).eval()
    spike_seq = input_spikes(net, "mnist_LeNet.py")
    with torch.no_grad():
        assert torch.equal(back(spike_seq), net(spike_seq))


def test_from_nir_needs_a_dt():
    graph = lenet_graph()
    del graph.metadata["dt"]
    with pytest.raises(nir_exchange.NIRError, match="dt"):
        nir_exchange.from_nir(graph)
    assert nir_exchange.from_nir(graph, dt=1e-4).leak == 0.99


# ----------------------------------------------------------------------------------------------
# The CLI

@pytest.fixture
def checkpoint(tmp_path):
    net = network("mnist_LeNet.py", time_steps=2)[0]
    path = tmp_path / "lenet.pth.tar"
    torch.save({"epoch": 1, "arch": "lenet", "state_dict": net.state_dict(), "best_prec1": 10.0}, path)
    return str(path), net.state_dict()


@pytest.mark.parametrize("script", list(NETWORKS))
def test_every_script_exports_from_the_cli(script, tmp_path, capsys):
    net = network(script, time_steps=2)[0]
    checkpoint, path = tmp_path / "net.pth.tar", tmp_path / "net.nir"
    torch.save({"state_dict": net.state_dict()}, checkpoint)
    run_main(script, ["--resume", checkpoint, "--export-nir", path])
    assert f"=> wrote {path}" in capsys.readouterr().out
    back = nir_exchange.from_nir(nir.read(path)).state_dict()
    assert back.keys() == net.state_dict().keys() and all(torch.equal(v, back[k]) for k, v in net.state_dict().items())
    with pytest.raises(SystemExit):
        run_main(script, ["--help"])
    assert "--export-nir PATH" in capsys.readouterr().out


def test_export_nir_then_resume_from_it(checkpoint, tmp_path, tiny, tiny_eval):
    path = str(tmp_path / "lenet.nir")
    run_main("mnist_LeNet.py", ["--resume", checkpoint[0], "--export-nir", path, "--nir-on-off"])
    assert nir.read(path).nodes["input"].input_type["input"][0] == 2  # ON and OFF
    net = run_main("mnist_LeNet.py", ["--resume", path, "--evaluate"] + tiny_eval)  # weights from the NIR file
    assert all(torch.equal(v, checkpoint[1][k]) for k, v in net.state_dict().items())
    net = run_main("mnist_LeNet.py", ["--resume", path, "--epochs", "1", "--out-dir", tmp_path] + tiny)  # fine-tune
    assert os.path.exists(tmp_path / "checkpointT1_mnist1.pth.tar")
    assert not torch.equal(net.state_dict()["cnn1.weight"], checkpoint[1]["cnn1.weight"])


def test_export_nir_without_resume(run_script, clean_error, tmp_path):
    p = run_script("mnist_LeNet.py", "--export-nir", tmp_path / "x.nir")
    clean_error(p, "--export-nir", "--resume", code=2)
    assert not os.listdir(tmp_path)


def test_export_nir_to_an_unwritable_path(checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    code, message = exit_message("mnist_LeNet.py", ["--resume", checkpoint[0], "--export-nir", blocker / "x.nir"])
    assert code == 1 and "cannot write" in message, message
    assert sorted(os.listdir(tmp_path)) == ["file", "lenet.pth.tar"]  # no temp file left either
    code, message = exit_message("mnist_LeNet.py", ["--resume", checkpoint[0], "--export-nir", tmp_path, "--overwrite"])
    assert code == 1 and "is a directory: a run writes regular files only" in message, message
    assert sorted(os.listdir(tmp_path)) == ["file", "lenet.pth.tar"]


def test_export_nir_over_an_existing_file(checkpoint, tmp_path):
    path = tmp_path / "old.nir"
    path.write_bytes(b"previous")
    code, message = exit_message("mnist_LeNet.py", ["--resume", checkpoint[0], "--export-nir", path])
    assert code == 1 and "--overwrite" in message and path.read_bytes() == b"previous"
    run_main("mnist_LeNet.py", ["--resume", checkpoint[0], "--export-nir", path, "--overwrite"])
    assert type(nir.read(path).nodes["cnn1.lif"]).__name__ == "LIF"


def test_resume_from_a_file_that_is_not_nir(tmp_path, tiny_eval):
    path = tmp_path / "x.nir"
    path.write_bytes(b"not HDF5")
    code, message = exit_message("mnist_LeNet.py", ["--resume", path, "--evaluate"] + tiny_eval)
    assert code == 1 and "is not a NIR file" in message, message
    with h5py.File(path, "w") as f:  # HDF5, but not NIR's layout
        f["x"] = 1
    code, message = exit_message("mnist_LeNet.py", ["--resume", path, "--evaluate"] + tiny_eval)
    assert code == 1 and "is not a NIR graph" in message, message


@pytest.mark.parametrize("what", ["a CubaLIF", "another network"])
def test_resume_from_a_nir_file_we_cannot_run(tmp_path, tiny_eval, exported, what):
    path = str(tmp_path / "x.nir")
    if what == "a CubaLIF":
        nir_exchange.write(_cuba(lenet_graph()), path)
        phrase = "'cnn1.lif' (CubaLIF)"
    else:
        path, phrase = exported("cifar10_VGG9.py")[1], "not a LeNet"
    code, message = exit_message("mnist_LeNet.py", ["--resume", path, "--evaluate"] + tiny_eval)
    assert code == 1 and phrase in message, message


# ----------------------------------------------------------------------------------------------
# Untrusted files: bounded before any array is read, recognised by content, refused in lines that say why

def lenet_file(path, edit=None):
    """Our LeNet export at `path`; edit(h5py.File) then changes its HDF5 layout in place."""
    nir_exchange.write(lenet_graph(), str(path))
    if edit:
        with h5py.File(path, "r+") as f:
            edit(f)
    return str(path)


def _huge_weight(f):
    del f["node/nodes/fc0/weight"]  # 40000² float32, declared in chunks and never written: a 6 GB array
    f["node/nodes/fc0"].create_dataset("weight", shape=(40000, 40000), dtype="f4", chunks=(1000, 1000),
                                       compression="gzip")


def _many_nodes(f):
    for i in range(nir_checks.MAX_NODES):
        f["node/nodes"].create_group(f"extra{i}")["type"] = b"Input"


def _unknown_type(f):
    del f["node/nodes/cnn1/type"]
    f["node/nodes/cnn1/type"] = b"Mystery"


BEYOND = {"a weight beyond any of ours": (_huge_weight, "node/nodes/fc0/weight declares 40000×40000 numbers"),
          "more nodes than any of ours": (_many_nodes, f"declares {nir_checks.MAX_NODES + 15} nodes"),
          "a node type nir does not know": (_unknown_type, "node 'cnn1' has the type 'Mystery', not a NIR node kind")}


@pytest.mark.parametrize("what", BEYOND)
def test_a_file_beyond_our_networks_is_refused_before_its_arrays_are_read(what, tmp_path):
    edit, phrase = BEYOND[what]
    path = lenet_file(tmp_path / "x.nir", edit)
    tracemalloc.start()
    with pytest.raises(nir_exchange.NIRError) as e:
        nir_exchange.read(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert phrase in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert peak < 8 << 20  # a few MB of metadata; LeNet's own fc0 alone is 2 MB, the declared one 6 GB


def test_every_array_of_our_largest_networks_is_within_the_bounds(tmp_path):
    for script in ("cifar10_ResNet11.py", "svhn_ResNet.py"):
        net = network(script, time_steps=2)[0]
        path = str(tmp_path / f"{script}.nir")
        nir_exchange.write(nir_exchange.to_nir(net, NETWORKS[script][2], on_off=True), path)
        nir_exchange.read(path)  # no NIRError


@pytest.mark.parametrize("name", ["lenet.NIR", "exported.pth.tar", "lenet"])
def test_a_nir_file_is_recognised_by_its_content(name, checkpoint, tmp_path, tiny_eval):
    path = str(tmp_path / name)
    run_main("mnist_LeNet.py", ["--resume", checkpoint[0], "--export-nir", path])
    net = run_main("mnist_LeNet.py", ["--resume", path, "--evaluate"] + tiny_eval)
    assert all(torch.equal(v, checkpoint[1][k]) for k, v in net.state_dict().items())


def _nan_weight(g):
    w = g.nodes["fc1"].weight.copy()
    w[0, 0] = np.nan
    return _replace(g, "fc1", nir.Linear(weight=w))


def _no_edge(g):
    return nir.NIRGraph(nodes=g.nodes, edges=[e for e in g.edges if e != ("input", "cnn1")], metadata=g.metadata)


def _dt(value):
    def edit(g):
        g.metadata["dt"] = value
        return g
    return edit


SAYS = {"a NaN weight": (_nan_weight, "node 'fc1' (Linear): weights that are NaN or infinite"),
        "a missing edge": (_no_edge, "is an edge into 'cnn1' missing?"),
        "dt = 0": (_dt(0.0), "the graph's dt is 0, not a positive Euler step"),
        "a dt that is no number": (_dt("soon"), "the graph's dt is 'soon', not a number"),
        "a time_steps that is no count": (lambda g: _replace_meta(g, 2.5), "the graph's time_steps is 2.5, not a whole")}


def _replace_meta(g, steps):
    g.metadata["time_steps"] = steps
    return g


@pytest.mark.parametrize("what", SAYS)
def test_a_bad_graph_is_named_for_what_is_wrong(what):
    edit, phrase = SAYS[what]
    message = refusal(edit)
    assert phrase in message and "dt=" not in message, message


def test_a_threshold_that_differs_is_named_not_blamed_on_leak(tmp_path, tiny_eval):
    g = _lif(lenet_graph(), "cnn1.lif", v_threshold=-g_ones("cnn1.lif"))
    path = str(tmp_path / "x.nir")
    nir_exchange.write(g, path)
    code, message = exit_message("mnist_LeNet.py", ["--resume", path, "--evaluate"] + tiny_eval)
    assert code == 1 and "layer 'cnn1' has the threshold V_th = -1 in the file, and 1 in LeNet" in message
    assert "--leak" not in message, message


def g_ones(name):
    return np.ones_like(lenet_graph().nodes[name].v_threshold)

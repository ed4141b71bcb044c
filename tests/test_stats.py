"""--stats and --time-sweep: synaptic operations against hand counts, ANN MACs against the closed form,
spike rates against the engine's own counts, stats.json against the contract, real PNGs, readouts."""
import json
import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import spiking_layers as sl
from conftest import signed_spikes
from mnist_LeNet import LeNet
from stats import (SpikeStats, format_stats_table, plot_training_curves, save_figure, save_stats_outputs,
                   time_sweep_table, write_stats_json)
import utils
from utils import evaluate_with_stats

CPU = torch.device("cpu")
PNG = b"\x89PNG\r\n\x1a\n"


class OneConv(sl.SpikingNetwork):
    """A single conv on 1×8×8 input spikes; its currents are the 'classes' of the output integrator."""

    def __init__(self, **conv):
        super().__init__(time_steps=4)
        self.conv = sl.Conv2d(1, 3, **conv)

    def step(self, x):                    # (k, B, 1, 8, 8)
        return self.conv(x).flatten(2)    # (k, B, 3·H_out·W_out)


class ConvPoolFc(sl.SpikingNetwork):
    """conv 3×3 stride 2 (LIF) – 2×2 pool (IF) – linear (output integrator)."""

    def __init__(self, time_steps):
        super().__init__(time_steps)
        self.conv = sl.SpikingConv2d(2, 6, 3, stride=2, padding=1)
        self.pool = sl.PoolIF()
        self.fc = sl.Linear(6 * 2 * 2, 10)
        sl.init_weights(self, gain=8.0)  # strong enough that every layer fires

    def step(self, x):                    # (k, B, 2, 8, 8)
        x = self.pool(self.conv(x))       # (k, B, 6, 2, 2)
        return self.fc(x.flatten(2))      # (k, B, 10)


def run_stats(net, spike_seq):
    net.eval()
    with torch.no_grad(), SpikeStats(net) as counter:
        net(spike_seq)
    return {l["name"]: l for l in counter.summary()["layers"]}


# 5×5, padding 2, 8×8 -> 8×8: along one axis input i is reached by outputs o with |o - i| ≤ 2, so 3 outputs
# at i = 0 or 7, 4 at i = 1 or 6, 5 inside. Fan-out = 3 channels × rows × columns.
# 3×3, stride 2, padding 1, 8×8 -> 4×4: output o reads inputs 2o-1 .. 2o+1, so input i is reached by
# 2 outputs if i is odd and below 7 (i = 2o+1 = 2(o+1)-1), by 1 if i is even (i = 2o) or i = 7 (o = 3 only).
CASES = [
    (dict(kernel_size=5, padding=2), (0, 0), 3 * 3 * 3, 3 * 8 * 8 * 1 * 25),   # corner
    (dict(kernel_size=5, padding=2), (0, 4), 3 * 3 * 5, 3 * 8 * 8 * 1 * 25),   # edge
    (dict(kernel_size=5, padding=2), (4, 3), 3 * 5 * 5, 3 * 8 * 8 * 1 * 25),   # middle
    (dict(kernel_size=5, padding=2), (1, 6), 3 * 4 * 4, 3 * 8 * 8 * 1 * 25),   # one in from the corner
    (dict(kernel_size=3, stride=2, padding=1), (0, 0), 3 * 1 * 1, 3 * 4 * 4 * 1 * 9),  # corner
    (dict(kernel_size=3, stride=2, padding=1), (7, 7), 3 * 1 * 1, 3 * 4 * 4 * 1 * 9),  # far corner
    (dict(kernel_size=3, stride=2, padding=1), (0, 3), 3 * 1 * 2, 3 * 4 * 4 * 1 * 9),  # edge
    (dict(kernel_size=3, stride=2, padding=1), (3, 5), 3 * 2 * 2, 3 * 4 * 4 * 1 * 9),  # middle, odd
    (dict(kernel_size=3, stride=2, padding=1), (4, 4), 3 * 1 * 1, 3 * 4 * 4 * 1 * 9),  # middle, even
]


@pytest.mark.parametrize("conv,pos,synops,macs", CASES)
def test_synops_of_one_spike_by_hand(conv, pos, synops, macs):
    """One spike per sample (a +1 in sample 0 at step 1, a -1 in sample 1 at step 3): synops per sample
    equal the hand-counted fan-out; the ANN MACs are the closed form C_out·H_out·W_out·C_in·kh·kw."""
    x = torch.zeros(4, 2, 1, 8, 8, dtype=torch.float64)
    x[1, 0, 0, pos[0], pos[1]], x[3, 1, 0, pos[0], pos[1]] = 1.0, -1.0
    conv_stats = run_stats(OneConv(**conv).double(), x)["conv"]
    assert conv_stats["synops"] == synops and conv_stats["ann_macs"] == macs
    assert "neurons" not in conv_stats  # a plain conv has no neurons


def test_synops_match_brute_force_and_neuron_counts():
    """Random spikes through conv – pool – fc: the conv's synops equal Σ over input spikes of the outputs a
    one-hot input reaches (counted by running the conv); the fc's equal the pool's spikes × 10."""
    T, B = 6, 3
    net = ConvPoolFc(T).double()
    x = signed_spikes((T, B, 2, 8, 8))
    stats = run_stats(net, x)
    ones = torch.ones_like(net.conv.weight)
    brute = 0
    for c, h, w in torch.nonzero(x.ne(0).sum((0, 1))).tolist():
        onehot = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
        onehot[0, c, h, w] = 1.0
        reach = torch.count_nonzero(torch.conv2d(onehot, ones, None, 2, 1)).item()
        brute += reach * x[:, :, c, h, w].ne(0).sum().item()
    assert stats["conv"]["synops"] == pytest.approx(brute / B, rel=1e-12)
    pool = stats["pool"]
    assert pool["spikes_per_neuron"] > 0, "the test needs a firing pool layer"
    assert stats["fc"]["synops"] == pytest.approx(pool["spikes_per_neuron"] * pool["neurons"] * 10, rel=1e-12)
    # the neuron entries are the engine's own counts
    assert stats["conv"]["spikes_per_neuron"] == pytest.approx(net.conv.spike_count.sum().item() / (B * 6 * 4 * 4))
    assert list(stats) == ["conv", "pool", "fc"]


@pytest.fixture(scope="module")
def lenet_result():
    """LeNet, T = 6, on 12 random images in batches of 4 (a last partial batch would also do), with a sweep."""
    torch.manual_seed(0)
    model = LeNet(time_steps=6)
    data = TensorDataset(torch.rand(12, 1, 28, 28), torch.randint(0, 10, (12,)))
    result = evaluate_with_stats(model, DataLoader(data, batch_size=4), CPU, time_sweep=(6, 2, 3))
    return model, result


def test_lenet_layers_macs_and_rates(lenet_result):
    model, result = lenet_result
    layers = {l["name"]: l for l in result["layers"]}
    assert list(layers) == ["cnn1", "pool1", "cnn2", "pool2", "fc0", "fc1"]
    closed_form = dict(cnn1=20 * 28 * 28 * 1 * 5 * 5, cnn2=50 * 14 * 14 * 20 * 5 * 5, fc0=2450 * 200, fc1=200 * 10)
    assert {n: layers[n]["ann_macs"] for n in closed_form} == closed_form == dict(
        cnn1=392000, cnn2=4900000, fc0=490000, fc1=2000)
    neurons = dict(cnn1=20 * 28 * 28, pool1=20 * 14 * 14, cnn2=50 * 14 * 14, pool2=50 * 7 * 7, fc0=200)
    assert {n: layers[n]["neurons"] for n in neurons} == neurons
    assert not {"synops", "ann_macs"} & set(layers["pool1"]) and "neurons" not in layers["fc1"]
    T = result["time_steps"]
    assert T == 6 and result["samples"] == 12
    for n in neurons:
        assert 0.0 <= layers[n]["rate"] <= 1.0
        assert layers[n]["spikes_per_neuron"] == pytest.approx(layers[n]["rate"] * T)
    assert layers["cnn1"]["rate"] > 0, "random images must make the first layer fire"
    # each layer's synops from its input spikes: fc1 from fc0's spikes, fc0 from pool2's
    assert layers["fc1"]["synops"] == pytest.approx(layers["fc0"]["spikes_per_neuron"] * 200 * 10)
    assert layers["fc0"]["synops"] == pytest.approx(layers["pool2"]["spikes_per_neuron"] * 2450 * 200)
    totals, energy = result["totals"], result["energy"]
    assert totals["ann_macs"] == 392000 + 4900000 + 490000 + 2000
    assert totals["synops_per_ann_mac"] == pytest.approx(totals["synops"] / totals["ann_macs"])
    assert energy["snn_uj"] == pytest.approx(totals["synops"] * 0.9e-6)
    assert energy["ann_uj"] == pytest.approx(totals["ann_macs"] * 4.6e-6)
    assert not model.cnn1._forward_pre_hooks and not model._forward_hooks  # hooks removed after the run


def test_lenet_accuracy_and_sweep(lenet_result):
    _, result = lenet_result
    acc, sweep = result["accuracy"], result["time_sweep"]
    assert 0 <= acc["prec1"] <= acc["prec5"] <= 100
    assert sweep["steps"] == [2, 3, 6]
    assert sweep["prec1"][-1] == acc["prec1"]  # readout after all T steps is the model's output
    table = time_sweep_table(sweep["steps"], sweep["prec1"])
    assert len(table.splitlines()) == 2 + 3


def test_sweep_accuracy_is_per_readout_top1():
    """The sweep's accuracies are the top-1 of each readout of the same forward pass (same seed, same spikes)."""
    model = LeNet(time_steps=4).eval()
    images, target = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    torch.manual_seed(3)
    result = evaluate_with_stats(model, [(images, target)], CPU, time_sweep=(1, 2), count_spikes=False)
    torch.manual_seed(3)
    with torch.no_grad():
        out = model(images, readout_steps=(1, 2))
    expected = [100.0 * (o.topk(1).indices[:, 0] == target).sum().item() / 5 for o in out]
    assert result["time_sweep"]["prec1"] + [result["accuracy"]["prec1"]] == pytest.approx(expected)
    assert "layers" not in result


def test_sweep_rejects_steps_beyond_the_window():
    with pytest.raises(ValueError, match="time-sweep"):
        evaluate_with_stats(LeNet(time_steps=4), [], CPU, time_sweep=(2, 8))


@pytest.mark.parametrize("chunk", [None, 5])
def test_readout_after_t_steps_is_a_run_of_t_steps(chunk):
    """Latency readouts: the last equals the plain output; the one after t steps equals the model run on
    the first t steps of the same spike train (time_steps = t)."""
    T, steps = 12, (3, 5, 7, 12)
    torch.manual_seed(0)
    net = ConvPoolFc(T).double().eval()
    net.time_chunk = chunk
    x = signed_spikes((T, 2, 2, 8, 8), seed=1)
    with torch.no_grad():
        readouts = net(x, readout_steps=steps)
        assert readouts.shape == (len(steps) + 1, 2, 10)
        torch.testing.assert_close(readouts[-1], net(x), rtol=1e-12, atol=1e-14)
        for t, readout in zip(steps, readouts):
            net.time_steps = t
            torch.testing.assert_close(readout, net(x[:t]), rtol=1e-12, atol=1e-14)
    assert readouts[-1].abs().sum() > 0, "the test needs a firing network"


def test_resnet_shortcuts_named_and_in_order():
    """ResNet shortcut convs are weight layers named as their parameters, between the block's two convs."""
    from svhn_ResNet import ResNet7
    net = ResNet7(time_steps=2)
    names = [l["name"] for l in run_stats(net, torch.rand(1, 1, 3, 32, 32).round()).values()]
    assert names == ["cnn11", "pool1", "cnn21", "shortcut1.0", "cnn22", "cnn31", "shortcut2.0", "cnn32",
                     "fc0", "fc1"]
    layers = run_stats(net, torch.ones(1, 1, 3, 32, 32))
    assert layers["shortcut1.0"]["ann_macs"] == 128 * 16 * 16 * 64 * 1 * 1
    assert layers["shortcut2.0"]["ann_macs"] == 256 * 8 * 8 * 128 * 1 * 1
    # every input pixel of cnn11 fires once: synops = Σ fan-out = C_out × (in-bounds kernel taps of all outputs)
    assert layers["cnn11"]["synops"] == 64 * 3 * (32 * 32 * 9 - 4 * 32 * 3 + 4)


def test_outputs_json_and_pngs(lenet_result, tmp_path):
    """stats.json holds what the contract check reads; the plots are real, small PNG files."""
    _, result = lenet_result
    text = save_stats_outputs(result, str(tmp_path))
    st = json.loads((tmp_path / "stats.json").read_text())
    assert {"layers", "totals", "energy", "time_steps", "samples", "accuracy", "time_sweep"} <= set(st)
    for layer in st["layers"]:
        keys = {"name"} | ({"neurons", "spikes_per_neuron", "rate"} if layer["name"] != "fc1" else set()) \
            | ({"synops", "ann_macs"} if not layer["name"].startswith("pool") else set())
        assert set(layer) == keys
    assert "prec1" in st["accuracy"]
    for name in ("spike_rates.png", "time_sweep.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG and len(data) < 100_000
    for line in ("cnn1", "pool2", "total", "0.9 pJ", "4.6 pJ", "Horowitz", "Prec@1"):
        assert line in text
    assert format_stats_table(result) in text


def test_training_curves_tolerate_missing_columns(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("epoch,test_loss\n1,3.0\n2,2.0\n")
    assert (tmp_path / "c.png").exists() is False
    assert save_figure(plot_training_curves(str(log)), str(tmp_path / "c.png")).endswith("c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
    log.write_text("epoch,lr\n1,0.1\n")
    assert plot_training_curves(str(log)) is None and save_figure(None, str(tmp_path / "d.png")) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "log.csv"]  # no temp file left behind


def test_write_stats_json_creates_out_dir(tmp_path):
    path = write_stats_json({"layers": []}, str(tmp_path / "new"))
    assert json.loads(open(path).read()) == {"layers": []}


def test_stats_json_is_strict_json(tmp_path):
    """Undefined values (a ratio over zero operations, a non-finite loss) are null, never a bare NaN."""
    path = write_stats_json({"energy": {"ann_over_snn": None}, "accuracy": {"loss": float("nan"),
                             "ce": float("inf"), "prec1": 12.5}, "steps": [1.0, float("-inf")]}, str(tmp_path))
    text = open(path).read()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"energy": {"ann_over_snn": None}, "accuracy": {"loss": None, "ce": None,
                                                                               "prec1": 12.5}, "steps": [1.0, None]}


def test_script_evaluate_stats_and_sweep(run_script, clean_error, tmp_path):
    """mnist_LeNet.py end to end: one epoch on synthetic data writes training_curves_mnist1.png; then one
    --evaluate pass prints the Test: line, the stats table and the sweep (to 8 > T = 4: T is raised),
    and writes stats.json and the plots in stats_mnist1/. A bad --time-sweep is one line, no traceback."""
    tiny = ["--synthetic", "--time-steps", "4", "--test-batch-size", "32", "-j", "0", "--device", "cpu",
            "--no-progress", "--out-dir", tmp_path]
    p = run_script("mnist_LeNet.py", *tiny, "--epochs", "1", "-b", "32", "--limit-train", "128", "--limit-val", "64")
    assert p.returncode == 0, p.out
    assert (tmp_path / "training_curves_mnist1.png").read_bytes()[:8] == PNG
    p = run_script("mnist_LeNet.py", *tiny, "--resume", tmp_path / "model_bestT1_mnist1.pth.tar", "--evaluate",
                   "--stats", "--time-sweep", "2,4,8", "--limit-val", "64")
    assert p.returncode == 0, p.out
    assert "=> --time-sweep goes to 8 steps: evaluating with --time-steps 8 instead of 4" in p.stdout, p.out
    assert len(re.findall(r"^Test: Prec@1 [\d.]+ Prec@5 [\d.]+ Loss [\d.]+$", p.stdout, re.M)) == 1, p.out
    assert "=> spike statistics over T = 8 steps, 64 samples" in p.stdout and "Horowitz" in p.stdout
    assert re.search(r"^\s+8\s+[\d.]+$", p.stdout, re.M), p.out  # the sweep table's last row
    st = json.loads((tmp_path / "stats_mnist1" / "stats.json").read_text())
    names = [l["name"] for l in st["layers"]]
    assert names == ["cnn1", "pool1", "cnn2", "pool2", "fc0", "fc1"]
    for layer in st["layers"]:
        if layer["name"] != "fc1":
            assert {"neurons", "spikes_per_neuron", "rate"} <= set(layer) and 0 <= layer["rate"] <= 1
        if not layer["name"].startswith("pool"):
            assert {"synops", "ann_macs"} <= set(layer)
    assert st["samples"] == 64 and st["time_sweep"]["steps"] == [2, 4, 8]
    assert st["checkpoint"] == str(tmp_path / "model_bestT1_mnist1.pth.tar") and st["untrained"] is False
    assert st["time_sweep"]["prec1"][-1] == st["accuracy"]["prec1"]
    pngs = [f for f in (tmp_path / "stats_mnist1").glob("*.png") if f.read_bytes()[:8] == PNG]
    assert {"spike_rates.png", "time_sweep.png"} <= {f.name for f in pngs}, pngs

    clean_error(run_script("mnist_LeNet.py", "--evaluate", "--time-sweep", "0,5", "--synthetic"),
                "--time-sweep", "≥ 1", code=2)
    clean_error(run_script("mnist_LeNet.py", "--stats", "--synthetic"), "add --evaluate", code=2)


def test_evaluating_without_resume_says_the_weights_are_untrained(tmp_path, capsys):
    """A random network's spike counts and energy figures must not pass for a trained one's."""
    import mnist_LeNet
    utils.main(mnist_LeNet.LeNet, mnist_LeNet.DEFAULTS, argv=[
        "--synthetic", "--time-steps", "2", "--limit-val", "16", "--test-batch-size", "16", "-j", "0", "--device",
        "cpu", "--no-progress", "-e", "--stats", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "WARNING: --evaluate without --resume evaluates untrained weights (as initialised); add " \
        "--resume PATH to evaluate a trained network"
    # at T = 2 a fresh LeNet's outputs stay 0: that is said too (test_safety.py)
    assert err[1:] == [] or err[1].startswith("WARNING: the network gave no answer")
    st = json.loads((tmp_path / "stats_mnist1" / "stats.json").read_text())
    assert st["untrained"] is True and st["checkpoint"] is None


def test_a_network_without_spikes_has_no_ratios(tmp_path):
    """Input spikes alone give synops, so a network whose neurons never fire would show an energy
    'advantage' of the ANN MACs over the first layer's synops: its ratios are undefined instead."""
    net = ConvPoolFc(time_steps=4).eval()
    with torch.no_grad():
        net.conv.weight.copy_(-net.conv.weight.abs())  # no membrane ever rises: no spike anywhere
    with torch.no_grad(), SpikeStats(net) as counter:
        net(signed_spikes((4, 3, 2, 8, 8)).float().abs())
    result = counter.summary()
    assert result["layers"][0]["synops"] > 0 and result["totals"]["spikes"] == 0
    assert result["energy"]["ann_over_snn"] is None and result["totals"]["synops_per_ann_mac"] is None
    table = format_stats_table(result)
    assert "ANN/SNN undefined (no neuron spiked)" in table and re.search(r"^total .* undefined$", table, re.M)
    assert json.loads(open(write_stats_json(result, tmp_path)).read())["energy"]["undefined"] == "no neuron spiked"

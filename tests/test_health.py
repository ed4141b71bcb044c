"""Training health: a silent or saturated layer is reported once, early, with what to do about it; a
non-finite loss or weight stops the run at once, by its name, and is never saved."""
import csv
import types

import pytest
import torch

import checkpoints
import health
from conftest import exit_message, run_main

LENET = (("cnn1.weight", (20, 1, 5, 5)), ("cnn2.weight", (50, 20, 5, 5)), ("fc0.weight", (200, 2450)),
         ("fc1.weight", (10, 200)))


def monitor(patience=3, stop=False, amp=False):
    return health.HealthMonitor(types.SimpleNamespace(dead_patience=patience, stop_on_dead=stop, rank=0, lr=0.5,
                                                     amp=amp))


def warnings(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING:")]


# ----------------------------------------------------------------------------------------------
# The monitor

def test_warns_once_after_patience_consecutive_silent_batches(capsys):
    m = monitor(patience=3)
    for batch, rate in enumerate([0.0, 0.0, 0.1, 0.0, 0.0], 1):  # a spike resets the count
        m.check({"cnn1": 0.2, "fc0": rate, "output": 0.5}, epoch=0, batch=batch)
    assert warnings(capsys) == []
    for batch in range(6, 20):
        m.check({"cnn1": 0.2, "fc0": 0.0, "output": 0.5}, epoch=0, batch=batch)
    (line,) = warnings(capsys)
    assert "layer fc0" in line and "silent" in line and "rate 0.000" in line and "batch 6" in line
    assert "--time-steps" in line and "learning rate" in line and "init scale" in line


def test_a_saturated_layer_and_a_silent_output_are_named(capsys):
    m = monitor(patience=2)
    for batch in (1, 2):
        m.check({"cnn1": 1.0, "fc0": 0.3, "output": 0.0}, epoch=1, batch=batch)
    (line,) = warnings(capsys)
    assert "layer cnn1" in line and "saturated" in line and "rate 1.000" in line and "epoch 2" in line
    assert "output" in line and "lower learning rate" in line


def test_each_layer_is_reported_once_per_run(capsys):
    m = monitor(patience=1)
    m.check({"cnn1": 0.0, "fc0": 0.1, "output": 0.5}, epoch=0, batch=1)
    m.check({"cnn1": 0.0, "fc0": 0.0, "output": 0.5}, epoch=0, batch=2)
    m.check({"cnn1": 0.0, "fc0": 0.0, "output": 0.5}, epoch=1, batch=1)
    lines = warnings(capsys)
    assert len(lines) == 2 and "layer cnn1" in lines[0] and "layer fc0" in lines[1]


def test_stop_on_dead_raises_one_line(capsys):
    m = monitor(patience=1, stop=True)
    with pytest.raises(health.DeadLayerError) as e:
        m.check({"cnn1": 0.0, "output": 0.0}, epoch=0, batch=1)
    assert "layer cnn1" in str(e.value) and "--stop-on-dead" in str(e.value) and "\n" not in str(e.value)


def test_a_practically_silent_layer_warns_and_a_quiet_healthy_one_does_not(capsys):
    """Below health.QUIET_RATE (1e-3) a layer is practically silent; a healthy network's quietest layer
    fires 4× more or above (fresh VGG9 fc0 at T = 20: 4.4e-3; docs/training-health.md)."""
    m = monitor(patience=3)
    for batch in range(1, 10):
        m.check({"cnn1": 0.2, "fc0": 4e-3, "output": 0.02}, epoch=0, batch=batch)
    assert warnings(capsys) == []
    for batch in range(10, 13):
        m.check({"cnn1": 0.2, "fc0": 4e-4, "output": 0.02}, epoch=0, batch=batch)
    (line,) = warnings(capsys)
    assert "layer fc0 has been practically silent (below 0.001 spikes per neuron per step)" in line
    assert "rate 4.0e-04" in line and "batch 12" in line and "--time-steps" in line


def test_outputs_at_their_silent_value_warn(capsys):
    m = monitor(patience=2)
    for batch in (1, 2):
        m.check({"cnn1": 0.2, "fc0": 0.01, "output": 2e-4}, epoch=0, batch=batch)
    (line,) = warnings(capsys)
    assert line.startswith("WARNING: the outputs have stayed at their silent value 0 (mean |output| below 0.001")


@pytest.mark.parametrize("loss", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_loss_is_named_as_such(loss):
    m = monitor(amp=True)
    m.check_loss(3.5, epoch=0, batch=1)
    with pytest.raises(checkpoints.NonFiniteError) as e:
        m.check_loss(loss, epoch=1, batch=7)
    message = str(e.value)
    assert f"the training loss is {loss} in epoch 2, batch 7" in message and "silent" not in message
    assert "learning rate too high" in message and "--lr 0.5" in message and "--amp" in message
    assert "\n" not in message


def test_non_finite_weights_are_never_saved(tmp_path):
    args = types.SimpleNamespace(out_dir=str(tmp_path), tag="x", lr=0.1, amp=False)
    state = {"epoch": 3, "state_dict": {"fc0.weight": torch.ones(2), "fc1.weight": torch.tensor([1.0, float("nan")])}}
    with pytest.raises(checkpoints.NonFiniteError, match=r"weights after epoch 3 hold NaN or inf \(fc1.weight\)"):
        checkpoints.save_checkpoint(state, True, args)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# End to end

def test_a_diverging_run_stops_at_its_first_non_finite_loss(tmp_path, tiny):
    """--lr 1e30: the loss is inf at batch 2. The run stops there, before the step that would turn every
    weight NaN (after which no layer fires and the monitor would see "silence"): exit 1, one line naming
    the batch and the loss; the checkpoint keeps the last good epoch."""
    run_main("mnist_LeNet.py", [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    checkpoint = tmp_path / "checkpointT1_mnist1.pth.tar"
    good = checkpoint.read_bytes()
    code, message = exit_message("mnist_LeNet.py", [*tiny, "--epochs", "3", "--out-dir", tmp_path, "--resume", "auto",
                                                    "--limit-train", "96", "--lr", "1e30"])
    assert code == 1 and message.startswith("error: the training loss is inf in epoch 2, batch 2: training diverged")
    assert "--lr 1e+30: try it 10× lower" in message
    assert message.endswith(f"Stopped; {checkpoint} holds epoch 1: continue with --resume {checkpoint}")
    assert checkpoint.read_bytes() == good and len(list(csv.DictReader(open(tmp_path / "log_mnist1.csv")))) == 1

    code, message = exit_message("mnist_LeNet.py", [*tiny, "--epochs", "1", "--out-dir", tmp_path / "new",
                                                    "--lr", "1e30"])
    assert message.endswith("Stopped; nothing was saved")
    assert [p.name for p in (tmp_path / "new").iterdir()] == [".lock_mnist1"]


@pytest.fixture
def silent_lenet(tmp_path):
    """LeNet with all weights negative: no input (ToTensor, ≥ 0) can make cnn1 fire."""
    path = tmp_path / "silent.pth.tar"
    torch.manual_seed(0)
    torch.save({"epoch": 0, "arch": "LeNet", "best_prec1": 0.0,
                "state_dict": {k: -torch.rand(shape) for k, shape in LENET}}, path)
    return path


def test_silent_network_warns_in_its_first_epoch(silent_lenet, run_script, tiny, tmp_path):
    p = run_script("mnist_LeNet.py", "--resume", silent_lenet, *tiny, "--limit-train", "192",  # 12 batches
                   "--epochs", "1", "--out-dir", tmp_path)
    assert p.returncode == 0, p.out
    (line,) = [s for s in p.stderr.splitlines() if s.startswith("WARNING:")]
    assert "layer cnn1" in line and "batch 10" in line and "output" in line and "--time-steps" in line
    assert p.stdout.index("=> epoch 1/1") > 0 and "Loss 1.0000" in p.stdout  # Σ(0 - onehot)² = 1 per image
    row, = csv.DictReader(open(tmp_path / "log_mnist1.csv"))
    assert float(row["rate_cnn1"]) == 0.0 and float(row["train_loss"]) == 1.0


def test_stop_on_dead_exits_with_one_line(silent_lenet, run_script, tiny, tmp_path, clean_error):
    p = run_script("mnist_LeNet.py", "--resume", silent_lenet, *tiny, "--limit-train", "192", "--epochs", "5",
                   "--stop-on-dead", "--out-dir", tmp_path)
    clean_error(p, "layer cnn1 has been silent", "--stop-on-dead", "Stopped; nothing was saved")
    assert "=> epoch 1/5" not in p.stdout  # it stopped within the epoch


def test_healthy_run_on_fashion_mnist_prints_no_warning(run_script, tmp_path, fashion_mnist):
    # the paper's LeNet settings; at T = 16 every layer fires from the first batch (at T ≤ 8 fc0 starts silent)
    p = run_script("mnist_LeNet.py", "--dataset", "fashion-mnist", "--data-dir", tmp_path / "data",
                   "--time-steps", "16", "--limit-train", "384", "-b", "32", "--limit-val", "64", "--epochs", "1",
                   "--dead-patience", "4", "-j", "0", "--device", "cpu", "--no-progress", "--out-dir", tmp_path)
    assert p.returncode == 0, p.out
    assert "WARNING" not in p.out, p.out
    row, = csv.DictReader(open(tmp_path / "log_mnist1.csv"))
    assert all(float(row[f"rate_{k}"]) > 0 for k in ("cnn1", "pool1", "cnn2", "pool2", "fc0"))


PRETRAINED = "pretrained/lenet_fashion_T20.pth.tar"


@pytest.fixture
def quiet_lenet(tmp_path):
    """The shipped LeNet with fc0's weights × 0.2: at T = 8 on synthetic images fc0 fires 3e-4 of its
    neuron-steps per mini-batch of 16 (about 9 spikes; measured 2.7e-4 to 4.3e-4), never exactly 0."""
    ckpt = torch.load(PRETRAINED, map_location="cpu", weights_only=True)
    state = dict(ckpt["state_dict"], **{"fc0.weight": ckpt["state_dict"]["fc0.weight"] * 0.2})
    path = tmp_path / "quiet.pth.tar"
    torch.save({"epoch": 0, "arch": "LeNet", "best_prec1": 0.0, "state_dict": state}, path)
    return path


def test_a_practically_silent_network_warns_within_patience(quiet_lenet, tmp_path, capsys):
    """--lr 1e-6 holds it there (the paper's rate lifts fc0 above the floor within the epoch)."""
    run_main("mnist_LeNet.py", ["--resume", quiet_lenet, "--synthetic", "--time-steps", "8", "--limit-train", "64",
                                "-b", "16", "--limit-val", "16", "--lr", "1e-6", "--dead-patience", "3", "-j", "0",
                                "--device", "cpu", "--no-progress", "--epochs", "1", "--out-dir", tmp_path])
    (line,) = warnings(capsys)
    assert "layer fc0 has been practically silent" in line and "batch 3)" in line
    row, = csv.DictReader(open(tmp_path / "log_mnist1.csv"))
    assert 0 < float(row["rate_fc0"]) < health.QUIET_RATE  # never exactly silent: the old check missed it

    code, message = exit_message("mnist_LeNet.py", [
        "--resume", quiet_lenet, "--synthetic", "--time-steps", "8", "--limit-train", "64", "-b", "16",
        "--limit-val", "16", "--lr", "1e-6", "--dead-patience", "3", "-j", "0", "--device", "cpu", "--no-progress",
        "--epochs", "1", "--stop-on-dead", "--out-dir", tmp_path / "stop"])
    assert code == 1 and "layer fc0 has been practically silent" in message and "batch 3)" in message
    assert "--stop-on-dead" in message and message.endswith("Stopped; nothing was saved")


def test_the_shipped_lenet_does_not_warn(tmp_path, capsys, fashion_mnist):
    """Its quietest layer, fc0, fires about 1 % of steps at T = 20: 10× the floor. --dead-patience 1: no
    mini-batch may fall below it."""
    run_main("mnist_LeNet.py", ["--resume", PRETRAINED, "--dataset", "fashion-mnist", "--data-dir", tmp_path / "data",
                                "--time-steps", "20", "--limit-train", "48", "-b", "16", "--limit-val", "16",
                                "--epochs", "12", "--dead-patience", "1", "-j", "0", "--device", "cpu",
                                "--no-progress", "--out-dir", tmp_path])
    assert warnings(capsys) == []
    row, = csv.DictReader(open(tmp_path / "log_mnist1.csv"))
    assert min(float(v) for k, v in row.items() if k.startswith("rate_")) > 5 * health.QUIET_RATE


def test_a_fresh_vgg9_at_T100_does_not_warn(tmp_path, capsys):
    """Synthetic CIFAR-10 images (FakeData's uniform pixels, normalised as CIFAR-10), 2 of them, one per
    mini-batch: its quietest layer, fc0, fires 2.4e-2 at T = 100 (0.5 % on real images at T = 20)."""
    run_main("cifar10_VGG9.py", ["--synthetic", "--time-steps", "100", "--limit-train", "2", "-b", "1",
                                 "--limit-val", "1", "--test-batch-size", "1", "--epochs", "1", "--dead-patience", "1",
                                 "-j", "0", "--device", "cpu", "--no-progress", "--out-dir", tmp_path])
    assert warnings(capsys) == []
    row, = csv.DictReader(open(tmp_path / "log_cifar10_v9.csv"))
    assert min(float(v) for k, v in row.items() if k.startswith("rate_")) > 5 * health.QUIET_RATE

"""The four paper scripts: their networks (the paper's architectures), their command line, and end-to-end runs."""
import argparse
import csv
import gzip
import math
import os
import re
import struct
import subprocess
import sys

import pytest
import torch

import checkpoints
import data
import utils
from conftest import NETWORKS, SCRIPTS, TAGS, exit_message, network

DATASET = {"mnist_LeNet.py": "mnist", "cifar10_VGG9.py": "cifar10", "cifar10_ResNet11.py": "cifar10",
           "svhn_ResNet.py": "svhn"}  # the paper's pairs: each script's default

# ----------------------------------------------------------------------------------------------
# Networks

@pytest.mark.parametrize("script", SCRIPTS)
def test_output_shape_and_spec_weight_names(script):
    net, _ = network(script, time_steps=2)
    _, weights, image = NETWORKS[script]
    assert [(k, tuple(v.shape)) for k, v in net.state_dict().items()] == \
        [(f"{name}.weight", shape) for name, shape in weights.items()]  # no biases, no buffers
    assert net(torch.rand(3, *image)).shape == (3, 10)
    wide, _ = network(script, time_steps=2, classes=100)  # CIFAR-100: only the output layer is wider
    assert {k: v.shape for k, v in wide.state_dict().items()} == \
        {**{k: v.shape for k, v in net.state_dict().items()}, "fc1.weight": (100, weights["fc1"][1])}
    assert wide(torch.rand(3, *image)).shape == (3, 100)


@pytest.mark.parametrize("script", SCRIPTS)
def test_state_dict_round_trip(script):
    torch.manual_seed(0)
    a, _ = network(script, time_steps=2)
    b, _ = network(script, time_steps=2)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.rand(2, *NETWORKS[script][2])
    torch.manual_seed(1)
    ya = a.eval()(x)
    torch.manual_seed(1)  # the same Poisson spikes
    assert torch.equal(ya, b.eval()(x))


# ----------------------------------------------------------------------------------------------
# Command line

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_with_its_default(script, capsys):
    net, module = network(script, time_steps=2)
    with pytest.raises(SystemExit) as e:
        utils.main(type(net), module.DEFAULTS, argv=["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("-b N, --batch-size", "--lr", "--epochs", "--start-epoch", "--wd", "--weight-decay", "--momentum",
                 "-p N, --print-freq", "--resume", "-e, --evaluate", "-j N, --workers", "--time-steps", "--leak",
                 "--dropout", "--data-dir", "--device", "--seed", "--out-dir", "--limit-train", "--limit-val",
                 "--no-progress", "--test-batch-size", "--lr-steps", "--time-chunk", "--amp", "--synthetic",
                 "--dead-patience", "--stop-on-dead", "--dataset"):
        assert flag in out, flag
    assert "never passed it to SGD" in out and module.__doc__.splitlines()[0] in out
    assert f"(default: {module.DEFAULTS['lr']})" in out
    assert f"(default: {','.join(map(str, module.DEFAULTS['lr_steps']))})" in out


def test_svhn_states_its_own_defaults():
    """ResNet11's settings on SVHN, written out: the script does not depend on cifar10_ResNet11.py."""
    import cifar10_ResNet11
    import svhn_ResNet
    assert svhn_ResNet.DEFAULTS == dict(cifar10_ResNet11.DEFAULTS, dataset="svhn", tag="svhn_r7")
    assert not re.search(r"^\s*(import|from)\s+cifar10_ResNet11", open(svhn_ResNet.__file__).read(), re.M)


def test_parser_uses_the_scripts_defaults():
    import cifar10_VGG9
    args = utils.get_parser("", cifar10_VGG9.DEFAULTS).parse_args(["--lr-steps", "3,5", "-b", "4"])
    assert (args.lr, args.lr_steps, args.batch_size, args.test_batch_size) == (0.0033, (3, 5), 4, 8)
    assert (args.momentum, args.weight_decay, args.dropout, args.tag) == (0.0, 5e-4, 0.2, "cifar10_v9")


@pytest.mark.parametrize("flag,value,phrase", [
    ("--time-steps", "0", "--time-steps"), ("--time-steps", "-3", "--time-steps"), ("--leak", "1.5", "--leak"),
    ("--leak", "0", "--leak"), ("--batch-size", "0", "--batch-size"), ("--dropout", "1.0", "--dropout"),
    ("--dropout", "-0.1", "--dropout"), ("--time-steps", "ten", "must be an integer ≥ 1"),
    # every float flag is finite and in range; the integers have ranges
    ("--lr", "inf", "--lr: must be a finite number > 0"), ("--lr", "nan", "--lr"), ("--lr", "0", "--lr"),
    ("--wd", "nan", "--weight-decay: must be a finite number ≥ 0"), ("--wd", "-1", "--wd"), ("--wd", "inf", "--wd"),
    ("--momentum", "nan", "--momentum: must lie in [0, 1)"), ("--momentum", "-1", "--momentum"),
    ("--momentum", "1", "--momentum"), ("--leak", "nan", "--leak"), ("--dropout", "nan", "--dropout"),
    ("--workers", "-1", "--workers: must be an integer ≥ 0"), ("--seed", "99999999999999999999999", "--seed"),
    ("--seed", "-1", "--seed"), ("--epochs", "0", "--epochs: must be an integer ≥ 1"), ("--epochs", "-1", "--epochs"),
    ("--start-epoch", "-5", "--start-epoch: must be an integer ≥ 0"),
    # the LR steps: epochs ≥ 1, each after the one before (-5 or 0: epoch 1 at ×0.2; 1,1: ×0.04 at once)
    *[("--lr-steps", v, "--lr-steps: must be epochs ≥ 1 in increasing order") for v in ("-5", "0", "1,1", "100,70")],
    # counts Python's len() and torch can hold
    ("--limit-train", "100000000000000000000", "--limit-train: must be an integer ≥ 1 and below 2**63"),
    ("--limit-val", "1e20", "--limit-val"), ("--time-steps", str(2 ** 63), "--time-steps")])
def test_bad_settings_are_rejected_in_one_line(flag, value, phrase, capsys):
    import mnist_LeNet
    with pytest.raises(SystemExit) as e:
        utils.main(mnist_LeNet.LeNet, mnist_LeNet.DEFAULTS, argv=[flag, value, "--synthetic"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and phrase in err, err


@pytest.mark.parametrize("work", [["-e"], ["--epochs", "1"]])
def test_time_steps_beyond_memory_are_one_line_before_any_work(work, tiny, tiny_eval, tmp_path):
    """--time-steps 10**9: the input spike trains of one mini-batch alone would take 47,000 GiB."""
    flags = tiny_eval if work == ["-e"] else tiny
    code, message = exit_message("mnist_LeNet.py", [*flags, *work, "--time-steps", "1000000000", "--out-dir", tmp_path])
    assert code == 1 and message.startswith("error: --time-steps 1000000000 with 16 images per mini-batch: their "
                                            "input spike trains alone take 4.67e+04 GiB, more than this cpu's ")
    assert message.endswith("; lower --time-steps or the batch size") and not (tmp_path / "log_mnist1.csv").exists()


def test_a_start_epoch_with_nothing_to_train_is_rejected(capsys):
    import mnist_LeNet
    with pytest.raises(SystemExit) as e:
        utils.main(mnist_LeNet.LeNet, mnist_LeNet.DEFAULTS, argv=["--start-epoch", "3", "--epochs", "3", "--synthetic"])
    assert e.value.code == 2
    assert "--start-epoch 3 leaves nothing to train with --epochs 3" in capsys.readouterr().err


@pytest.mark.parametrize("flags,phrase", [
    (["--out-dir", "{file}"], "--out-dir {file} is not a directory"),
    (["--out-dir", "{file}/sub"], "--out-dir {file}/sub cannot be created (Not a directory)"),
    (["--out-dir", "/proc/snn-out"], "--out-dir /proc/snn-out cannot be created"),
    (["--evaluate", "--stats", "--out-dir", "{file}"], "--out-dir {file} is not a directory"),
    (["--evaluate", "--data-dir", "{file}"], "--data-dir {file} is not a directory")])
def test_bad_directories_are_one_line_before_any_work(flags, phrase, tmp_path, capsys):
    """Checked up front: the --stats evaluation must not run first and fail at its end."""
    import mnist_LeNet
    file = tmp_path / "a-file"
    file.write_text("")
    flags = [f.format(file=file) for f in flags]
    synthetic = [] if "--data-dir" in flags else ["--synthetic"]
    with pytest.raises(SystemExit) as e:
        utils.main(mnist_LeNet.LeNet, mnist_LeNet.DEFAULTS, argv=[*flags, *synthetic, "--device", "cpu"])
    assert e.value.code.startswith(f"error: {phrase.format(file=file)}") and "\n" not in e.value.code, e.value.code
    assert capsys.readouterr().out == ""  # nothing ran, not even setup


def test_an_unwritable_out_dir_is_refused(tmp_path, monkeypatch):
    """A read-only directory (root writes everywhere, so the refusal is simulated where it would come from)."""
    import mnist_LeNet

    def read_only(dir=None, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoints.tempfile, "TemporaryFile", read_only)
    with pytest.raises(SystemExit) as e:
        utils.main(mnist_LeNet.LeNet, mnist_LeNet.DEFAULTS, argv=["--synthetic", "--out-dir", str(tmp_path)])
    assert e.value.code == f"error: --out-dir {tmp_path} is not writable (Permission denied)"


def test_bad_setting_from_the_shell_has_no_traceback(run_script, clean_error):
    clean_error(run_script("cifar10_VGG9.py", "--leak", "1.5"), "--leak: must lie in (0, 1]", code=2)


# ----------------------------------------------------------------------------------------------
# Data

def test_absent_dataset_offline_says_how_to_get_it(run_script, offline, tmp_path, clean_error):
    p = run_script("svhn_ResNet.py", "--evaluate", "--data-dir", tmp_path, "--device", "cpu", env=offline)
    clean_error(p, "svhn is not in", "could not be downloaded", "internet")


def test_absent_fashion_mnist_names_the_debian_package(monkeypatch, offline, tmp_path):
    import mnist_LeNet
    for k, v in offline.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "not-installed"))
    with pytest.raises(SystemExit) as e:
        utils.main(mnist_LeNet.LeNet, mnist_LeNet.DEFAULTS, ("mnist", "fashion-mnist"),
                   argv=["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "-e", "--device", "cpu"])
    assert "apt-get install -y dataset-fashion-mnist" in str(e.value)


def test_fashion_mnist_is_found_in_the_debian_package(tmp_path, capsys, fashion_mnist):
    import mnist_LeNet
    args = utils.get_parser("", {**mnist_LeNet.DEFAULTS, "dataset": "fashion-mnist"}).parse_args(
        ["--data-dir", str(tmp_path), "--limit-val", "5"])
    utils.processes(args)  # rank 0 of one process
    found = data.get_dataset(args, train=False)
    assert "=> decompressed Fashion-MNIST" in capsys.readouterr().out
    assert len(found) == 5 and len(found.dataset) == 10000
    assert sorted(os.listdir(tmp_path / "FashionMNIST" / "raw")) == [
        "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]


def idx_file(path, *shape):
    path.write_bytes(bytes((0, 0, 8, len(shape))) + struct.pack(f">{len(shape)}I", *shape) + bytes(math.prod(shape)))


@pytest.mark.parametrize("damage", ["gzipped", "random bytes", "truncated"])
def test_a_damaged_dataset_file_is_named_with_the_way_on(damage, tmp_path):
    """torchvision reads any bytes of the right name: an AssertionError, or a RuntimeError taken for a
    missing dataset ("could not be downloaded"). The size of an IDX file must match its header."""
    import mnist_LeNet
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        idx_file(raw / f"{split}-images-idx3-ubyte", 4, 28, 28)
        idx_file(raw / f"{split}-labels-idx1-ubyte", 4)
    args = utils.get_parser("", mnist_LeNet.DEFAULTS).parse_args(["--data-dir", str(tmp_path)])
    utils.processes(args)  # rank 0 of one process
    assert len(data.get_dataset(args, train=False)) == 4  # whole files load
    images = raw / "t10k-images-idx3-ubyte"
    whole = images.read_bytes()
    images.write_bytes({"gzipped": gzip.compress(whole), "random bytes": b"\x7f" + os.urandom(3000),
                        "truncated": whole[:2000]}[damage])
    with pytest.raises(SystemExit) as e:
        data.get_dataset(args, train=False)
    why = "2000 bytes, where its header says 3152" if damage == "truncated" else "not an IDX file of bytes"
    assert str(e.value).startswith(f"error: {images} is damaged ({why}") and "\n" not in str(e.value)
    assert str(e.value).endswith("delete it, and the next run has it downloaded anew")


def test_synthetic_data_is_deterministic_and_shaped_like_the_dataset():
    import mnist_LeNet
    for name, shape, classes in (("mnist", (1, 28, 28), 10), ("cifar10", (3, 32, 32), 10),
                                 ("cifar100", (3, 32, 32), 100), ("svhn", (3, 32, 32), 10)):
        args = utils.get_parser("", {**mnist_LeNet.DEFAULTS, "dataset": name}).parse_args(["--synthetic",
                                                                                           "--limit-val", "64"])
        a, b = data.get_dataset(args, train=False), data.get_dataset(args, train=False)
        assert len(a) == 64 and a[0][0].shape == shape and torch.equal(a[3][0], b[3][0])
        labels = {label for _, label in a}
        assert labels <= set(range(classes)) and (max(labels) >= 10) == (classes == 100)


# ----------------------------------------------------------------------------------------------
# End to end: train one epoch, resume to a second, evaluate the best

@pytest.mark.parametrize("script", SCRIPTS)
def test_train_resume_evaluate(script, run_script, tiny, tiny_eval, tmp_path):
    tag = TAGS[script]
    last, best = tmp_path / f"checkpointT1_{tag}.pth.tar", tmp_path / f"model_bestT1_{tag}.pth.tar"
    p = run_script(script, *tiny, "--epochs", "1", "--out-dir", tmp_path)
    assert p.returncode == 0, p.out
    assert re.search(r"=> epoch 1/1 .*train Prec@1 [\d.]+ Prec@5 [\d.]+ Loss [\d.]+ \| Test: Prec@1 [\d.]+ "
                     r"Prec@5 [\d.]+ Loss [\d.]+ \| rates cnn", p.stdout), p.out
    assert last.exists() and best.exists()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["arch"] == NETWORKS[script][0] and ckpt["args"]["time_steps"] == 2
    assert (ckpt["dataset"], ckpt["classes"]) == (DATASET[script], 10)
    assert {"state_dict", "best_prec1", "optimizer", "scheduler", "rng_cpu"} <= ckpt.keys()

    p = run_script(script, *tiny, "--epochs", "2", "--out-dir", tmp_path, "--resume", last)
    assert p.returncode == 0 and "=> epoch 2/2" in p.stdout and "=> epoch 1/" not in p.stdout, p.out
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 2
    rows = list(csv.DictReader(open(tmp_path / f"log_{tag}.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0])[:3] == ["epoch", "lr", "train_loss"] and "test_prec5" in rows[0] and "seconds" in rows[0]
    assert any(k.startswith("rate_") for k in rows[0])

    p = run_script(script, *tiny_eval, "--resume", best, "--evaluate")
    assert p.returncode == 0, p.out
    assert re.search(r"^Test: Prec@1 \d+\.\d{3} Prec@5 \d+\.\d{3} Loss \d+\.\d{4}$", p.stdout, re.M), p.out
    assert "=> epoch" not in p.stdout


def test_amp_and_time_chunk(tiny, tmp_path, monkeypatch, capsys):
    import mnist_LeNet
    monkeypatch.setattr(utils, "_cpu_has_bf16", lambda: True)
    net = utils.main(mnist_LeNet.LeNet, mnist_LeNet.DEFAULTS,
                     argv=[*tiny, "--amp", "--time-chunk", "1", "--epochs", "1", "--out-dir", str(tmp_path)])
    assert net.time_chunk == 1 and (tmp_path / "checkpointT1_mnist1.pth.tar").exists()
    assert "WARNING" not in capsys.readouterr().err


def test_amp_on_a_cpu_without_bf16_is_flagged(tiny_eval, tmp_path, monkeypatch, capsys):
    """bf16 convolutions on a CPU without bf16 instructions run several times slower than float32."""
    import mnist_LeNet
    monkeypatch.setattr(utils, "_cpu_has_bf16", lambda: False)
    utils.main(mnist_LeNet.LeNet, mnist_LeNet.DEFAULTS, argv=[*tiny_eval, "--amp", "-e"])
    (line,) = [s for s in capsys.readouterr().err.splitlines() if s.startswith("WARNING: --amp")]  # -e: untrained too
    assert "--amp" in line and "bfloat16" in line and "slower" in line


# records whether anything loads glibc through ctypes (as utils' mallopt call does) while the rest runs
SPY_ON_LIBC = """import ctypes
class Spy(ctypes.CDLL):
    loaded = []
    def __init__(self, name, *a, **k):
        Spy.loaded.append(name)
        super().__init__(name, *a, **k)
ctypes.CDLL = Spy
"""


def test_process_settings_are_set_before_torch_loads():
    """libgomp and torch read the engine's process settings once, when torch loads: utils sets them
    when it is imported first — as every script imports it first — keeps a user's own values, and
    leaves a process that loaded torch before it alone. glibc's settings wait for setup()."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")}

    def settings(first, **extra):
        code = SPY_ON_LIBC + f"import {first}, os, utils; print(os.environ.get('OMP_WAIT_POLICY'), " \
            "os.environ.get('THP_MEM_ALLOC_ENABLE'), 'libc.so.6' in Spy.loaded)"
        p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env={**env, **extra})
        assert p.returncode == 0, p.stderr
        return p.stdout.split()

    assert settings("sys") == ["PASSIVE", "1", "False"]
    assert settings("sys", OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE", "1", "False"]
    assert settings("torch") == ["None", "None", "False"]
    for script in SCRIPTS:
        source = open(os.path.join(root, script)).read()
        first_import = re.search(r"^(?:import|from) (\w+)", source, re.M).group(1)
        assert first_import == "utils", f"{script} imports {first_import} before utils"


def test_glibc_memory_settings_are_made_by_setup(monkeypatch):
    calls = []
    monkeypatch.setattr(utils, "_keep_freed_memory", lambda: calls.append("mallopt"))
    utils.setup(argparse.Namespace(device="cpu", seed=1, cuda_seed=2, batch_size=4, amp=False, tf32=False,
                                   deterministic=False))
    assert calls == ["mallopt"]

"""Checkpoints: the authors' releases load, ours resume exactly, bad files end in one clear line."""
import collections
import csv
import os

import pytest
import torch

import checkpoints
import legacy_checkpoint
from conftest import NETWORKS, SCRIPTS, exit_message, network, run_main


def authors_checkpoint(script, path, prefix="module.", **kw):
    """An authors' release byte for byte as Python 2.7 + PyTorch 0.3.1 wrote it (tests/legacy_checkpoint.py):
    CUDA storages, dict keys as Python 2 byte strings, _rebuild_tensor v1, a DataParallel `module.` prefix,
    their `arch` and an SGD state of that time. Returns the weights it holds."""
    net, _ = network(script, time_steps=2)
    weights = net.state_dict()
    legacy_checkpoint.authors_checkpoint({prefix + k: (v.numpy().astype("<f4").tobytes(), tuple(v.shape))
                                          for k, v in weights.items()}, path, **kw)
    return weights


# ----------------------------------------------------------------------------------------------
# The authors' releases

@pytest.mark.parametrize("script, prefix, kw", [
    ("mnist_LeNet.py", "", {}), ("cifar10_VGG9.py", "", {}), ("cifar10_ResNet11.py", "module.", {}),  # as released
    # the same container with a Python 2 str of 256 bytes or more (BINSTRING), and with the storages pickled as
    # torch.cuda.FloatStorage, as a writer that did not normalise the storage type would have
    ("mnist_LeNet.py", "", {"arch": "r" * 300}),
    ("mnist_LeNet.py", "", {"storage_type": ("torch.cuda", "FloatStorage")})])
def test_authors_release_as_pytorch_0_3_1_wrote_it_loads_and_evaluates(script, prefix, kw, tmp_path, tiny_eval, capsys):
    path = tmp_path / "model_best.pth.tar"
    weights = authors_checkpoint(script, path, prefix, **kw)
    raw = path.read_bytes()
    assert raw.startswith(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.")  # the magic number, LONG1
    assert b"ctorch._utils\n_rebuild_tensor\n" in raw and b"U\x06cuda:0" in raw and b"U\x0astate_dict" in raw
    assert b"(I140270000000000\nI140270000004096\n" in raw  # the parameters' ids, id(p): the text opcode INT
    net = run_main(script, ["--resume", path, "--evaluate", *tiny_eval])
    out = capsys.readouterr().out
    assert "(epoch 7, best Prec@1 90.100)" in out and "Test: Prec@1 " in out and " Prec@5 " in out
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())


def test_bare_state_dict_evaluates(tmp_path, tiny_eval, capsys):
    path = tmp_path / "bare.pth"
    net, _ = network("mnist_LeNet.py")
    torch.save(net.state_dict(), path)
    run_main("mnist_LeNet.py", ["--resume", path, "-e", *tiny_eval])
    assert "Test: Prec@1" in capsys.readouterr().out


def test_authors_checkpoint_resumes_at_its_epoch_and_lr(tmp_path, tiny):
    path = tmp_path / "authors.pth.tar"
    authors_checkpoint("mnist_LeNet.py", path, prefix="")
    # epoch 7 done, LR steps after 5 and 20: epoch 8 runs at lr × 0.2
    run_main("mnist_LeNet.py", ["--resume", path, "--epochs", "8", "--lr-steps", "5,20", "--out-dir", tmp_path,
                                *tiny])
    rows = list(csv.DictReader(open(tmp_path / "log_mnist1.csv")))
    assert [(r["epoch"], float(r["lr"])) for r in rows] == [("8", pytest.approx(0.0085 * 0.2))]
    ckpt = torch.load(tmp_path / "checkpointT1_mnist1.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 8 and ckpt["best_prec1"] == 90.1  # a synthetic epoch does not beat the release


# ----------------------------------------------------------------------------------------------
# Ours

def test_resume_is_exact(tmp_path, tiny):
    """Two epochs in one run, or one epoch and a resume: the same weights, bit for bit."""
    args = [*tiny, "--dropout", "0.2", "--lr-steps", "1"]  # dropout masks and an LR step cross the resume
    straight = run_main("mnist_LeNet.py", [*args, "--epochs", "2", "--out-dir", tmp_path / "a"])
    run_main("mnist_LeNet.py", [*args, "--epochs", "1", "--out-dir", tmp_path / "b"])
    resumed = run_main("mnist_LeNet.py", [*args, "--epochs", "2", "--out-dir", tmp_path / "b",
                                          "--resume", tmp_path / "b" / "checkpointT1_mnist1.pth.tar"])
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    a, b = (list(csv.DictReader(open(tmp_path / d / "log_mnist1.csv"))) for d in "ab")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]


def test_checkpoint_holds_plain_data_only(tmp_path, tiny):
    run_main("mnist_LeNet.py", [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    ckpt = torch.load(tmp_path / "checkpointT1_mnist1.pth.tar", map_location="cpu", weights_only=True)
    assert list(ckpt["state_dict"]) == [f"{k}.weight" for k in NETWORKS["mnist_LeNet.py"][1]]  # no module.
    assert ckpt["arch"] == "LeNet" and ckpt["args"]["lr_steps"] == [75] and ckpt["args"]["tag"] == "mnist1"
    assert ckpt["scheduler"]["last_epoch"] == 1 and ckpt["rng_cpu"].dtype == torch.uint8


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpointT1_x.pth.tar")
    checkpoints.atomic_write(path, lambda f: torch.save({"epoch": 1}, f))

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_write(path, lambda f: torch.save({"epoch": 2}, f))
    assert os.listdir(tmp_path) == ["checkpointT1_x.pth.tar"]
    assert torch.load(path, weights_only=True) == {"epoch": 1}


# ----------------------------------------------------------------------------------------------
# Bad checkpoints: one line, exit 1, never training from scratch

def test_missing_checkpoint_from_the_shell(run_script, tmp_path, tiny_eval, clean_error):
    p = run_script("cifar10_ResNet11.py", "--resume", tmp_path / "model_bestT1_cifar10_r11.pth.tar", "--evaluate",
                   *tiny_eval)
    clean_error(p, "model_bestT1_cifar10_r11.pth.tar: no such file")
    assert "Prec@1" not in p.out


def test_missing_checkpoint_never_trains_from_scratch(tmp_path, tiny):
    code, message = exit_message("mnist_LeNet.py", ["--resume", tmp_path / "nope.pth.tar", "--out-dir", tmp_path,
                                                    *tiny])
    assert code == 1 and "no such file" in message and os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["directory", "device"])
def test_resume_of_what_is_not_a_file_says_what_it_is(kind, tmp_path, tiny_eval):
    path, what = (tmp_path, "is a directory, not a checkpoint file") if kind == "directory" else \
        ("/dev/null", "is a character device, not a checkpoint file")
    code, message = exit_message("mnist_LeNet.py", ["--resume", path, "-e", *tiny_eval])
    assert code == 1 and message.startswith(f"error: --resume {path} {what}"), message
    if kind == "directory":
        assert f"--out-dir {path} --resume auto" in message


def lenet_checkpoint(path, **keys):
    net = network("mnist_LeNet.py", time_steps=2)[0]
    torch.save({"epoch": 1, "arch": "LeNet", "state_dict": net.state_dict(), "best_prec1": 50.0, **keys}, path)
    return net


@pytest.mark.parametrize("key,value,what", [
    ("epoch", -4, "a whole number ≥ 0"), ("epoch", "3", "a whole number ≥ 0"), ("epoch", 2.0, "a whole number"),
    ("epoch", True, "a whole number"), ("best_prec1", float("nan"), "a Prec@1 from 0 to 100"),
    ("best_prec1", "high", "a Prec@1"), ("best_prec1", 150.0, "a Prec@1"), ("best_prec1", torch.ones(3), "a Prec@1"),
    ("args", ["lr", 0.1], "a dict"), ("optimizer", [], "an optimizer's state_dict"), ("arch", 9, "a name"),
    ("scheduler", {"last_epoch": "1", "milestones": {}}, "a schedule"),
    ("scheduler", {"last_epoch": 1, "milestones": {0: 1}}, "a schedule"),
    ("rng_cpu", torch.zeros(10, dtype=torch.uint8), "a CPU generator state"),
    ("rng_cpu", torch.get_rng_state().float(), "a CPU generator state"),
    ("rng_cuda", torch.zeros(16), "None or CUDA generator states")])
def test_checkpoint_metadata_is_validated(key, value, what, tmp_path):
    """Each key a checkpoint may hold is checked as a class on load: one line naming the key, the value
    and what it must be; never a traceback later, a run of epochs -4…3, or a best model never written."""
    path = tmp_path / "odd.pth.tar"
    net = lenet_checkpoint(path, **{key: value})
    with pytest.raises(SystemExit) as e:
        checkpoints.load_checkpoint(str(path), net)
    assert str(e.value).startswith(f"error: --resume {path}: its {key} is ") and what in str(e.value), e.value


def test_checkpoint_metadata_of_the_authors_and_ours_passes(tmp_path):
    path = tmp_path / "ok.pth.tar"
    net = lenet_checkpoint(path, best_prec1=torch.tensor(98.5), rng_cpu=torch.get_rng_state(), rng_cuda=None,
                           scheduler={"last_epoch": 1, "milestones": collections.Counter([70, 100])}, args={})
    assert checkpoints.load_checkpoint(str(path), net)["epoch"] == 1


def test_complex_tensors_are_neither_weights_nor_finite_by_default(tmp_path, tiny_eval):
    """A complex weight would lose its imaginary part on load; a NaN in either part is non-finite."""
    net = network("mnist_LeNet.py", time_steps=2)[0]
    state = net.state_dict()
    state["fc1.weight"] = torch.complex(state["fc1.weight"], torch.zeros_like(state["fc1.weight"]))
    path = tmp_path / "complex.pth.tar"
    torch.save({"epoch": 1, "best_prec1": 5.0, "state_dict": state}, path)
    code, message = exit_message("mnist_LeNet.py", ["--resume", path, "-e", *tiny_eval])
    assert code == 1 and "is not a LeNet checkpoint: dtype fc1.weight torch.complex64" in message
    nan = torch.tensor([1 + 1j, complex(0, float("nan"))])
    assert checkpoints.non_finite({"w": nan, "v": torch.ones(2, dtype=torch.complex64)}) == ["w"]
    assert not checkpoints.all_finite(nan) and checkpoints.all_finite(torch.arange(3))


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, tiny):
    """RLIMIT_FSIZE stands in for a full disk: the write fails (EFBIG, as ENOSPC would) inside torch's
    zip writer. One line says which file, that the previous one is intact, and how to continue."""
    resource = pytest.importorskip("resource", reason="RLIMIT_FSIZE needs the resource module (Unix)")
    run_main("mnist_LeNet.py", [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    checkpoint, best = tmp_path / "checkpointT1_mnist1.pth.tar", tmp_path / "model_bestT1_mnist1.pth.tar"
    before = checkpoint.read_bytes()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:  # room for the log, not for a checkpoint (2 MB)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, limit[1]))
    except (ValueError, OSError) as e:
        pytest.skip(f"this machine does not let a process lower RLIMIT_FSIZE ({e})")
    try:
        code, message = exit_message("mnist_LeNet.py", [*tiny, "--epochs", "2", "--out-dir", tmp_path, "--resume",
                                                        "auto"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    target = best if message.startswith(f"error: cannot write {best}") else checkpoint
    assert code == 1 and message.startswith(f"error: cannot write {target} (File too large); the previous "
                                            f"{target.name} is intact. Stopped; {checkpoint} holds epoch 1: "
                                            f"continue with --resume {checkpoint}"), message
    assert checkpoint.read_bytes() == before and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    run_main("mnist_LeNet.py", [*tiny, "--epochs", "2", "--out-dir", tmp_path, "--resume", "auto"])
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2

@pytest.mark.parametrize("damage", ["random bytes", "truncated", "empty"])
def test_corrupt_checkpoint(damage, tmp_path, tiny_eval):
    good, bad = tmp_path / "good.pth.tar", tmp_path / "bad.pth.tar"
    torch.save(network("mnist_LeNet.py")[0].state_dict(), good)
    data = {"random bytes": os.urandom(4096), "truncated": good.read_bytes()[:2000], "empty": b""}[damage]
    bad.write_bytes(data)
    code, message = exit_message("mnist_LeNet.py", ["--resume", bad, "-e", *tiny_eval])
    assert code == 1 and "corrupt, truncated, or not loadable" in message and "\n" not in message, message


def test_checkpoint_of_another_architecture(tmp_path, tiny_eval):
    path = tmp_path / "lenet.pth.tar"
    authors_checkpoint("mnist_LeNet.py", path)
    code, message = exit_message("cifar10_VGG9.py", ["--resume", path, "-e", *tiny_eval])
    assert code == 1 and "not a VGG9 checkpoint" in message and "\n" not in message
    assert "missing cnn11.weight" in message and "unexpected cnn1.weight" in message
    assert "fc0.weight (200, 2450) vs (1024, 4096)" in message


def test_checkpoint_without_weights(tmp_path, tiny_eval):
    path = tmp_path / "stats.pth"
    torch.save({"epoch": 3, "best_prec1": 50.0}, path)
    code, message = exit_message("mnist_LeNet.py", ["--resume", path, "-e", *tiny_eval])
    assert code == 1 and "no state_dict" in message


def test_checkpoint_with_non_finite_weights(tmp_path, tiny_eval):
    """It would evaluate without a word, and --stats would claim an energy advantage: one line instead."""
    path = tmp_path / "diverged.pth.tar"
    state = network("mnist_LeNet.py")[0].state_dict()
    state["fc0.weight"][3, 5], state["cnn2.weight"][0, 0, 0, 0] = float("nan"), float("inf")
    torch.save({"epoch": 4, "best_prec1": 10.0, "state_dict": state}, path)
    code, message = exit_message("mnist_LeNet.py", ["--resume", path, "-e", "--stats", "--out-dir", tmp_path / "s",
                                                    *tiny_eval])
    assert code == 1 and "NaN or inf (cnn2.weight, fc0.weight)" in message and "diverged" in message
    assert not (tmp_path / "s" / "stats.json").exists()


@pytest.mark.parametrize("buffer,phrase", [
    (torch.zeros(3), "momentum_buffer of fc0.weight has shape (3,), not (200, 2450)"),
    (torch.full((200, 2450), float("nan")), "momentum_buffer of fc0.weight holds NaN or inf")])
def test_optimizer_state_that_does_not_fit(buffer, phrase, tmp_path, tiny):
    """torch checks only the number of parameters; a wrong buffer would fail after the first batch."""
    net, _ = network("mnist_LeNet.py", time_steps=2)
    optimizer = torch.optim.SGD(net.parameters(), 0.01, momentum=0.9).state_dict()
    optimizer["state"] = {2: {"momentum_buffer": buffer}}  # fc0.weight
    path = tmp_path / "crafted.pth.tar"
    torch.save({"epoch": 1, "best_prec1": 0.0, "state_dict": net.state_dict(), "optimizer": optimizer}, path)
    code, message = exit_message("mnist_LeNet.py", ["--resume", path, "--epochs", "2", "--out-dir", tmp_path / "run",
                                                    *tiny])
    assert code == 1 and f"its optimizer state does not fit ({phrase})" in message
    assert not (tmp_path / "run" / "log_mnist1.csv").exists()


def test_resume_applies_the_optimizer_flags_given_and_keeps_the_others(tmp_path, tiny, capsys):
    """Run with --lr 0.01 --momentum 0.5, then resume with --lr 0.002 alone: the new LR (at its place in
    the schedule), with a note; the checkpoint's momentum, although the default is 0."""
    steps = [*tiny, "--lr-steps", "1", "--out-dir", tmp_path]
    run_main("mnist_LeNet.py", [*steps, "--epochs", "1", "--lr", "0.01", "--momentum", "0.5"])
    assert "=> note" not in capsys.readouterr().out
    run_main("mnist_LeNet.py", [*steps, "--epochs", "2", "--lr", "0.002", "--resume", "auto"])
    assert "=> note: the flags given replace the checkpoint's optimizer settings: --lr 0.01 → 0.002\n" in \
        capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "log_mnist1.csv")))
    assert [float(r["lr"]) for r in rows] == [0.01, pytest.approx(0.002 * 0.2)]  # after the step at epoch 1
    ckpt = torch.load(tmp_path / "checkpointT1_mnist1.pth.tar", map_location="cpu", weights_only=True)
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.5 and group["initial_lr"] == 0.002 and ckpt["scheduler"]["base_lrs"] == [0.002]
    assert (ckpt["args"]["lr"], ckpt["args"]["momentum"]) == (0.002, 0.5)  # the args say what ran

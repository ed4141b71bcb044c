"""Nothing destroyed, nothing silently taken: outputs that are not regular files or are the run's own
input, blank paths, settings that differ from the checkpoint's, silent networks, flags a mode ignores,
filesystem errors on every path (docs/checkpoints.md)."""
import builtins
import errno
import json
import os
import stat

import pytest
import torch

import checkpoints
import paths
import utils
from conftest import exit_message, network, run_main

LENET = "mnist_LeNet.py"
CKPT = "checkpointT1_mnist1.pth.tar"
BEST = "model_bestT1_mnist1.pth.tar"


def lenet_checkpoint(path, args=None, sign=1.0, **keys):
    """A LeNet checkpoint of ours (args: the run's settings it records), with weights of one sign if asked."""
    net = network(LENET, time_steps=2)[0]
    state = net.state_dict()
    if sign < 0:
        state = {k: -v.abs() for k, v in state.items()}
    torch.save({"epoch": 1, "arch": "LeNet", "state_dict": state, "best_prec1": 50.0,
                **({"args": args} if args is not None else {}), **keys}, path)
    return state


def fifo(path):
    os.mkfifo(path)
    return path


def is_fifo(path):
    return stat.S_ISFIFO(os.lstat(path).st_mode)


def parse_error(argv, capsys):
    """(exit code, the one stderr line) of a command the parser refuses."""
    with pytest.raises(SystemExit) as e:
        run_main(LENET, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return e.value.code, err[0]


# ----------------------------------------------------------------------------------------------
# Outputs never replace what is not a regular file, nor the run's own input

@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("kind", ["named pipe", "directory"])
def test_export_nir_never_replaces_what_is_not_a_regular_file(kind, overwrite, tmp_path):
    ckpt = tmp_path / "lenet.pth.tar"
    lenet_checkpoint(ckpt)
    target = fifo(tmp_path / "out.nir") if kind == "named pipe" else tmp_path / "out.nir"
    if kind == "directory":
        target.mkdir()
    code, message = exit_message(LENET, ["--resume", ckpt, "--export-nir", target, *overwrite])
    assert code == 1 and message.startswith(f"error: --export-nir {target} is a {kind}: a run writes regular "
                                            f"files only"), message
    assert (is_fifo(target) if kind == "named pipe" else target.is_dir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.pth.tar", "out.nir"]  # no temp file either


@pytest.mark.parametrize("how", ["the same path", "a relative path", "a symbolic link", "a hard link"])
def test_export_nir_never_replaces_the_checkpoint_it_reads(how, tmp_path, monkeypatch):
    ckpt = tmp_path / "lenet.pth.tar"
    lenet_checkpoint(ckpt)
    before = ckpt.read_bytes()
    monkeypatch.chdir(tmp_path)
    target = {"the same path": ckpt, "a relative path": "./lenet.pth.tar", "a symbolic link": tmp_path / "link",
              "a hard link": tmp_path / "hard"}[how]
    if how == "a symbolic link":
        os.symlink(ckpt, target)
    elif how == "a hard link":
        os.link(ckpt, target)
    code, message = exit_message(LENET, ["--resume", ckpt, "--export-nir", target, "--overwrite"])
    assert code == 1 and "is the same file as --resume" in message, message
    assert ckpt.read_bytes() == before


def test_a_run_never_deletes_or_replaces_what_is_not_a_regular_file_in_its_out_dir(tmp_path, tiny, tiny_eval):
    fifo(tmp_path / "log_mnist1.csv")
    for extra in ([], ["--overwrite"]):
        code, message = exit_message(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path, *extra])
        assert code == 1 and "log_mnist1.csv is a named pipe, not a file this run may write or delete" in message
        assert is_fifo(tmp_path / "log_mnist1.csv")
    os.unlink(tmp_path / "log_mnist1.csv")
    fifo(tmp_path / ".lock_mnist1")  # opening it would hang, or lock nothing
    code, message = exit_message(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    assert code == 1 and ".lock_mnist1 is a named pipe" in message
    os.unlink(tmp_path / ".lock_mnist1")
    (tmp_path / "stats_mnist1").write_text("a file where the stats' folder goes")
    code, message = exit_message(LENET, [*tiny_eval, "--evaluate", "--stats", "--out-dir", tmp_path])
    assert code == 1 and "stats_mnist1 is a regular file, not a directory" in message


def test_overwrite_never_deletes_the_checkpoint_a_run_resumes_from(tmp_path, tiny, capsys):
    run_main(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    best = (tmp_path / BEST).read_bytes()
    # a fresh start from the out-dir's own model_best with --overwrite would delete the file it starts from
    code, message = exit_message(LENET, [*tiny, "--epochs", "2", "--out-dir", tmp_path, "--overwrite",
                                         "--resume", tmp_path / BEST])
    assert code == 1 and f"--resume {tmp_path / BEST} is this --out-dir's own {BEST}, which this run would delete " \
        "(--overwrite)" in message and "resume from a copy of it outside --out-dir" in message, message
    assert (tmp_path / BEST).read_bytes() == best
    # continuing the out-dir's own checkpoint: --overwrite deletes nothing, and says so
    capsys.readouterr()
    run_main(LENET, [*tiny, "--epochs", "2", "--out-dir", tmp_path, "--overwrite", "--resume", tmp_path / CKPT])
    assert f"=> --overwrite deletes nothing: this run continues {tmp_path / CKPT} (--resume)" in capsys.readouterr().out
    rows = (tmp_path / "log_mnist1.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]


# ----------------------------------------------------------------------------------------------
# Blank paths

@pytest.mark.parametrize("value", ["", "  "])
@pytest.mark.parametrize("flag", ["--resume", "--export-nir", "--data-dir", "--out-dir"])
def test_every_path_flag_refuses_an_empty_value(flag, value, tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written anywhere: not even a lock file
    code, line = parse_error([*tiny, "--epochs", "1", flag, value], capsys)
    assert code == 2 and f"argument {flag}: must name a path, not be empty or blank, got {value!r}" in line
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# What a checkpoint fixes, the checkpoint decides

def settings(**kw):
    return {"time_steps": 3, "leak": 0.95, "dropout": 0.1, "dataset": "mnist", "seed": 7, **kw}


def untimed(tiny):
    """tiny without --time-steps: the checkpoint's T applies."""
    i = tiny.index("--time-steps")
    return tiny[:i] + tiny[i + 2:]


def test_evaluation_takes_the_checkpoints_settings_and_notes_a_flag_that_differs(tmp_path, tiny_eval, capsys):
    ckpt = tmp_path / "c.pth.tar"
    lenet_checkpoint(ckpt, settings())
    net = run_main(LENET, [*untimed(tiny_eval), "--resume", ckpt, "--evaluate"])
    assert (net.time_steps, net.leak) == (3, 0.95) and all(m.leak == 0.95 for n, m in net.neuron_layers()
                                                             if n.startswith(("cnn", "fc")))
    assert "=> --time-steps 3, --leak 0.95, --dropout 0.1: the checkpoint's, not the script's default" in \
        capsys.readouterr().out
    net = run_main(LENET, [*tiny_eval, "--resume", ckpt, "--evaluate", "--leak", "0.5"])
    assert (net.time_steps, net.leak) == (2, 0.5)
    assert "=> note: the flags given replace the network settings the checkpoint was trained with: --time-steps " \
           "3 → 2, --leak 0.95 → 0.5" in capsys.readouterr().out


def test_a_resume_records_the_settings_it_ran_with(tmp_path, tiny, capsys):
    ckpt = tmp_path / "c.pth.tar"
    lenet_checkpoint(ckpt, settings(), rng_cpu=torch.get_rng_state())
    out = tmp_path / "run"
    run_main(LENET, [*untimed(tiny), "--resume", ckpt, "--epochs", "2", "--dropout", "0.2", "--out-dir", out])
    saved = torch.load(out / CKPT, weights_only=True)["args"]
    assert (saved["time_steps"], saved["leak"], saved["dropout"], saved["seed"]) == (3, 0.95, 0.2, 7)
    assert "--dropout 0.1 → 0.2" in capsys.readouterr().out


def test_seed_on_a_resume_is_applied_and_recorded(tmp_path, tiny, capsys):
    ckpt = tmp_path / "c.pth.tar"
    lenet_checkpoint(ckpt, settings(), rng_cpu=torch.get_rng_state())
    run_main(LENET, [*tiny, "--resume", ckpt, "--epochs", "2", "--seed", "123", "--out-dir", tmp_path / "a"])
    assert "=> note: --seed 123 replaces the random state saved in" in capsys.readouterr().out
    assert torch.load(tmp_path / "a" / CKPT, weights_only=True)["args"]["seed"] == 123
    # another seed draws other spikes and masks: the seed is applied, not replaced by the saved state
    run_main(LENET, [*tiny, "--resume", ckpt, "--epochs", "2", "--seed", "456", "--out-dir", tmp_path / "b"])
    a, b = (torch.load(tmp_path / d / CKPT, weights_only=True)["rng_cpu"] for d in "ab")
    assert not torch.equal(a, b)
    # the checkpoint's own seed given again changes nothing: the resume stays exact
    capsys.readouterr()
    run_main(LENET, [*tiny, "--resume", ckpt, "--epochs", "2", "--seed", "7", "--out-dir", tmp_path / "c"])
    run_main(LENET, [*tiny, "--resume", ckpt, "--epochs", "2", "--out-dir", tmp_path / "d"])
    assert "replaces the random state" not in capsys.readouterr().out
    c, d = (torch.load(tmp_path / x / CKPT, weights_only=True)["rng_cpu"] for x in "cd")
    assert torch.equal(c, d)


def test_resuming_on_another_dataset_starts_the_best_afresh(tmp_path, tiny, capsys):
    ckpt = tmp_path / "c.pth.tar"
    lenet_checkpoint(ckpt, settings(dataset="fashion-mnist"), best_prec1=99.0)  # resumed on MNIST, given
    out = tmp_path / "run"
    run_main(LENET, [*tiny, "--resume", ckpt, "--epochs", "2", "--out-dir", out, "--dataset", "mnist"])
    printed = capsys.readouterr().out
    assert "--dataset fashion-mnist → mnist" in printed
    assert f"=> note: {ckpt} was trained on fashion-mnist: its best Prec@1 99.000 is not one on mnist; the best " \
           f"model here is chosen afresh" in printed
    assert (out / BEST).exists() and torch.load(out / BEST, weights_only=True)["best_prec1"] < 99.0


def test_without_dataset_a_resume_continues_on_the_checkpoints(tmp_path, tiny, capsys):
    ckpt = tmp_path / "c.pth.tar"
    lenet_checkpoint(ckpt, settings(dataset="fashion-mnist"), best_prec1=99.0)
    run_main(LENET, [*tiny, "--resume", ckpt, "--epochs", "2", "--out-dir", tmp_path / "run"])
    printed = capsys.readouterr().out
    assert "--dataset fashion-mnist" in printed and "chosen afresh" not in printed
    assert torch.load(tmp_path / "run" / CKPT, weights_only=True)["args"]["dataset"] == "fashion-mnist"


def test_nir_export_records_the_checkpoints_t_and_leak(tmp_path, capsys):
    import nir
    ckpt, path = tmp_path / "c.pth.tar", tmp_path / "c.nir"
    lenet_checkpoint(ckpt, settings())
    run_main(LENET, ["--resume", ckpt, "--export-nir", path])
    graph = nir.read(str(path))
    lif = graph.nodes["cnn1.lif"]
    assert int(graph.metadata["time_steps"]) == 3
    assert 1 - graph.metadata["dt"] / lif.tau.flat[0] == pytest.approx(0.95)
    code, message = exit_message(LENET, ["--resume", ckpt, "--export-nir", tmp_path / "d.nir", "--leak", "0.5"])
    assert code == 1 and "--leak 0.5: " in message and "holds --leak 0.95" in message
    assert not (tmp_path / "d.nir").exists()


def test_nonsense_settings_in_a_checkpoint_are_one_line(tmp_path, tiny_eval):
    ckpt = tmp_path / "c.pth.tar"
    lenet_checkpoint(ckpt, settings(leak=7.0))
    code, message = exit_message(LENET, [*tiny_eval, "--resume", ckpt, "--evaluate"])
    assert code == 1 and "its args hold leak = 7.0, not a value of --leak" in message


# ----------------------------------------------------------------------------------------------
# A silent network is never reported as a result

def test_a_network_that_never_answers_is_no_result(tmp_path, tiny_eval, capsys):
    ckpt = tmp_path / "dead.pth.tar"
    lenet_checkpoint(ckpt, sign=-1.0)  # no neuron ever fires: every output is 0
    run_main(LENET, [*tiny_eval, "--resume", ckpt, "--evaluate", "--stats", "--out-dir", tmp_path])
    out, err = capsys.readouterr()
    assert "WARNING: the network gave no answer for every test image" in err
    assert "ANN/SNN undefined (the network never answered: every output tied)" in out
    saved = json.loads((tmp_path / "stats_mnist1" / "stats.json").read_text())
    assert saved["energy"]["ann_over_snn"] is None and saved["totals"]["synops_per_ann_mac"] is None
    assert saved["accuracy"]["tied"] == 100.0


# ----------------------------------------------------------------------------------------------
# Every flag is used or refused

@pytest.mark.parametrize("extra", [["--evaluate"], ["--stats"], ["--time-sweep", "2"], ["--amp"],
                                   ["--dropout", "0.1"], ["--seed", "3"], ["--data-dir", "x"]])
def test_export_nir_refuses_the_flags_it_would_ignore(extra, tmp_path, capsys):
    ckpt = tmp_path / "c.pth.tar"
    lenet_checkpoint(ckpt)
    code, line = parse_error(["--resume", ckpt, "--export-nir", tmp_path / "x.nir", *extra], capsys)
    assert code == 2 and "--export-nir writes the checkpoint's network and exits: " in line and extra[0] in line, line
    assert not (tmp_path / "x.nir").exists()


@pytest.mark.parametrize("extra", [["--lr", "0.1"], ["--epochs", "3"], ["--dropout", "0.1"], ["--overwrite"],
                                   ["--batch-size", "4"], ["--limit-train", "4"]])
def test_evaluate_refuses_the_training_flags(extra, tmp_path, tiny_eval, capsys):
    code, line = parse_error([*tiny_eval, "--evaluate", *extra], capsys)
    assert code == 2 and line.endswith(f"--evaluate trains nothing and writes nothing: {extra[0]} does not apply; "
                                       f"drop it (see --help)"), line
    if extra[0] != "--overwrite":  # which an evaluation that writes its stats reads
        code, line = parse_error([*tiny_eval, "--evaluate", "--stats", "--out-dir", tmp_path, *extra], capsys)
        assert code == 2 and f"--evaluate trains nothing: {extra[0]} does not apply" in line, line


def test_workers_are_capped_by_what_the_loader_can_use(tmp_path, tiny_eval, capsys):
    flags = [*tiny_eval[:tiny_eval.index("-j")], *tiny_eval[tiny_eval.index("-j") + 2:]]
    run_main(LENET, [*flags, "--evaluate", "-j", "1000"])  # 16 images in one mini-batch of 16
    assert "=> note: -j 1000 lowered to 1: 1 mini-batch to load" in capsys.readouterr().out


def test_an_evaluation_states_its_test_batch_not_a_training_step(tiny_eval, capsys):
    run_main(LENET, [*tiny_eval, "--evaluate", "--test-batch-size", "8"])
    printed = capsys.readouterr().out
    assert "8 test images per batch" in printed and "training images" not in printed


# ----------------------------------------------------------------------------------------------
# Filesystem errors on every path: one line naming the path and the reason

def refuse(path, error=errno.EACCES):
    def fail(*args, **kwargs):
        raise PermissionError(error, os.strerror(error), str(path))
    return fail


def test_an_unreadable_data_dir_is_one_line(tmp_path, tiny_eval, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": refuse(data)() if str(p) == str(data) else listdir(p))
    flags = [f for f in tiny_eval if f != "--synthetic"]
    code, message = exit_message(LENET, [*flags, "--evaluate", "--data-dir", data])
    assert code == 1 and message == f"error: --data-dir {data} cannot be read (Permission denied)"


def test_an_unreadable_file_inside_the_data_is_one_line(tmp_path, tiny_eval, monkeypatch):
    monkeypatch.setattr(utils.data, "get_loader", refuse("/data/FashionMNIST/raw/t10k-images-idx3-ubyte"))
    code, message = exit_message(LENET, [*tiny_eval, "--evaluate"])
    assert code == 1 and message == "error: /data/FashionMNIST/raw/t10k-images-idx3-ubyte: Permission denied"


def test_an_unreadable_checkpoint_is_one_line(tmp_path, tiny_eval, monkeypatch):
    ckpt = tmp_path / "c.pth.tar"
    lenet_checkpoint(ckpt)
    real_stat, real_open = os.stat, builtins.open
    # a folder on its path that may not be searched: the file cannot even be looked at (not "no such file")
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: refuse(ckpt)() if str(p) == str(ckpt)
                        else real_stat(p, *a, **k))
    code, message = exit_message(LENET, [*tiny_eval, "--evaluate", "--resume", ckpt])
    assert code == 1 and message == f"error: --resume {ckpt} cannot be read (Permission denied)"
    monkeypatch.setattr(os, "stat", real_stat)  # a file that may be looked at, not read
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: refuse(ckpt)() if str(p) == str(ckpt)
                        else real_open(p, *a, **k))
    code, message = exit_message(LENET, [*tiny_eval, "--evaluate", "--resume", ckpt])
    assert code == 1 and message == f"error: --resume {ckpt} cannot be read (Permission denied)"


def test_an_unwritable_out_dir_is_one_line(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(checkpoints.tempfile, "TemporaryFile", refuse(tmp_path))
    code, message = exit_message(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    assert code == 1 and message == f"error: --out-dir {tmp_path} is not writable (Permission denied)"


@pytest.mark.parametrize("flag", ["--resume", "--out-dir", "--data-dir", "--export-nir"])
def test_a_symbolic_link_loop_is_named(flag, tmp_path, tiny, tiny_eval):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    ckpt = tmp_path / "c.pth.tar"
    lenet_checkpoint(ckpt)
    argv = {"--resume": [*tiny_eval, "--evaluate", "--resume", loop],
            "--out-dir": [*tiny, "--epochs", "1", "--out-dir", loop],
            "--data-dir": [*[f for f in tiny_eval if f != "--synthetic"], "--evaluate", "--data-dir", loop],
            "--export-nir": ["--resume", ckpt, "--export-nir", loop, "--overwrite"]}[flag]
    code, message = exit_message(LENET, argv)
    assert code == 1 and message == f"error: {flag} {loop} is a symbolic link loop", message


def test_look_says_why_a_path_names_nothing(tmp_path):
    assert paths.look(tmp_path / "nope") == (None, "no such file")
    os.symlink(tmp_path / "nope", tmp_path / "dangling")
    assert paths.look(tmp_path / "dangling") == (None, "is a symbolic link to nothing")
    assert paths.kind(os.stat(tmp_path).st_mode) == "a directory"
    assert paths.kind(os.stat(fifo(tmp_path / "p")).st_mode) == "a named pipe"


# ----------------------------------------------------------------------------------------------
# Lines that say what is really wrong

def test_a_torch_compile_checkpoint_loads(tmp_path, tiny_eval):
    ckpt = tmp_path / "compiled.pth.tar"
    state = network(LENET, time_steps=2)[0].state_dict()
    torch.save({"state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}}, ckpt)
    net = run_main(LENET, [*tiny_eval, "--evaluate", "--resume", ckpt])
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_export_nir_from_resume_auto_without_a_checkpoint(tmp_path, capsys):
    code, line = parse_error(["--resume", "auto", "--out-dir", tmp_path, "--export-nir", tmp_path / "x.nir"], capsys)
    assert code == 2 and f"--resume auto: there is no {tmp_path / CKPT} to export" in line

"""A training run owns its --out-dir: no second run starts over a finished one's files or beside a live
one, --resume auto re-runs after a kill, a kill at any point loses no epoch, and the last words are true."""
import csv
import fcntl
import os
import signal
import subprocess
import sys

import torch

import checkpoints
import utils
from conftest import ROOT, exit_message, network, run_main

LENET = "mnist_LeNet.py"
FILES = ("checkpointT1_mnist1.pth.tar", "model_bestT1_mnist1.pth.tar", "log_mnist1.csv")


def log_rows(out):
    with open(out / "log_mnist1.csv", newline="") as f:
        return list(csv.DictReader(f))


def contents(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}


def test_a_fresh_run_over_a_previous_one_is_refused_until_overwrite(tmp_path, tiny, capsys):
    run_main(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    assert capsys.readouterr().out.splitlines()[-1].endswith(
        f"; {', '.join(FILES)}, training_curves_mnist1.png in {tmp_path}")  # the final line names the files written
    before = contents(tmp_path)

    code, message = exit_message(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    assert code == 1 and message.startswith(f"error: --out-dir {tmp_path} holds a previous run's {', '.join(FILES)}")
    assert f"--resume {tmp_path}/checkpointT1_mnist1.pth.tar" in message and "--overwrite" in message
    # a run from another checkpoint is a fresh run as well, and one from the out-dir's model_best would replace it
    code, message = exit_message(LENET, [*tiny, "--epochs", "2", "--out-dir", tmp_path,
                                         "--resume", tmp_path / "model_bestT1_mnist1.pth.tar"])
    assert code == 1 and "is this --out-dir's own model_bestT1_mnist1.pth.tar, which this run would replace" \
        in message
    assert contents(tmp_path) == before

    run_main(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path, "--overwrite"])
    assert f"=> --overwrite: deleted {tmp_path}/checkpointT1_mnist1.pth.tar" in capsys.readouterr().out
    assert [r["epoch"] for r in log_rows(tmp_path)] == ["1"]  # the new run's rows alone


def test_resume_auto_starts_continues_and_stops(tmp_path, tiny, tiny_eval, capsys):
    auto = [*tiny, "--resume", "auto", "--out-dir", tmp_path]
    run_main(LENET, [*auto, "--epochs", "1"])  # nothing to resume: a fresh start
    run_main(LENET, [*auto, "--epochs", "2"])
    checkpoint = tmp_path / "checkpointT1_mnist1.pth.tar"
    assert f"=> loaded {checkpoint} (epoch 1," in capsys.readouterr().out
    assert [r["epoch"] for r in log_rows(tmp_path)] == ["1", "2"]

    run_main(LENET, [*auto, "--epochs", "2"])  # a job script re-run after the run ended: nothing to do, exit 0
    assert f"=> {checkpoint} holds 2 epochs, and --epochs is 2: nothing to train" in capsys.readouterr().out
    code, message = exit_message(LENET, [*tiny, "--resume", checkpoint, "--epochs", "2", "--out-dir", tmp_path])
    assert code == 1 and "nothing to train; raise --epochs" in message
    code, message = exit_message(LENET, [*tiny_eval, "--resume", "auto", "-e", "--out-dir", tmp_path / "empty"])
    assert code == 1 and "there is no" in message and "to evaluate" in message


def test_a_second_run_beside_a_live_one_is_refused(tmp_path, tiny, monkeypatch):
    """While the first run trains, a second in the same --out-dir (even with --overwrite) stops at once;
    the lock goes with the first run, its file stays behind harmlessly."""
    second = []
    train = utils.train_one_epoch

    def train_and_start_another(*args):
        second.append(exit_message(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path, "--overwrite"]))
        return train(*args)

    monkeypatch.setattr(utils, "train_one_epoch", train_and_start_another)
    run_main(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    (code, message), = second
    assert code == 1 and f"--out-dir {tmp_path} is in use by another run of mnist1 (training, process " in message
    assert (tmp_path / ".lock_mnist1").exists()
    monkeypatch.undo()
    run_main(LENET, [*tiny, "--epochs", "2", "--out-dir", tmp_path, "--resume", "auto"])  # the stale file is no lock


def test_a_file_system_without_locks_warns_and_runs(tmp_path, tiny, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(checkpoints.fcntl, "flock", no_locks)
    run_main(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    assert f"WARNING: cannot lock {tmp_path}/.lock_mnist1 (No locks available)" in capsys.readouterr().err
    assert (tmp_path / "checkpointT1_mnist1.pth.tar").exists()


def test_a_kill_between_log_row_and_checkpoint_loses_no_epoch(tmp_path, tiny, monkeypatch, capsys):
    """The log row of an epoch goes in before its checkpoint: a kill between them leaves a row the
    checkpoint lacks (and the temp file of the save); the resume drops both and runs that epoch again."""
    run_main(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    stray = tmp_path / ".checkpointT1_mnist1.pth.tar.k1ll3d0x.tmp"

    def killed(state, is_best, args):
        stray.write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(utils, "save_checkpoint", killed)
    auto = [*tiny, "--epochs", "2", "--out-dir", tmp_path, "--resume", "auto"]
    checkpoint = tmp_path / "checkpointT1_mnist1.pth.tar"
    assert exit_message(LENET, auto) == (1, f"interrupted in epoch 2; {checkpoint} holds epoch 1: continue with "
                                            f"--resume {checkpoint}")
    lost = log_rows(tmp_path)
    assert [r["epoch"] for r in lost] == ["1", "2"]
    monkeypatch.undo()

    run_main(LENET, auto)
    out = capsys.readouterr().out
    assert f"=> removed {stray}, left by a save that was killed" in out and "=> dropped epoch 2 from" in out
    rows = log_rows(tmp_path)
    assert [r["epoch"] for r in rows] == ["1", "2"] and not stray.exists()
    assert rows[1]["train_loss"] == lost[1]["train_loss"]  # the same epoch again: the resume is exact
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2


def test_resume_auto_over_a_first_epoch_killed_before_its_checkpoint(tmp_path, tiny, monkeypatch):
    def killed(state, is_best, args):
        raise KeyboardInterrupt

    monkeypatch.setattr(utils, "save_checkpoint", killed)
    auto = [*tiny, "--epochs", "1", "--out-dir", tmp_path, "--resume", "auto"]
    assert exit_message(LENET, auto) == (1, "interrupted in epoch 1; nothing was saved")
    monkeypatch.undo()
    code, message = exit_message(LENET, auto[:-2])  # without auto that log is a previous run's
    assert code == 1 and "log_mnist1.csv: start over with --overwrite (deletes them), or choose" in message and "--resume" not in message
    run_main(LENET, auto)
    assert [r["epoch"] for r in log_rows(tmp_path)] == ["1"] and (tmp_path / FILES[0]).exists()


def test_interrupted_evaluation_says_it_wrote_nothing(tmp_path, tiny_eval, monkeypatch):
    path = tmp_path / "bare.pth"
    torch.save(network(LENET, time_steps=2)[0].state_dict(), path)

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(utils, "validate", interrupted)
    code, message = exit_message(LENET, [*tiny_eval, "--resume", path, "-e", "--stats", "--out-dir", tmp_path / "s"])
    assert (code, message) == (1, "interrupted; the evaluation wrote nothing")
    assert not (tmp_path / "s" / "stats.json").exists()


def test_every_file_carries_the_tag_and_the_lock_covers_the_evaluation_too(tmp_path, tiny, tiny_eval):
    """Training writes training_curves_<tag>.png beside its checkpoints; --evaluate --stats writes
    stats_<tag>/, under the same lock, and is refused over a previous evaluation's files, as a training run
    is over a previous run's (its curves alone included)."""
    run_main(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    assert sorted(contents(tmp_path)) == sorted([*FILES, "training_curves_mnist1.png"])
    evaluate = [*tiny_eval, "--resume", tmp_path / FILES[0], "-e", "--stats", "--out-dir", tmp_path]
    with open(tmp_path / ".lock_mnist1") as held:  # another run of the tag, live
        fcntl.flock(held, fcntl.LOCK_EX)
        code, message = exit_message(LENET, evaluate)
    assert code == 1 and f"--out-dir {tmp_path} is in use by another run of mnist1" in message
    run_main(LENET, evaluate)
    assert sorted(os.listdir(tmp_path / "stats_mnist1")) == ["spike_rates.png", "stats.json"]
    code, message = exit_message(LENET, evaluate)
    assert code == 1 and "holds a previous evaluation's stats_mnist1/stats.json, stats_mnist1/spike_rates.png" \
        in message and "--overwrite" in message
    run_main(LENET, [*evaluate, "--overwrite"])
    for name in FILES:
        os.unlink(tmp_path / name)
    code, message = exit_message(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    assert code == 1 and "holds a previous run's training_curves_mnist1.png" in message


def test_sigterm_stops_like_ctrl_c_and_the_run_resumes(tmp_path, tiny, monkeypatch):
    """What a cluster scheduler sends before it preempts a job: the same last words as Ctrl-C, the
    handler given back afterwards, and --resume auto goes on from the last checkpoint."""
    run_main(LENET, [*tiny, "--epochs", "1", "--out-dir", tmp_path])
    validate = utils.validate

    def preempted(*args, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return validate(*args, **kw)

    monkeypatch.setattr(utils, "validate", preempted)
    auto = [*tiny, "--epochs", "2", "--out-dir", tmp_path, "--resume", "auto"]
    checkpoint = tmp_path / FILES[0]
    before = signal.getsignal(signal.SIGTERM)
    assert exit_message(LENET, auto) == (1, f"terminated (SIGTERM) in epoch 2; {checkpoint} holds epoch 1: "
                                            f"continue with --resume {checkpoint}")
    assert signal.getsignal(signal.SIGTERM) == before
    monkeypatch.undo()
    run_main(LENET, auto)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2


def test_sigterm_to_the_whole_job_loader_workers_included_is_one_line(tmp_path, tiny):
    """A scheduler signals every process of the job: the data loader's workers end too, which is no
    error of its own (no traceback from the loader), only the run's last words."""
    flags = ["-j", "2", "--time-steps", "8", "--dead-patience", "1000", "--limit-train", "60000", "--epochs", "1",
             "-p", "5", "--out-dir", tmp_path]
    p = subprocess.Popen([sys.executable, LENET, *tiny, *flags], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in p.stdout:
        if line.startswith("=> epoch 1 [10/"):  # training, its workers running
            break
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert (p.returncode, err.strip()) == (1, "terminated (SIGTERM) in epoch 1; nothing was saved"), err

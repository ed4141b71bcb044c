"""torchrun: two CPU processes (gloo on loopback) train one epoch like one process would."""
import os
import socket
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the script's own main(), plus one line the script does not have: each rank saves the weights it holds
WORKER = """
import os, sys
import torch
sys.path.insert(0, {root!r})
import mnist_LeNet, utils
net = utils.main(mnist_LeNet.LeNet, mnist_LeNet.DEFAULTS, ("mnist", "fashion-mnist"), argv=sys.argv[1:])
torch.save(net.state_dict(), os.path.join({weights!r}, "rank" + os.environ["RANK"] + ".pt"))
"""

# rank 1 is killed (SIGKILL: no last words of its own) where it would validate its first epoch
KILLED = """
import os, signal, sys
sys.path.insert(0, {root!r})
import mnist_LeNet, utils
if os.environ["RANK"] == "1":
    utils.validate = lambda *args, **kw: os.kill(os.getpid(), signal.SIGKILL)
utils.main(mnist_LeNet.LeNet, mnist_LeNet.DEFAULTS, ("mnist", "fashion-mnist"), argv=sys.argv[1:])
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(worker, flags):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), str(worker), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_processes_train_alike_and_save_one_resumable_checkpoint(tmp_path, tiny, run_script):
    out, weights = tmp_path / "out", tmp_path / "weights"
    weights.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=ROOT, weights=str(weights)))
    flags = [*tiny, "--limit-train", "64", "--epochs", "1", "--out-dir", str(out)]  # 2 mini-batches per rank
    p = torchrun(worker, flags)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log
    assert log.count("=> world size: 2") == 1 and log.count("=> epoch 1/1") == 1, log  # rank 0 speaks alone
    assert "Grad strides do not match bucket view strides" not in log, log  # gradients in their weights' layout

    rank0, rank1 = (torch.load(weights / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert sorted(os.listdir(out)) == [".lock_mnist1", "checkpointT1_mnist1.pth.tar", "log_mnist1.csv",  # rank 0
                                       "model_bestT1_mnist1.pth.tar", "training_curves_mnist1.png"]  # alone writes
    ckpt = torch.load(out / "checkpointT1_mnist1.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["world_size"] == 2
    assert all(torch.equal(v, rank0[k]) for k, v in ckpt["state_dict"].items())  # no module. prefix
    trained = ckpt["state_dict"]["fc1.weight"]

    p = run_script("mnist_LeNet.py", *flags[:-4], "--epochs", "2", "--out-dir", out,
                   "--resume", out / "checkpointT1_mnist1.pth.tar")
    assert p.returncode == 0 and "=> world size: 1" in p.stdout, p.out
    ckpt = torch.load(out / "checkpointT1_mnist1.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and not torch.equal(ckpt["state_dict"]["fc1.weight"], trained)


# a dataset whose download takes a second and leaves a note of the rank that made it
DOWNLOAD_WORKER = """
import argparse, os, sys, time
sys.path.insert(0, {root!r})
import torch.distributed as dist
import data, utils

class Counted:
    def __init__(self, root, transform=None, download=False, train=True):
        if not os.path.exists(os.path.join(root, "data")):
            if not download:
                raise RuntimeError("Dataset not found. You can use download=True to download it")
            with open(os.path.join(root, "downloads"), "a") as f:
                f.write(os.environ["RANK"] + "\\n")
            time.sleep(1.0)
            open(os.path.join(root, "data"), "w").close()

    def __len__(self):
        return 4

data.TORCHVISION["counted"] = Counted
args = argparse.Namespace(dataset="counted", data_dir={data!r}, synthetic=False, limit_train=None, limit_val=None)
utils.processes(args)
dist.init_process_group("gloo")
assert len(data.get_dataset(args, train=True)) == 4
dist.destroy_process_group()
"""


def test_under_torchrun_one_process_per_node_downloads(tmp_path):
    """The other processes wait for it at a barrier, then read what it downloaded: two processes
    writing the same files at once would corrupt them."""
    worker = tmp_path / "worker.py"
    worker.write_text(DOWNLOAD_WORKER.format(root=ROOT, data=str(tmp_path)))
    p = torchrun(worker, [])
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "downloads").read_text().split() == ["0"]


def test_a_rank_that_dies_leaves_the_survivor_one_line(tmp_path, tiny):
    """The survivor's collective fails (gloo: connection reset), or torchrun's SIGTERM comes first: one
    line either way, saying what is on disk, and no traceback of ours (torchrun's own summary follows)."""
    worker = tmp_path / "killed.py"
    worker.write_text(KILLED.format(root=ROOT))
    p = torchrun(worker, [*tiny, "--limit-train", "64", "--epochs", "1", "--out-dir", str(tmp_path / "out")])
    assert p.returncode != 0
    ours = [line for line in p.stderr.splitlines() if "nothing was saved" in line]
    assert len(ours) == 1 and (ours[0].startswith("error: rank 0: another process of this torchrun job has ended (")
                               or ours[0].startswith("terminated (SIGTERM) in epoch 1;")), p.stderr
    assert "[rank0]: Traceback" not in p.stderr and "File \"" + str(worker) not in p.stderr, p.stderr

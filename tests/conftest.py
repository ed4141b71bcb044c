"""Shared fixtures and helpers: the repository on sys.path, the four networks, a script's main() in this
process, spike trains, a subprocess runner, tiny offline flags, the Fashion-MNIST guard."""
import importlib
import os
import subprocess
import sys

# Triton's kernels run on CPU tensors in its interpreter unless told otherwise (a GPU machine sets
# TRITON_INTERPRET=0 to test them compiled); it is read when triton is imported, hence before torch
os.environ.setdefault("TRITON_INTERPRET", "1")
# deterministic cuBLAS (the CUDA exactness tests ask for it) needs this before its first call
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# script -> (network class, the paper's weights in network order with their shapes, one input image)
NETWORKS = {
    "mnist_LeNet.py": ("LeNet", {
        "cnn1": (20, 1, 5, 5), "cnn2": (50, 20, 5, 5), "fc0": (200, 2450), "fc1": (10, 200)}, (1, 28, 28)),
    "cifar10_VGG9.py": ("VGG9", {
        "cnn11": (64, 3, 3, 3), "cnn12": (64, 64, 3, 3),
        "cnn21": (128, 64, 3, 3), "cnn22": (128, 128, 3, 3),
        "cnn31": (256, 128, 3, 3), "cnn32": (256, 256, 3, 3), "cnn33": (256, 256, 3, 3),
        "fc0": (1024, 4096), "fc1": (10, 1024)}, (3, 32, 32)),
    "cifar10_ResNet11.py": ("ResNet11", {
        "cnn11": (64, 3, 3, 3),
        "cnn21": (128, 64, 3, 3), "cnn22": (128, 128, 3, 3), "shortcut1.0": (128, 64, 1, 1),
        "cnn31": (256, 128, 3, 3), "cnn32": (256, 256, 3, 3), "shortcut2.0": (256, 128, 1, 1),
        "cnn41": (512, 256, 3, 3), "cnn42": (512, 512, 3, 3), "shortcut3.0": (512, 256, 1, 1),
        "cnn51": (512, 512, 3, 3), "cnn52": (512, 512, 3, 3),
        "fc0": (1024, 8192), "fc1": (10, 1024)}, (3, 32, 32)),
    "svhn_ResNet.py": ("ResNet7", {
        "cnn11": (64, 3, 3, 3),
        "cnn21": (128, 64, 3, 3), "cnn22": (128, 128, 3, 3), "shortcut1.0": (128, 64, 1, 1),
        "cnn31": (256, 128, 3, 3), "cnn32": (256, 256, 3, 3), "shortcut2.0": (256, 128, 1, 1),
        "fc0": (1024, 16384), "fc1": (10, 1024)}, (3, 32, 32)),
}
TAGS = {"mnist_LeNet.py": "mnist1", "cifar10_VGG9.py": "cifar10_v9", "cifar10_ResNet11.py": "cifar10_r11",
        "svhn_ResNet.py": "svhn_r7"}
SCRIPTS = list(NETWORKS)


def network(script, **kw):
    """(network, script module): the script's network class built with kw, with the input scale of the
    script's default dataset (as a run sets it)."""
    import data
    module = importlib.import_module(script[:-3])
    net = getattr(module, NETWORKS[script][0])(**kw)
    net.input_scale = data.DATASETS[module.DEFAULTS["dataset"]].scale
    return net, module


def run_main(script, argv):
    """The script's main() in this process; returns the trained or evaluated network."""
    import utils
    net, module = network(script, time_steps=2)
    return utils.main(type(net), module.DEFAULTS, argv=[str(a) for a in argv])


def exit_message(script, argv):
    """(exit code, message) of a run that must stop with SystemExit (which Python prints without a
    traceback); a message must be one line."""
    with pytest.raises(SystemExit) as e:
        run_main(script, argv)
    code = e.value.code
    if isinstance(code, str):
        assert "\n" not in code, code
        return 1, code
    return code, ""


def signed_spikes(shape, rate=0.3, seed=0, device="cpu"):
    """Random spikes in {-1, 0, 1} (float64), firing with probability `rate`."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(shape, generator=g) < rate).double() * torch.sign(torch.randn(shape, generator=g))
    return s.to(device)


@pytest.fixture
def fashion_mnist():
    """Skips a test that needs Fashion-MNIST where it is not installed; fails it in CI, which installs it."""
    import data
    if not os.path.isdir(data.DEBIAN_FASHION_MNIST):
        if os.environ.get("CI"):
            pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist")
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    return data.DEBIAN_FASHION_MNIST


@pytest.fixture
def tiny():
    """Flags for a run that takes seconds: T = 2, a few synthetic images, no workers, no bar."""
    return ["--synthetic", "--time-steps", "2", "--limit-train", "32", "--limit-val", "16", "-b", "16",
            "--test-batch-size", "16", "-j", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture
def tiny_eval(tiny):
    """tiny for an evaluation, without the training flags it would refuse (-b, --limit-train)."""
    drop = {i + d for i, f in enumerate(tiny) if f in ("-b", "--limit-train") for d in (0, 1)}
    return [f for i, f in enumerate(tiny) if i not in drop]


@pytest.fixture
def offline():
    """Environment in which a torchvision download fails at once, even on a connected machine."""
    proxy = "http://127.0.0.1:9"  # nothing listens on the discard port
    return {"http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "no_proxy": ""}


@pytest.fixture
def run_script():
    """run_script("mnist_LeNet.py", *flags, env={...}) -> CompletedProcess, plus .out = stdout + stderr."""
    def run(script, *flags, env=None, timeout=600):
        p = subprocess.run([sys.executable, script, *map(str, flags)], cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, **(env or {})})
        p.out = p.stdout + p.stderr
        return p
    return run


@pytest.fixture
def clean_error():
    """clean_error(p, *phrases): bad input ended with exit 1 (or `code`), no traceback, and one stderr
    line holding every phrase."""
    def check(p, *phrases, code=1):
        assert p.returncode == code, p.out
        assert "Traceback" not in p.out, p.out
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, p.stderr
        for phrase in phrases:
            assert phrase in lines[0], lines[0]
    return check

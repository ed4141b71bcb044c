"""A run's first minutes on a GPU, checked on a CPU: the numerics it sets (IEEE float32, --tf32,
--deterministic), the one-line errors for a GPU the torch build cannot drive and for kernels that
fail at their first launch, the note when `auto` has no compiled backend, and the host reads of a
training step on the Triton backend (in Triton's interpreter)."""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import spiking_kernels
import utils
from conftest import ROOT, exit_message, run_main
from spiking_kernels import triton_gpu


def setup_args(**flags):
    return argparse.Namespace(**{**dict(device="cpu", seed=1, cuda_seed=2, batch_size=4, amp=False, tf32=False,
                                        deterministic=False), **flags})


@pytest.fixture
def torch_flags(monkeypatch):
    """The process-wide torch settings setup() makes, restored after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
             torch.backends.cudnn.benchmark)
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
    torch.use_deterministic_algorithms(saved[2])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[3:]


@pytest.mark.parametrize("amp", [False, True])
def test_a_run_computes_in_ieee_float32_unless_tf32_is_asked_for(amp, torch_flags):
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # as a library might leave them
    utils.setup(setup_args(amp=amp))
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
    utils.setup(setup_args(amp=amp, tf32=True))
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


def test_tf32_and_deterministic_from_the_command_line(tiny_eval, torch_flags):
    run_main("mnist_LeNet.py", [*tiny_eval, "--evaluate", "--tf32", "--deterministic"])
    assert torch.backends.cudnn.allow_tf32 and torch.are_deterministic_algorithms_enabled()


def test_deterministic_sets_what_it_promises(torch_flags):
    utils.setup(setup_args(deterministic=True))
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    utils.setup(setup_args())
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert torch.backends.cudnn.benchmark  # the fastest algorithm for the run's fixed shapes


# ----------------------------------------------------------------------------------------------
# Seeds: Poisson spikes and dropout masks are drawn on the device, so --seed must reach CUDA

def seeds_set_up(monkeypatch, script, argv, rank=0):
    """(CPU seed, CUDA seed) that utils.setup leaves torch with (the last call to each wins)."""
    import importlib
    calls = {"cpu": [], "cuda": []}
    monkeypatch.setattr(torch, "manual_seed", calls["cpu"].append)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", calls["cuda"].append)
    monkeypatch.setenv("RANK", str(rank))
    defaults = importlib.import_module(script[:-3]).DEFAULTS
    utils.setup(utils.get_parser("", defaults).parse_args([*argv, "--device", "cpu"]))
    return calls["cpu"][-1], calls["cuda"][-1]


@pytest.mark.parametrize("script, authors", [("mnist_LeNet.py", (1, 42)), ("cifar10_VGG9.py", (3, 44))])
def test_seed_seeds_cuda_too_and_without_it_the_authors_pair_holds(script, authors, monkeypatch, torch_flags):
    assert seeds_set_up(monkeypatch, script, []) == authors
    assert seeds_set_up(monkeypatch, script, ["--seed", "7"]) == (7, 7)
    assert seeds_set_up(monkeypatch, script, ["--seed", "8"]) == (8, 8)
    assert seeds_set_up(monkeypatch, script, ["--seed", "7"], rank=3) == (10, 10)  # each process its own draws
    assert seeds_set_up(monkeypatch, script, [], rank=3) == (authors[0] + 3, authors[1] + 3)


def test_help_says_what_seed_seeds():
    import mnist_LeNet
    text = " ".join(utils.get_parser("", mnist_LeNet.DEFAULTS).format_help().split())
    assert "CPU and CUDA alike" in text and "the authors' pair: torch 1, CUDA 42" in text


# ----------------------------------------------------------------------------------------------
# No usable CUDA GPU: a run on --device auto says why it is on the CPU; --device cuda ends with the reason

NO_DRIVER = ("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed a "
             "driver from http://www.nvidia.com/Download/index.aspx")
OLD_DRIVER = ("The NVIDIA driver on your system is too old (found version 12040). Please update your GPU driver by "
              "downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx "
              "Alternatively, go to: https://pytorch.org to install a PyTorch version that has been compiled with "
              "your version of the CUDA driver.")
# (torch.version.cuda, what torch.cuda.init() raises: torch's own diagnosis) -> what the line must say
CAUSES = [
    ("13.0", NO_DRIVER, ["no NVIDIA driver is installed", "install its driver"]),
    ("13.0", OLD_DRIVER, ["the NVIDIA driver supports CUDA up to 12.4", "built for CUDA 13.0",
                          "install a torch build for CUDA 12", "cu126 or cu128"]),
    (None, None, ["is built without CUDA", "install a torch build for your driver's CUDA version"]),
    ("13.0", "No CUDA GPUs are available", ["the NVIDIA driver finds no GPU (CUDA_VISIBLE_DEVICES='')"]),
    ("13.0", "CUDA driver initialization failed, you might not have a CUDA gpu.",
     ["torch: CUDA driver initialization failed, you might not have a CUDA gpu"]),
]


@pytest.fixture
def no_cuda(monkeypatch):
    """no_cuda(version, said): torch built for CUDA `version` (None: without CUDA) finds no GPU, and
    torch.cuda.init() raises `said`."""
    def make(version, said):
        def init():
            raise (AssertionError("Torch not compiled with CUDA enabled") if version is None else RuntimeError(said))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "init", init)
        monkeypatch.setattr(torch.version, "cuda", version)
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return make


@pytest.mark.parametrize("version, said, phrases", CAUSES)
def test_auto_on_the_cpu_warns_with_torchs_reason_and_the_fix(version, said, phrases, no_cuda, torch_flags, capsys):
    no_cuda(version, said)
    assert utils.setup(setup_args(device="auto")).type == "cpu"
    (line,) = [s for s in capsys.readouterr().err.splitlines() if s.startswith("WARNING: no usable CUDA GPU (")]
    assert "this run computes on the CPU" in line and "or --device cpu to say that the CPU is meant" in line
    assert all(phrase in line for phrase in phrases), line


@pytest.mark.parametrize("version, said, phrases", CAUSES)
def test_device_cuda_without_a_usable_gpu_is_one_line_with_the_reason(version, said, phrases, no_cuda, torch_flags):
    no_cuda(version, said)
    with pytest.raises(SystemExit) as e:
        utils.setup(setup_args(device="cuda"))
    message = str(e.value)
    assert message.startswith("error: --device cuda, but there is no usable CUDA GPU: ") and "\n" not in message
    assert all(phrase in message for phrase in phrases), message


def test_device_cpu_given_is_no_fallback(no_cuda, torch_flags, capsys):
    no_cuda("13.0", NO_DRIVER)
    utils.setup(setup_args(device="cpu"))
    assert "WARNING" not in capsys.readouterr().err


needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a usable CUDA GPU")


@needs_no_gpu
def test_a_training_run_on_auto_here_says_why_and_how_long_its_epoch_takes(tiny, tmp_path, capsys):
    run_main("mnist_LeNet.py", [*tiny, "--device", "auto", "-b", "4", "--limit-train", "40", "--epochs", "1",
                                "--out-dir", tmp_path])  # 10 mini-batches
    out, err = capsys.readouterr()
    (line,) = [s for s in err.splitlines() if s.startswith("WARNING: no usable CUDA GPU (")]
    assert "this run computes on the CPU" in line and "--device cpu" in line
    (estimate,) = [s for s in out.splitlines() if s.startswith("=> on the CPU, epoch 1's training takes about ")]
    assert "(10 mini-batches at " in estimate and " images/s per process, the rate of mini-batches 2-5)" in estimate


@needs_no_gpu
def test_device_cuda_here_ends_in_one_line_with_the_reason(run_script, clean_error, tiny_eval):
    p = run_script("mnist_LeNet.py", *tiny_eval, "--evaluate", "--device", "cuda")
    clean_error(p, "error: --device cuda, but there is no usable CUDA GPU: ")
    assert "Prec@1" not in p.out


# ----------------------------------------------------------------------------------------------
# GPUs the torch build has no kernels for

ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # what a CUDA 13 build of torch carries


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(name, capability, archs): torch.cuda reports such a GPU and such a build."""
    def make(name, capability, archs=ARCHS):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return make


@pytest.mark.parametrize("capability, archs", [((8, 0), ARCHS), ((8, 9), ARCHS), ((9, 0), ARCHS), ((12, 0), ARCHS),
                                               ((12, 1), ["sm_80", "compute_120"]), ((9, 4), ["gfx90a", "gfx942"])])
def test_a_gpu_the_build_has_kernels_for_passes(capability, archs, fake_gpu):
    fake_gpu("some GPU", capability, archs)
    utils.check_gpu_supported(torch.device("cuda", 0))


def test_a_gpu_the_build_has_no_kernels_for_is_one_line_naming_the_fix(fake_gpu, monkeypatch, tiny_eval):
    fake_gpu("Tesla V100-SXM2-32GB", (7, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    code, message = exit_message("mnist_LeNet.py", [*tiny_eval, "--evaluate", "--device", "cuda"])
    assert code == 1 and "Tesla V100-SXM2-32GB (sm_70) is not supported by this torch build" in message
    assert "sm_75" in message and "install a torch build with kernels for sm_70" in message


# ----------------------------------------------------------------------------------------------
# The backend's start-up check

@pytest.fixture
def interpreted_triton():
    if not spiking_kernels._interpreting():
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1), which runs its kernels on CPU tensors")
    previous = spiking_kernels.use("triton")
    yield
    spiking_kernels.use(previous)


def test_the_start_up_check_passes_on_every_backend_here():
    for name in ("numba", "torch") + (("triton",) if spiking_kernels._interpreting() else ()):
        previous = spiking_kernels.use(name)
        try:
            spiking_kernels.self_check(torch.device("cpu"), (torch.float32, torch.bfloat16))
        finally:
            spiking_kernels.use(previous)


class _FailingLaunch:
    """A kernel whose launch fails as a compiler would, with a long message."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("PTX .version 8.7 does not support .target sm_120\nptxas fatal : Ptx assembly "
                               "aborted due to errors\n" + "a long compiler log\n" * 30)
        return launch


def test_a_kernel_that_fails_at_its_first_launch_is_one_line(interpreted_triton, monkeypatch, tiny_eval):
    monkeypatch.setattr(triton_gpu, "_backprop_kernel", _FailingLaunch())
    code, message = exit_message("mnist_LeNet.py", [*tiny_eval, "--evaluate"])
    assert code == 1 and message.startswith("error: the triton kernels fail on the CPU: RuntimeError: PTX .version")
    assert "SPIKING_BACKEND=torch" in message and "long compiler log" not in message


def test_a_kernel_that_computes_wrongly_is_one_line(interpreted_triton, monkeypatch, tiny_eval):
    monkeypatch.setattr(triton_gpu, "leaky_sum", lambda current, u, leak: u + 1)
    code, message = exit_message("mnist_LeNet.py", [*tiny_eval, "--evaluate"])
    assert code == 1 and "leaky_sum disagrees with the tensor operations" in message
    assert "SPIKING_BACKEND=torch" in message


@pytest.fixture
def not_installed(monkeypatch):
    """not_installed(name): `auto` finds that compiled backend missing (as if it were not installed)."""
    real = spiking_kernels._installed

    def make(missing):
        monkeypatch.setattr(spiking_kernels, "_installed", lambda name: (None, f"No module named {missing!r}")
                            if name == missing else real(name))
        monkeypatch.setattr(spiking_kernels, "_interpreting", lambda: False)
        spiking_kernels._auto_with_reason.cache_clear()
    previous = spiking_kernels.use("auto")
    yield make
    monkeypatch.undo()
    spiking_kernels._auto_with_reason.cache_clear()
    spiking_kernels.use(previous)


def test_auto_on_cuda_without_triton_says_it_falls_back_to_tensor_ops(not_installed):
    not_installed("triton")
    kernels, note = spiking_kernels.check_device(torch.device("cuda", 0))  # no GPU needed: nothing runs
    assert kernels.name == "torch"
    assert "SPIKING_BACKEND=auto falls back to tensor operations on cuda (No module named 'triton')" in note


def test_the_fallback_note_is_printed_by_a_run(not_installed, tiny_eval, capsys):
    not_installed("numba")
    run_main("mnist_LeNet.py", [*tiny_eval, "--evaluate"])
    warnings = [s for s in capsys.readouterr().err.splitlines() if s.startswith("WARNING: SPIKING_BACKEND=auto")]
    assert len(warnings) == 1 and "falls back to tensor operations on cpu" in warnings[0]


# ----------------------------------------------------------------------------------------------
# Host reads: each stalls a GPU's queue until the device has caught up

READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def count_host_reads(counts):
    """Counts the reads of tensor values made from the repository's own code (not torch's, Triton's
    interpreter's or the tests'), by the function that made them."""
    def counted(original, name):
        def read(*args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(ROOT) and os.sep + "tests" + os.sep not in caller.co_filename:
                counts.append(f"{name} in {caller.co_name}")
            return original(*args, **kwargs)
        return read
    with pytest.MonkeyPatch.context() as patch:
        for name in READS:
            patch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), name))
        patch.setattr(torch, "equal", counted(torch.equal, "torch.equal"))
        yield counts


def test_a_training_step_reads_from_the_device_once(interpreted_triton, monkeypatch, tiny, tmp_path):
    """The loss, the firing rates and the batch metrics travel in one tensor, read once before
    backward (so that a non-finite loss still stops before the step); validation reads once a batch."""
    reads = {"train_one_epoch": [], "validate": []}
    for name, found in reads.items():
        def spied(*args, _run=getattr(utils, name), _found=found, **kwargs):
            with count_host_reads(_found):
                return _run(*args, **kwargs)
        monkeypatch.setattr(utils, name, spied)
    run_main("mnist_LeNet.py", [*tiny, "--limit-train", "48", "--epochs", "1", "--out-dir", tmp_path])
    assert reads["train_one_epoch"] == ["tolist in train_one_epoch"] * 3  # 3 steps of 16 images
    assert reads["validate"] == ["tolist in validate"]  # 1 batch of 16 test images


# ----------------------------------------------------------------------------------------------
# benchmarks/gpu_check.sh: every step runs, and the summary holds its figures

GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def test_the_gpu_check_runs_here_as_a_dry_run(tmp_path):
    p = subprocess.run(["bash", GPU_CHECK, "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OUT": str(tmp_path)})
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    summary = json.load(open(tmp_path / "gpu_check.json"))
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [
        ("versions", "ok"), ("engine tests", "ok"), ("benchmark", "ok"), ("script epoch", "ok")]
    assert re.fullmatch(r"\d+ passed, \d+ deselected", summary["engine_tests"]), summary["engine_tests"]
    rows = summary["benchmark"]
    assert {(r["model"], r["precision"], r["mode"]) for r in rows} == {
        (m, p, mode) for m in ("vgg9", "resnet11") for p in ("ieee", "amp", "tf32") for mode in ("train", "infer")}
    assert all(r["speedup"] > 0 and r["agree"] == 1.0 for r in rows if r["precision"] == "ieee")
    assert summary["script_epoch_seconds"] is not None
    tail = p.stdout.rstrip().splitlines()
    assert "=== summary" in tail and tail[-1].startswith("log and figures:")  # the table comes last

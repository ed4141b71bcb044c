"""The loop shared by the four paper scripts: CLI, setup, train/validate, health, stats, the run.

Each script calls `main(Model, DEFAULTS, datasets)`. The sections follow the order of a run; its data
(datasets, downloads, loaders) are in data.py, its files (checkpoints, the CSV log, the out-dir it
owns) in checkpoints.py.

    python mnist_LeNet.py --dataset fashion-mnist                      one process, CPU or GPU
    torchrun --nproc_per_node=4 cifar10_VGG9.py                        DDP: --batch-size is per process
    python cifar10_ResNet11.py --resume model_bestT1_cifar10_r11.pth.tar --evaluate
    python mnist_LeNet.py --resume model_bestT1_mnist1.pth.tar --evaluate --stats --time-sweep 10,20,50,100
    python cifar10_VGG9.py --out-dir runs/v9 --resume auto              a job script's command: re-run after preemption
"""
import argparse
import contextlib
import ctypes
import math
import os
import re
import signal
import sys
import time
import warnings

# Process settings for the engine on a CPU, named once here (benchmarks/harness.py builds its
# environments from them; docs/performance.md has the measurements):
# - OMP_WAIT_POLICY=PASSIVE: libgomp's threads otherwise spin after every parallel region, taking the
#   cores from the thread that runs the engine's compiled neuron and pooling loops;
# - THP_MEM_ALLOC_ENABLE=1: 2 MB pages for large tensors, so the per-chunk buffers fault in fewer pages.
# torch reads both once, when it loads, hence here, before `import torch`. A process that loaded torch
# before this module keeps its own settings (the benchmarks set them per implementation).
TORCH_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1"}
# glibc keeps freed blocks up to these sizes instead of giving them back to the system, so the per-chunk
# buffers are not faulted in again at every step; set by setup() (mallopt applies whenever it is called)
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30  # glibc's largest mmap threshold; keep up to 1 GB


def _keep_freed_memory():
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


if "torch" not in sys.modules:
    for _name, _value in TORCH_SETTINGS.items():
        os.environ.setdefault(_name, _value)

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import stats
from cli_types import COUNT, EPOCHS, NATURAL, PATH, SEED, STEPS, SeedAll as _SeedAll, finite as _finite
from checkpoints import (NonFiniteError, RunFiles, WriteError, append_csv, check_checkpoint_file, check_dirs,
                         check_weights_finite, checkpoint_state, first_line, load_checkpoint, log,
                         other_dataset, restore_training, resume_settings, save_checkpoint, set_lr_for_epoch,
                         take_settings, writes_files)
from flags import cap_workers, check_flags_used
from health import DeadLayerError, HealthMonitor
from paths import check_output

try:
    import spiking_kernels  # reads SPIKING_BACKEND
except RuntimeError as e:  # an unknown or unavailable backend: one line, not a traceback
    raise SystemExit(f"error: {e}")



# ----------------------------------------------------------------------------------------------
# CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, not the 15-line usage block before it
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass  # "(default: …)" after every flag, and the script's docstring as written


def get_parser(description, defaults, datasets=None):
    """Every flag of every script, defined once; the script's DEFAULTS dict sets their values."""
    p = _Parser(description=description, formatter_class=_Formatter)
    a = p.add_argument
    datasets = datasets or data.fitting(defaults["dataset"])  # those whose images fit the network, and folder
    shape = data.image_shape(defaults["dataset"])
    a("--dataset", choices=datasets, metavar="|".join(datasets), help="the images to learn; the output layer has one "
      "neuron per class. folder: --data-dir/train/<class>/… and --data-dir/test/<class>/… (torchvision's "
      f"ImageFolder layout), classes named by their folders, each image converted to the network's "
      f"{shape[0]} channel(s), resized (shorter side) and centre-cropped to {shape[1]}×{shape[2]}, normalised "
      f"into [-1, 1], no augmentation")
    a("-b", "--batch-size", type=COUNT, metavar="N", help="training mini-batch size *per process*")
    a("--test-batch-size", type=COUNT, metavar="N", help="test mini-batch size per process")
    a("--lr", type=_finite(lambda x: x > 0, "must be a finite number > 0"), help="initial learning rate (SGD)")
    a("--lr-steps", type=EPOCHS, metavar="E1,E2", help="epochs (increasing) after which the LR is multiplied by 0.2")
    a("--momentum", type=_finite(lambda x: 0 <= x < 1, "must lie in [0, 1)"), metavar="M",
      help="SGD momentum; 0 is faithful: the authors parsed --momentum 0.9 but never passed it to SGD")
    a("--wd", "--weight-decay", type=_finite(lambda x: x >= 0, "must be a finite number ≥ 0"), dest="weight_decay",
      metavar="W", help="weight decay")
    a("--epochs", type=COUNT, metavar="N", help="train until this many epochs are complete")
    a("--start-epoch", type=NATURAL, default=0, metavar="N", help="epochs already done, for a restart without "
      "a checkpoint (--resume overrides it)")
    a("-p", "--print-freq", type=COUNT, default=100, metavar="N", help="a status line every N mini-batches "
      "when the progress bar is off")
    a("--resume", type=PATH, metavar="PATH", help="checkpoint to start from: ours, or the authors' releases. 'auto': "
      "--out-dir's own checkpointT1_<tag>.pth.tar if there is one, else a fresh start (a command to re-run "
      "after preemption). Optimizer flags given on the command line replace the checkpoint's")
    a("--overwrite", action="store_true", help="start a run in an --out-dir that holds a previous run's files "
      "of this script (checkpoints, log, curves; an evaluation's stats_<tag>/): they are deleted first, but never "
      "the checkpoint this run resumes from; with --export-nir, replace its file (a regular file only)")
    a("-e", "--evaluate", action="store_true", help="evaluate on the test set and exit")
    a("-j", "--workers", type=NATURAL, default=2, metavar="N", help="data loading worker processes")
    a("--time-steps", type=COUNT, metavar="T", help="time steps per image, training and test")
    a("--leak", type=_finite(lambda x: 0 < x <= 1, "must lie in (0, 1]"), help="leak factor λ of the LIF membranes")
    a("--dropout", type=_finite(lambda x: 0 <= x < 1, "must lie in [0, 1)"),
      help="probability of the time-fixed dropout after each spiking layer")
    a("--seed", type=SEED, action=_SeedAll, metavar="S", help="seed of every generator a run draws from, CPU and "
      "CUDA alike (+ rank under torchrun): initialisation, shuffling, Poisson spikes, dropout masks. Without it, "
      f"the authors' pair: torch %(default)s, CUDA {defaults['cuda_seed']}")
    a("--data-dir", type=PATH, default="./data", metavar="DIR", help="torchvision datasets are read (or downloaded) here; "
      "with --dataset folder, the folder of train/ and test/")
    a("--synthetic", action="store_true", help="deterministic random images of the dataset's shape and number "
      "of classes (torchvision FakeData), instead of the dataset: for smoke tests and CI; learns nothing")
    a("--limit-train", type=COUNT, metavar="N", help="use only the first N training examples")
    a("--limit-val", type=COUNT, metavar="N", help="use only the first N test examples")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    a("--time-chunk", type=COUNT, metavar="K", help="time steps per convolution call; default: all T on a "
      "GPU, ~256 images per call on a CPU (80 for VGG9). Results do not depend on it")
    a("--amp", action="store_true", help="bfloat16 autocast around forward and loss")
    a("--tf32", action="store_true", help="TensorFloat-32 for float32 convolutions and matmuls on GPUs that have "
      "it (Ampere and newer): faster, but it changes the numerics and the spike trains; the default is IEEE "
      "float32, as the paper computed")
    a("--deterministic", action="store_true", help="deterministic cuDNN and cuBLAS algorithms, for bit-identical "
      "reruns and resumes on one GPU (slower); without it cuDNN picks the fastest algorithm per shape")
    a("--out-dir", type=PATH, default=".", metavar="DIR", help="checkpoints, the CSV log and plots go here, named by the "
      "script's tag")
    a("--no-progress", action="store_true", help="no tqdm bar (also off when stdout is not a terminal)")
    a("--dead-patience", type=COUNT, default=10, metavar="N", help="warn once a layer has been silent (below "
      "1e-3 spikes per neuron per step) or saturated, or the outputs stayed near 0, for N consecutive mini-batches")
    a("--stop-on-dead", action="store_true", help="exit with an error instead of that warning")
    a("--stats", action="store_true", help="with --evaluate: count spikes, synaptic operations and energy in "
      "the same evaluation pass; print a table, write stats.json and PNG plots to --out-dir/stats_<tag>/. Under "
      "torchrun the counts of all ranks are summed")
    a("--time-sweep", type=STEPS, metavar="T1,T2", help="with --evaluate: Prec@1 read out after each of these "
      "numbers of time steps (increasing), in the same pass (table, stats.json, plot); a step beyond --time-steps "
      "raises --time-steps to it")
    a("--export-nir", type=PATH, metavar="PATH", help="with --resume: write the network as a NIR graph (docs/nir.md) "
      "and exit; needs no data; never replaces what is not a regular file, nor the checkpoint itself. --resume also "
      "reads a NIR file (recognised by its content)")
    a("--nir-on-off", action="store_true", help="with --export-nir: unsigned ON/OFF input channels (first-layer "
      "weights [W, -W]) for hardware that takes only positive events")
    # lr_steps as typed on the command line: --help shows "70,100,125" and argparse parses it
    p.set_defaults(**{**defaults, "lr_steps": ",".join(map(str, defaults["lr_steps"]))},
                   image_shape=shape)  # the network's input, whatever --dataset
    return p


# ----------------------------------------------------------------------------------------------
# Seed, device, processes

def processes(args):
    """args.world_size, args.rank, args.distributed: torchrun's, or one process."""
    args.world_size, args.rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    args.distributed = args.world_size > 1


def setup(args):
    """Join torchrun's process group if there is one, pick the device and check that the engine runs
    there, set the numerics (precision, determinism), seed; glibc's memory settings."""
    processes(args)
    _keep_freed_memory()
    with warnings.catch_warnings():  # torch's multi-line warning on a failed CUDA start: no_cuda_reason() says it
        warnings.filterwarnings("ignore", "CUDA initialization")
        cuda = args.device != "cpu" and torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("error: --device cuda, but there is no usable CUDA GPU: {}; {}".format(*no_cuda_reason()))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        check_gpu_supported(device)
    try:
        _, note = spiking_kernels.check_device(device)
    except spiking_kernels.BackendError as e:
        raise SystemExit(f"error: {e}")
    set_numerics(args)
    if cuda:
        torch.cuda.set_device(device)
    if args.distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
    batch = f"{args.world_size * args.test_batch_size} test images per batch" if getattr(args, "evaluate", False) \
        else f"{args.world_size * args.batch_size} training images per step"
    log(args, f"=> world size: {args.world_size}, device: {device.type}, {batch}")
    if args.device == "auto" and not cuda:  # a run meant for a GPU would otherwise take days unnoticed
        log(args, "WARNING: no usable CUDA GPU ({}): this run computes on the CPU, many times slower; {}, or "
            "--device cpu to say that the CPU is meant".format(*no_cuda_reason()), file=sys.stderr)
    if note:
        log(args, f"WARNING: {note}; install the compiled backend for speed", file=sys.stderr)
    if args.amp and device.type == "cpu" and _cpu_has_bf16() is False:
        log(args, "WARNING: --amp on a CPU without bfloat16 instructions (no avx512_bf16 or amx_bf16): its "
            "bf16 convolutions run several times slower than float32; drop --amp here", file=sys.stderr)
    try:  # every kernel variant once, before the first batch: a compiler or driver problem is one line
        spiking_kernels.self_check(device, (torch.float32, torch.bfloat16) if args.amp else (torch.float32,))
    except spiking_kernels.BackendError as e:
        raise SystemExit(f"error: {e}")
    # + rank: each process draws its own Poisson spikes and dropout masks; DDP copies rank 0's weights
    torch.manual_seed(args.seed + args.rank)
    torch.cuda.manual_seed_all(args.cuda_seed + args.rank)
    return device


def set_numerics(args):
    """Process-wide torch settings, whatever the device (a CPU has neither TF32 nor cuDNN; a GPU later
    in the process would have them). IEEE float32 for convolutions and matmuls, as the paper computed:
    torch runs float32 convolutions in TF32 on Ampere and newer GPUs by default, and that flips spikes
    within a few time steps (docs/model.md). --tf32 opts in. --deterministic: deterministic cuDNN and
    cuBLAS algorithms; otherwise cuDNN benchmarks its algorithms once per shape (a run's shapes are fixed)."""
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first matmul
    torch.use_deterministic_algorithms(args.deterministic)
    torch.backends.cudnn.deterministic = args.deterministic
    torch.backends.cudnn.benchmark = not args.deterministic


def no_cuda_reason():
    """(reason, fix): why torch finds no usable CUDA GPU, in its own diagnosis where it has one."""
    readme = "README, Quick start"
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (f"this torch ({torch.__version__}) is built without CUDA",
                f"install a torch build for your driver's CUDA version ({readme})")
    try:
        torch.cuda.init()  # raises what the driver said; is_available() only returns False
    except Exception as e:
        said = first_line(e)
    else:
        return "torch initialises CUDA but finds no device", "check CUDA_VISIBLE_DEVICES and nvidia-smi"
    old = re.search(r"driver on your system is too old \(found version (\d+)\)", said)
    if old:  # cudaDriverGetVersion's number: 1000 * major + 10 * minor
        major, minor = divmod(int(old.group(1)) // 10, 100)
        return (f"the NVIDIA driver supports CUDA up to {major}.{minor}, and this torch ({torch.__version__}) is "
                f"built for CUDA {torch.version.cuda}", f"install a torch build for CUDA {major} ({readme}: the "
                f"cu126 or cu128 build for a CUDA 12 driver) or a newer driver")
    if "no NVIDIA driver" in said:
        return "no NVIDIA driver is installed", "on a machine with an NVIDIA GPU, install its driver"
    if "No CUDA GPUs are available" in said:
        hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
        return ("the NVIDIA driver finds no GPU" + (f" (CUDA_VISIBLE_DEVICES={hidden!r})" if hidden is not None
                                                    else ""), "check nvidia-smi and CUDA_VISIBLE_DEVICES")
    return f"torch: {said}", "check nvidia-smi and the torch build's CUDA version (torch.version.cuda)"


def check_gpu_supported(device):
    """One line naming the fix if the installed torch build has no kernels for this GPU's architecture
    (its first CUDA kernel would fail with "no kernel image is available")."""
    major, minor = torch.cuda.get_device_capability(device)
    built = torch.cuda.get_arch_list()  # e.g. sm_75 … sm_120: cubins; compute_XY: PTX, compiled by the driver
    cubins = [a for a in built if a.startswith("sm_")]
    ptx = [a for a in built if a.startswith("compute_")]
    # a cubin runs on GPUs of its major version and the same or a higher minor; PTX on any newer GPU
    if any(_arch(a) // 10 == major and _arch(a) % 10 <= minor for a in cubins) or \
            any(_arch(a) <= 10 * major + minor for a in ptx) or not (cubins or ptx):  # ROCm: gfx names
        return
    raise SystemExit(f"error: {torch.cuda.get_device_name(device)} (sm_{major}{minor}) is not supported by this "
                     f"torch build ({torch.__version__}: kernels for {', '.join(built)}); install a torch build "
                     f"with kernels for sm_{major}{minor} (README, Quick start), or run on --device cpu")


def _arch(name):
    return int("".join(c for c in name.split("_", 1)[1] if c.isdigit()))


def _cpu_has_bf16():
    """Whether this CPU computes in bfloat16 natively (Linux: its flags); None where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags))


# ----------------------------------------------------------------------------------------------
# Training and evaluation

def sse_loss(output, target):
    """The paper's loss: squared error against one-hot, summed over batch and classes (not averaged)."""
    return (output - F.one_hot(target, output.shape[1]).to(output.dtype)).pow(2).sum()


def top5_hits(output, target):
    """(..., B, 5) bool: whether each of the 5 highest outputs (fewer if fewer classes) is the target."""
    return output.topk(min(5, output.shape[-1]), dim=-1).indices == target[:, None]


METRICS = ("loss", "ce", "prec1", "prec5")


def batch_metrics(output, target, loss=None):
    """The sums over the batch of METRICS, as one float64 tensor on the device (Meter turns them into
    means per example); `loss`: the batch's sse_loss, if already computed."""
    hits = top5_hits(output, target)
    loss = sse_loss(output, target) if loss is None else loss
    # cross-entropy (logged only) written out: CUDA's nll_loss has no deterministic kernel (--deterministic)
    ce = -F.log_softmax(output, 1).gather(1, target[:, None]).sum()
    return torch.stack([loss, ce, 100.0 * hits[:, 0].sum(),
                        100.0 * hits.any(1).sum()]).double()


def train_one_epoch(model, net, loader, optimizer, monitor, epoch, args, device):
    """One pass over the training set. `net` is the network itself, `model` its DDP wrapper (or `net`).
    The host reads from the device once per step: the loss, firing rates and metrics in one tensor."""
    model.train()
    meter = Meter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not show_progress(args))
    # on --device auto's CPU fallback: the epoch's duration, from the batches after the first (which compiles)
    estimate, marks = args.device == "auto" and device.type == "cpu" and len(loader) > 2 * TIMED_BATCHES, []
    for i, (images, target) in enumerate(bar):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        # forward over T steps, the paper's loss
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            output = model(images).float()
        loss = sse_loss(output, target)
        # health, before the step: all ranks judge the same numbers (the loss summed, the rates averaged),
        # or a non-finite loss or --stop-on-dead would stop only some of them
        names, rates = net.spike_rates()
        health = torch.cat([loss.detach().double().view(1), rates, output.detach().abs().double().mean().view(1)])
        if args.distributed:
            dist.all_reduce(health)
            health[1:] /= args.world_size
        total, *values = torch.cat([health, batch_metrics(output.detach(), target, loss.detach())]).tolist()
        rates, sums = dict(zip([*names, "output"], values)), dict(zip(METRICS, values[len(names) + 1:]))
        monitor.check_loss(total, epoch, i + 1)  # a step on a non-finite loss would make every weight NaN
        # backward with the leak-aware derivative, SGD step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        monitor.check(rates, epoch, i + 1)
        meter.update(len(target), **sums, **{f"rate_{k}": v * len(target) for k, v in rates.items() if k != "output"})
        m = meter.local_mean()
        bar.set_postfix(loss=f"{m['loss']:.4f}", prec1=f"{m['prec1']:.2f}", refresh=False)
        if bar.disable and (i + 1) % args.print_freq == 0:
            log(args, f"=> epoch {epoch + 1} [{i + 1}/{len(loader)}] loss {m['loss']:.4f} Prec@1 {m['prec1']:.3f}")
        if estimate and i in (0, TIMED_BATCHES):
            marks.append(time.monotonic())
            if i == TIMED_BATCHES:
                step = (marks[1] - marks[0]) / TIMED_BATCHES
                log(args, f"=> on the CPU, epoch {epoch + 1}'s training takes about {_duration(step * len(loader))} "
                    f"({len(loader)} mini-batches at {args.batch_size / step:.1f} images/s per process, the rate "
                    f"of mini-batches 2-{TIMED_BATCHES + 1})")
    return meter.mean(args, device)


TIMED_BATCHES = 4  # the CPU fallback's estimate


def _duration(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else \
        f"{seconds:.0f} s"


@torch.no_grad()
def validate(net, loader, args, device, time_sweep=()):
    """Test metrics over all processes, each of which evaluates its own share of the test set; one
    host read per batch.

    time_sweep: sorted step counts; adds `prec1_at_<t>`, the Prec@1 of the readout after t steps of the
    same spike trains (the latency/accuracy trade-off)."""
    if time_sweep and not 1 <= time_sweep[0] <= time_sweep[-1] <= net.time_steps:
        raise ValueError(f"time-sweep steps must lie in 1..{net.time_steps} (the time steps), got {time_sweep}")
    net.eval()
    sweep = [f"prec1_at_{t}" for t in time_sweep]
    meter = Meter(*sweep, "tied")
    for images, target in tqdm(loader, desc="test", leave=False, disable=not show_progress(args)):
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            output = net(images, readout_steps=tuple(time_sweep)).float()
        final = output[-1] if time_sweep else output
        sums = [batch_metrics(final, target)]
        if time_sweep:  # (len(time_sweep) + 1, B, classes), the full window last
            sums.append(100.0 * top5_hits(output[:-1], target)[..., 0].sum(-1).double())
        # no answer: the largest output is shared (all 0 from a silent network), and argmax picks the first class
        top2 = final.topk(min(2, final.shape[1]), dim=1).values
        sums.append(100.0 * (top2[:, 0] == top2[:, -1]).sum().double().view(1))
        meter.update(len(target), **dict(zip([*METRICS, *sweep, "tied"], torch.cat(sums).tolist())))
    return meter.mean(args, device)


def warn_unanswered(tied, args):
    """A WARNING when the network gave no answer (its largest outputs tied, all 0 when silent) for every
    test image, or for most: that Prec@1 counts the images of the first class, not what it learned."""
    if tied < 50.0:
        return
    what = "every" if tied == 100.0 else f"{tied:.1f} % of the"
    log(args, f"WARNING: the network gave no answer for {what} test image{'s' if tied < 100 else ''} (its largest "
        f"outputs tie; all 0 when it is silent), and a tie counts as the first class: this Prec@1 is not a result. "
        f"What usually helps: more time steps (--time-steps), or a checkpoint trained with these settings",
        file=sys.stderr)


def show_progress(args):
    return not args.no_progress and args.rank == 0 and sys.stdout.isatty()


# ----------------------------------------------------------------------------------------------
# Meters

class Meter:
    """Sums of per-batch metrics and the number of examples; the means are per example."""

    def __init__(self, *keys):  # the fixed keys exist even on a rank that saw no batch, for all_reduce
        self.count, self.sums = 0, dict.fromkeys((*METRICS, *keys), 0.0)

    def update(self, n, **sums):
        self.count += n
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def local_mean(self):
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def mean(self, args, device):
        if not args.distributed:
            return self.local_mean()
        count, *sums = all_reduce([self.count, *self.sums.values()], device).tolist()
        return {k: v / max(count, 1) for k, v in zip(self.sums, sums)}


def all_reduce(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t


def fmt(m):
    return f"Prec@1 {m['prec1']:.3f} Prec@5 {m['prec5']:.3f} Loss {m['loss']:.4f}"


# ----------------------------------------------------------------------------------------------
# Sparse computation (--stats, --time-sweep): counted by stats.py in the evaluation pass itself

def evaluate_with_stats(net, loader, device, time_sweep=(), count_spikes=True, args=None):
    """validate(), counting spikes and synaptic operations (count_spikes) and reading out after each step
    count in time_sweep (each ≤ net.time_steps), all in the same pass over the same spikes.

    args: the run's (torchrun: sums over ranks, progress bar, --amp); None: one process, no bar.
    Returns the stats.json dict: layers, totals, energy, time_steps, samples, accuracy, time_sweep."""
    args = args or argparse.Namespace(amp=False, no_progress=True, rank=0, distributed=False)
    steps = sorted(set(time_sweep))
    counter = stats.SpikeStats(net) if count_spikes else contextlib.nullcontext()
    with counter:
        metrics = validate(net, loader, args, device, steps)
    result = {}
    if count_spikes:
        if args.distributed:
            counter.gather()
        result = counter.summary()
    result["accuracy"] = {k: metrics[k] for k in ("prec1", "prec5", "loss", "ce", "tied")}
    if count_spikes and metrics["tied"] == 100.0:  # a network that never answered computes nothing worth a ratio
        stats.mark_undefined(result, "the network never answered: every output tied")
    if steps:
        result["time_sweep"] = dict(steps=steps, prec1=[metrics[f"prec1_at_{t}"] for t in steps])
    return result


# ----------------------------------------------------------------------------------------------
# The run

class _Given(argparse.Namespace):
    """A namespace in which every attribute seems to exist, so argparse fills in no default: after
    parsing, it holds the flags given on the command line alone."""

    def __getattr__(self, name):
        if name.startswith("_"):  # argparse's own bookkeeping (_unrecognized_args)
            raise AttributeError(name)
        return None


class Terminated(KeyboardInterrupt):
    """SIGTERM, what cluster schedulers (and torchrun, when a process fails) send before they end a job:
    every process stops as on Ctrl-C, with the same last words."""


def _terminate(signum, frame):
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the data loader's workers got it too: their end is no error
    raise Terminated


def main(Model, defaults, datasets=None, argv=None):
    """Parse the flags, build `Model`, then evaluate (--evaluate) or train. Returns the network."""
    parser = get_parser(sys.modules[Model.__module__].__doc__, defaults, datasets)
    args = parser.parse_args(argv)
    given = set(vars(parser.parse_args(argv, namespace=_Given())))
    check_flags_used(parser, args, given)
    if (args.stats or args.time_sweep) and not args.evaluate:
        parser.error("--stats and --time-sweep measure an evaluation: add --evaluate (and --resume PATH)")
    processes(args)
    files = RunFiles(args)  # resolves --resume auto
    if args.export_nir:  # like --evaluate, without data
        if not args.resume:
            parser.error(f"--resume auto: there is no {files.checkpoint} to export" if files.auto else
                         "--export-nir writes a trained network: add --resume CKPT")
        check_checkpoint_file(args.resume)
        check_output("--export-nir", args.export_nir, args.overwrite, [("--resume", args.resume)])
        import nir_exchange  # here only: nir and h5py load for NIR files alone
        return nir_exchange.export_checkpoint(Model, args, given)
    if args.resume:
        check_checkpoint_file(args.resume)
    if not args.evaluate and not args.resume and args.start_epoch >= args.epochs:
        parser.error(f"--start-epoch {args.start_epoch} leaves nothing to train with --epochs {args.epochs}")
    check_dirs(args)
    cap_workers(args)
    sigterm = signal.signal(signal.SIGTERM, _terminate)
    try:
        if writes_files(args) and args.rank == 0:
            files.claim(args)
        device = setup(args)
        try:
            return run(Model, args, device, files, given)
        finally:
            if args.distributed and sys.exc_info()[0] is None:  # on an error, _last_words ends the process
                dist.destroy_process_group()
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        if args.evaluate:
            _last_words(args, f"{how}; the evaluation wrote nothing")
        where = f"in epoch {files.epoch}" if files.epoch else "before training began"
        _last_words(args, f"{how} {where}; {files.saved()}")
    except (NonFiniteError, DeadLayerError, WriteError) as e:
        _last_words(args, f"error: {e}" + ("" if args.evaluate else f". Stopped; {files.saved()}"))
    except OSError as e:  # a path the run reads or writes (data, out-dir, checkpoint): the path and the reason
        if e.filename is None:
            raise
        _last_words(args, f"error: {e.filename}: {e.strerror or e}" + ("" if args.evaluate else
                                                                        f"; {files.saved()}"))
    except RuntimeError as e:  # gloo's and NCCL's errors when another process of the job has ended
        if not args.distributed or not (isinstance(e, dist.DistError) or "gloo" in str(e)):
            raise
        _last_words(args, f"error: rank {args.rank}: another process of this torchrun job has ended ("
                    f"{first_line(e).split('] ')[-1]}; torchrun's summary names it); {files.saved()}")
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        files.release()


def _last_words(args, message):
    """End the run with one line on stderr (SystemExit). Under torchrun the process prints it and exits
    at once: once another process of the job has died, tearing down the process group and the
    interpreter can wait for it until torchrun kills this one too, and the line would be lost (and
    torchrun's own SIGTERM could cut it off). Its files are written atomically and its lock goes with it."""
    if not args.distributed:
        raise SystemExit(message)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


def run(Model, args, device, files=None, given=()):
    """Build, load (--resume), then evaluate or train; `files` as main() claimed them, `given` the flags
    on the command line."""
    files = files or RunFiles(args)
    ckpt, held = resume_settings(args.resume) if args.resume else (None, {})
    take_settings(held, args, given, args.resume, refuse=("leak",) if ckpt is None else (),
                  why="a NIR file's neurons are its network's, and load as they are: drop --leak")
    if args.time_sweep and args.time_sweep[-1] > args.time_steps:  # the sweep reads out inside one window
        log(args, f"=> --time-sweep goes to {args.time_sweep[-1]} steps: evaluating with --time-steps "
            f"{args.time_sweep[-1]} instead of {args.time_steps}")
        args.time_steps = args.time_sweep[-1]
    net = data.network(Model, args, time_chunk=args.time_chunk).to(device)  # its width and input code: the dataset's
    optimizer = torch.optim.SGD(net.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.lr_steps, gamma=0.2)  # the paper's ×0.2
    set_lr_for_epoch(optimizer, scheduler, args.start_epoch, args)
    start_epoch, best_prec1 = args.start_epoch, -math.inf
    if args.resume:
        if ckpt is None:  # a network described in NIR (docs/nir.md): its weights alone
            import nir_exchange
            ckpt = nir_exchange.load_into(args.resume, net)
        else:
            ckpt = load_checkpoint(args.resume, net, ckpt)
        done = f" (epoch {ckpt['epoch']}, best Prec@1 {float(ckpt['best_prec1']):.3f})" \
            if {"epoch", "best_prec1"} <= ckpt.keys() else ""
        log(args, f"=> loaded {args.resume}{done}")
        trained_on = other_dataset(held, args)  # --dataset given: take_settings noted it
        if not args.evaluate:
            start_epoch, best_prec1 = restore_training(ckpt, net, optimizer, scheduler, args, given)
            if trained_on and best_prec1 > -math.inf:  # a Prec@1 on another test set beats nothing here
                log(args, f"=> note: {args.resume} was trained on {trained_on}: its best Prec@1 {best_prec1:.3f} "
                    f"is not one on {args.dataset}; the best model here is chosen afresh")
                best_prec1 = -math.inf
            if files.resumes_own:
                files.saved_epoch = start_epoch
            if start_epoch >= args.epochs:
                done = f"{args.resume} holds {start_epoch} epochs, and --epochs is {args.epochs}: nothing to train"
                if files.auto:  # a job script re-run after the run ended
                    log(args, f"=> {done}")
                    return net
                raise SystemExit(f"error: --resume {done}; raise --epochs to train on")
    val_loader = data.get_loader(args, False, device)
    data.check_input_memory(args, val_loader, device)
    if args.evaluate:  # one pass: --stats and --time-sweep are measured on the spikes of the Test: line
        if not args.resume:
            log(args, "WARNING: --evaluate without --resume evaluates untrained weights (as initialised); "
                "add --resume PATH to evaluate a trained network", file=sys.stderr)
        result = evaluate_with_stats(net, val_loader, device, args.time_sweep or (), args.stats, args)
        log(args, "Test: " + fmt(result["accuracy"]))
        warn_unanswered(result["accuracy"]["tied"], args)
        if writes_files(args) and args.rank == 0:
            result.update(checkpoint=args.resume, untrained=not args.resume)
            files.prepare(args)
            log(args, stats.save_stats_outputs(result, files.stats_dir))
        return net

    train_loader = data.get_loader(args, True, device)
    data.check_input_memory(args, train_loader, device)
    model = DistributedDataParallel(net) if args.distributed else net  # on CUDA it uses the current device
    monitor = HealthMonitor(args)
    if args.rank == 0:
        files.prepare(args, start_epoch)
    for epoch in range(start_epoch, args.epochs):
        files.epoch = epoch + 1
        if args.distributed:
            train_loader.sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        start, lr = time.time(), optimizer.param_groups[0]["lr"]
        train = train_one_epoch(model, net, train_loader, optimizer, monitor, epoch, args, device)
        test = validate(net, val_loader, args, device)
        scheduler.step()
        is_best, best_prec1 = test["prec1"] > best_prec1, max(test["prec1"], best_prec1)
        seconds, rates = time.time() - start, {k: v for k, v in train.items() if k.startswith("rate_")}
        check_weights_finite(net.state_dict(), epoch + 1, args)  # on every rank (the same weights): all stop
        if args.rank == 0:  # the log row first: if the checkpoint never lands, a resume drops it
            append_csv(files.log, {
                "epoch": epoch + 1, "lr": lr, **{f"train_{k}": train[k] for k in ("loss", "ce", "prec1", "prec5")},
                **{f"test_{k}": test[k] for k in ("loss", "ce", "prec1", "prec5")}, "seconds": round(seconds, 1),
                **rates})
            save_checkpoint(checkpoint_state(net, optimizer, scheduler, epoch + 1, best_prec1, args), is_best, args)
            stats.save_figure(stats.plot_training_curves(files.log), files.curves)
        files.saved_epoch = epoch + 1
        log(args, f"=> epoch {epoch + 1}/{args.epochs} lr {lr:.3g} {seconds:.0f} s | train {fmt(train)} | "
            f"Test: {fmt(test)} | rates " + " ".join(f"{k[5:]} {v:.3f}" for k, v in rates.items()))
    written = [os.path.basename(p) for p in files.own if os.path.exists(p)]
    log(args, f"=> best Prec@1 {best_prec1:.3f}; {', '.join(written)} in {args.out_dir}")
    return net

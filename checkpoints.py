"""A run's files: the checkpoint format, its save and load, the resume, the CSV log, and the out-dir
a training run owns. Every file is written atomically; nothing non-finite is written.

Imported by utils.py (the run); the file names and the format are described in docs/checkpoints.md.
"""
import collections
import csv
import fcntl
import glob
import io
import math
import os
import pickle
import pickletools
import socket
import stat
import struct
import sys
import tempfile

import torch
from tqdm import tqdm

import paths


# ----------------------------------------------------------------------------------------------
# Checkpoints

def checkpoint_state(net, optimizer, scheduler, epoch, best_prec1, args):
    """The authors' keys, plus what an exact resume needs; tensors and plain data only (weights_only)."""
    return dict(epoch=epoch, arch=type(net).__name__, state_dict=net.state_dict(), best_prec1=best_prec1,
                dataset=args.dataset, classes=args.classes,  # the output layer's width
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng_cpu=torch.get_rng_state(),
                rng_cuda=torch.stack(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else None,
                args={k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()})


def save_checkpoint(state, is_best, args):
    """model_best (when best) first, then the checkpoint: a kill between the two leaves the previous
    checkpoint, from which a resume re-runs this epoch and writes model_best again. Weights that are
    not finite are never written (NonFiniteError)."""
    check_weights_finite(state["state_dict"], state["epoch"], args)
    for name in ([f"model_bestT1_{args.tag}.pth.tar"] if is_best else []) + [f"checkpointT1_{args.tag}.pth.tar"]:
        atomic_write(os.path.join(args.out_dir, name), lambda f: torch.save(state, f))


# ----------------------------------------------------------------------------------------------
# Nothing non-finite is written

class NonFiniteError(Exception):
    """Training produced NaN or inf (loss or weights): the run stops at once, saving nothing more."""


def diverged(what, args):
    """One line: what went non-finite, and the likely causes."""
    amp = ", or a bfloat16 overflow under --amp" if args.amp else ""
    return (f"{what}: training diverged, most likely from a learning rate too high for this network "
            f"(--lr {args.lr:g}: try it 10× lower){amp}")


def check_weights_finite(state_dict, epoch, args):
    bad = non_finite(state_dict)
    if bad:
        raise NonFiniteError(diverged(f"the weights after epoch {epoch} hold NaN or inf ({_some(bad)})", args))


def non_finite(state):
    """The names of the tensors in `state` that hold a NaN or an inf."""
    return [k for k, v in state.items() if not all_finite(v)]


def all_finite(t):
    """False if a floating-point or complex tensor holds a NaN or an inf (in either part)."""
    return not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all())


def _some(names, most=3):
    return ", ".join(names[:most]) + (" …" if len(names) > most else "")


def log(args, message, file=None):
    """Print on rank 0 only, without tearing a live progress bar (the run's files, its data and its
    loop all report through it)."""
    if args.rank == 0:
        tqdm.write(message, file=file or sys.stdout)
        (file or sys.stdout).flush()


# ----------------------------------------------------------------------------------------------
# The atomic writer

class WriteError(Exception):
    """A file could not be written (a full disk, a file-size limit, an I/O error); the file as it was
    is intact."""


def atomic_write(path, write):
    """write(f) into a temp file beside `path`, fsync, then rename: a crash mid-write leaves the old
    file intact. Used for every file a run writes (checkpoints, CSV, stats.json, plots). A write the
    system refuses (ENOSPC, EFBIG, EIO, ...) is a WriteError that says so."""
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; follow the umask as other files do
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        cause = _os_error(e)
        if cause is None or not isinstance(e, Exception):
            raise
        raise _write_error(path, cause) from e


def _os_error(e):
    """The OSError behind `e`, or None: torch's zip writer turns a failed write into a RuntimeError."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def _write_error(path, e):
    kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "nothing was written there"
    return WriteError(f"cannot write {path} ({e.strerror or e}); {kept}")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


# ----------------------------------------------------------------------------------------------
# Loading and resuming

def check_checkpoint_file(path, flag="--resume"):
    """--resume PATH must name a regular file: never train from scratch instead, as the authors' scripts did."""
    st, why = paths.look(path)
    if st is None:
        raise SystemExit(f"error: {flag} {path}: {why}" if why.startswith("no such") else f"error: {flag} {path} {why}")
    if stat.S_ISDIR(st.st_mode):
        raise SystemExit(f"error: {flag} {path} is a directory, not a checkpoint file: name the file (its "
                         f"own is checkpointT1_<tag>.pth.tar), or use --out-dir {path} --resume auto")
    if not stat.S_ISREG(st.st_mode):
        raise SystemExit(f"error: {flag} {path} is {paths.kind(st.st_mode)}, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            return f.read(8)  # the first bytes tell a NIR file (HDF5) from a torch checkpoint
    except OSError as e:
        raise SystemExit(f"error: {flag} {path} cannot be read ({e.strerror or e})")


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def is_nir_file(path):
    """A NIR file is HDF5, whatever its name (.nir, .NIR, .h5, or none)."""
    return check_checkpoint_file(path) == HDF5_MAGIC


def _number(v):
    """A real number as a float, from a Python number or a one-element tensor (older torch saved
    scalars as tensors); None for anything else."""
    if torch.is_tensor(v) and v.numel() == 1 and not v.is_complex():
        v = v.item()
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _schedule(v):
    milestones = v.get("milestones", {}) if isinstance(v, dict) else None
    return isinstance(milestones, dict) and all(type(m) is int and m >= 1 for m in milestones) and \
        type(v.get("last_epoch")) is int and v["last_epoch"] >= 0


RNG_BYTES = torch.get_rng_state().numel()
# What each key of a checkpoint holds, where it is there at all (an authors' release has the first
# five): validated on load, so that nonsense ends in one line instead of a traceback or a strange run
METADATA = {
    "epoch": ("a whole number ≥ 0", lambda v: type(v) is int and v >= 0),
    "arch": ("a name", lambda v: isinstance(v, str)),
    "best_prec1": ("a Prec@1 from 0 to 100", lambda v: _number(v) is not None and 0 <= _number(v) <= 100),
    "optimizer": ("an optimizer's state_dict", lambda v: isinstance(v, dict)),
    "scheduler": ("a schedule: last_epoch a whole number ≥ 0, milestones epochs ≥ 1", _schedule),
    "rng_cpu": (f"a CPU generator state ({RNG_BYTES} bytes)",
                lambda v: torch.is_tensor(v) and v.dtype == torch.uint8 and tuple(v.shape) == (RNG_BYTES,)),
    "rng_cuda": ("None or CUDA generator states (bytes, a row per device)",
                 lambda v: v is None or torch.is_tensor(v) and v.dtype == torch.uint8 and v.dim() == 2),
    "args": ("the run's settings, a dict", lambda v: isinstance(v, dict)),
    "dataset": ("a dataset's name", lambda v: isinstance(v, str)),
    "classes": ("a number of classes ≥ 1", lambda v: type(v) is int and v >= 1),
}


def check_metadata(ckpt, path):
    for key, (what, ok) in METADATA.items():
        if key in ckpt and not ok(ckpt[key]):
            v = ckpt[key]
            shown = f"a {v.dtype} tensor of shape {tuple(v.shape)}" if torch.is_tensor(v) else repr(v)[:60]
            raise SystemExit(f"error: --resume {path}: its {key} is {shown}, not {what}")


def _py2_opcodes_as_py3(path):
    """A legacy (non-zip) file written by Python 2's cPickle (the authors' releases), with the two
    opcodes torch's weights_only unpickler lacks in their Python 3 form: INT, an int beyond 32 bits (the
    optimizer's parameter ids, id(p)), as LONG1; BINSTRING, a str of 256 bytes or more, as BINUNICODE.
    pickletools only parses: nothing runs, and the load that follows is weights_only as before."""
    with open(path, "rb") as f:
        data = f.read()
    f, out, copied = io.BytesIO(data), bytearray(), 0
    for _ in range(5):  # magic number, protocol version, sys_info, the object, the storage keys
        for op, arg, start in pickletools.genops(f):
            if op.name in ("INT", "BINSTRING"):
                out += data[copied:start]
                copied = f.tell()
                if op.name == "BINSTRING":
                    text = arg.encode("latin-1")  # pickletools decodes it byte for byte
                    text.decode("utf-8")  # as torch reads the shorter SHORT_BINSTRING: UTF-8, or no load
                    out += b"X" + struct.pack("<I", len(text)) + text
                elif isinstance(arg, bool):  # protocol 0's I01 / I00
                    out += b"\x88" if arg else b"\x89"
                else:
                    out += pickle.dumps(arg, 2)[2:-1]  # LONG1 (or BININT) for this value
    return bytes(out + data[copied:])


def read_checkpoint(path):
    """The dict of one of ours or an authors' release (legacy serialization, a full dict or a bare
    state_dict), its metadata checked; one line (SystemExit) for anything else."""
    check_checkpoint_file(path)
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # a checkpoint must not run code
        except pickle.UnpicklingError as e:
            if "Unsupported operand" not in str(e):
                raise
            ckpt = torch.load(io.BytesIO(_py2_opcodes_as_py3(path)), map_location="cpu", weights_only=True)
    except OSError as e:
        raise SystemExit(f"error: --resume {path} cannot be read ({e.strerror or e})")
    except Exception as e:
        if str(path).lower().endswith(".nir"):  # named as one, but a NIR file is HDF5 (read by content)
            raise SystemExit(f"error: --resume {path} is not a NIR file (NIR files are HDF5), nor a checkpoint "
                             f"torch can load ({first_line(e)})")
        raise SystemExit(f"error: --resume {path}: corrupt, truncated, or not loadable with weights_only=True "
                         f"({first_line(e)})")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not state or not all(torch.is_tensor(v) for v in state.values()):
        raise SystemExit(f"error: --resume {path}: holds no state_dict of tensors")
    if "state_dict" in ckpt:
        check_metadata(ckpt, path)
    return ckpt


def _unwrapped(name):
    """A weight's name without the prefixes of DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`)."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.removeprefix("module.").removeprefix("_orig_mod.")
    return name


def load_checkpoint(path, net, ckpt=None):
    """Load weights into `net` from `ckpt` (read_checkpoint(path) if None). Returns the dict, {} if bare."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    state = {_unwrapped(k): v for k, v in ckpt.get("state_dict", ckpt).items()}
    own = net.state_dict()
    problems = {"missing": sorted(own.keys() - state.keys()), "unexpected": sorted(state.keys() - own.keys()),
                "shape": [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                          if k in own and v.shape != own[k].shape],
                "dtype": [f"{k} {v.dtype}" for k, v in state.items()  # complex or integer: not real weights
                          if k in own and own[k].is_floating_point() and not v.is_floating_point()]}
    if problems["shape"] and _other_width(state, own):
        last = next(reversed(own))
        trained = f" (trained with --dataset {ckpt['dataset']})" if isinstance(ckpt.get("dataset"), str) else ""
        raise SystemExit(f"error: --resume {path} holds a {type(net).__name__} for {len(state[last])} classes"
                         f"{trained}, and this one has {len(own[last])} outputs, one per class of its --dataset: "
                         f"give the --dataset it was trained on")
    if any(problems.values()):
        found = "; ".join(f"{kind} {_some(names)}" for kind, names in problems.items() if names)
        raise SystemExit(f"error: --resume {path} is not a {type(net).__name__} checkpoint: {found}")
    bad = non_finite(state)
    if bad:  # it would evaluate to nonsense (and --stats to an energy "advantage"), or train on NaN
        raise SystemExit(f"error: --resume {path}: its weights hold NaN or inf ({_some(bad)}); it was saved "
                         f"from a run that had diverged")
    net.load_state_dict(state)
    return ckpt if "state_dict" in ckpt else {}


def _other_width(state, own):
    """Whether `state` is a network like `own` but for another number of classes: the same weights, with
    only the output layer's (the last) of another width."""
    last = next(reversed(own), None)
    return state.keys() == own.keys() and state[last].shape[1:] == own[last].shape[1:] and \
        all(v.shape == own[k].shape for k, v in state.items() if k != last)


# What the network's settings in a checkpoint's args must be: its flag, and the values the flag takes
NETWORK_SETTINGS = {
    "time_steps": ("--time-steps", lambda v: type(v) is int and v >= 1),
    "leak": ("--leak", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1),
    "dropout": ("--dropout", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1),
    "dataset": ("--dataset", lambda v: isinstance(v, str)),  # one that fits the script's network: data.network
}


def resume_settings(path):
    """(the checkpoint's dict, or None for a NIR file; the network settings it holds). A NIR file is
    recognised by its content (HDF5); its T and λ are its metadata's and its neurons'."""
    if is_nir_file(path):
        import nir_exchange  # here only: nir and h5py load for NIR files alone
        return None, nir_exchange.file_settings(path)
    ckpt = read_checkpoint(path)
    held = ckpt.get("args", {}) if "state_dict" in ckpt else {}
    return ckpt, held


def take_settings(held, args, given, path, refuse=(), why=""):
    """What a checkpoint fixes, the checkpoint decides: its T, λ, dropout and dataset (`held`, its args)
    replace the defaults. A flag given that differs is applied with one note (old → new), or, for the keys in
    `refuse`, refused (`why`). args then holds what runs, and so does the next checkpoint."""
    changed, taken = [], []
    for key, (flag, ok) in NETWORK_SETTINGS.items():
        if key not in held or held[key] is None:
            continue
        value, now = held[key], getattr(args, key, None)
        if not ok(value):
            raise SystemExit(f"error: --resume {path}: its args hold {key} = {value!r}, not a value of {flag}")
        if value == now:
            continue
        if key in given and key in refuse:
            raise SystemExit(f"error: {flag} {_plain(now)}: {path} holds {flag} {_plain(value)}; {why}")
        if key in given:
            changed.append(f"{flag} {_plain(value)} → {_plain(now)}")
        else:
            setattr(args, key, value)
            taken.append(f"{flag} {_plain(value)}")
    if taken:
        log(args, f"=> {', '.join(taken)}: the checkpoint's, not the script's default")
    if changed:
        log(args, "=> note: the flags given replace the network settings the checkpoint was trained with: "
            + ", ".join(changed))


def other_dataset(held, args):
    """The dataset the checkpoint was trained on, when it is not this run's; else None."""
    trained_on, now = held.get("dataset"), getattr(args, "dataset", None)
    return trained_on if isinstance(trained_on, str) and now is not None and trained_on != now else None


def restore_training(ckpt, net, optimizer, scheduler, args, given=()):
    """Optimizer, LR schedule and RNG from `ckpt`; returns (start_epoch, best_prec1).

    given: the flags on the command line; --lr, --lr-steps, --momentum and --wd among them replace the
    checkpoint's settings (see apply_optimizer_flags)."""
    start_epoch = ckpt.get("epoch", args.start_epoch)
    try:
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            check_optimizer_state(net, optimizer)
        if "scheduler" in ckpt:
            scheduler.load_state_dict(ckpt["scheduler"])
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise SystemExit(f"error: --resume {args.resume}: its optimizer state does not fit ({first_line(e)})")
    apply_optimizer_flags(optimizer, scheduler, start_epoch, "scheduler" in ckpt, args, given)
    held_seed = ckpt.get("args", {}).get("seed")
    if "seed" in given and args.seed != held_seed:  # applied: the streams start from it, not from the saved state
        if "rng_cpu" in ckpt:
            log(args, f"=> note: --seed {args.seed} replaces the random state saved in {args.resume} (seed "
                f"{held_seed}): the spikes and dropout masks from here on differ from an exact resume")
    elif "rng_cpu" in ckpt and not args.distributed:  # under torchrun, each rank keeps its own seed
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt.get("rng_cuda") is not None and torch.cuda.device_count() == len(ckpt["rng_cuda"]):
            torch.cuda.set_rng_state_all(list(ckpt["rng_cuda"]))
        if type(held_seed) is int:  # the streams go on from that seed's: the next checkpoint says so
            args.seed = held_seed
    return start_epoch, _number(ckpt.get("best_prec1", -math.inf))


def check_optimizer_state(net, optimizer):
    """ValueError unless every buffer of the loaded optimizer state has its weight's shape and is
    finite, and the settings are finite numbers (torch checks only the number of parameters)."""
    for name, p in net.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if not torch.is_tensor(value) or key == "step":
                continue
            if value.shape != p.shape:
                raise ValueError(f"{key} of {name} has shape {tuple(value.shape)}, not {tuple(p.shape)}")
            if not all_finite(value):
                raise ValueError(f"{key} of {name} holds NaN or inf")
    for group in optimizer.param_groups:
        for key in ("lr", "momentum", "weight_decay"):
            if not isinstance(group.get(key), (int, float)) or not math.isfinite(group[key]):
                raise ValueError(f"its {key} is {group.get(key)!r}")


OPTIMIZER_FLAGS = {"lr": "--lr", "lr_steps": "--lr-steps", "momentum": "--momentum", "weight_decay": "--wd"}


def apply_optimizer_flags(optimizer, scheduler, epoch, scheduled, args, given):
    """After a resume: the optimizer flags on the command line replace the checkpoint's settings (with a
    note); the others take the checkpoint's, so that args (saved with the next checkpoint) says what
    runs. Without such flags a resume is exact. An authors' release (not `scheduled`) has no schedule:
    its LR is not ours to trust, so --lr and --lr-steps always come from the flags (or DEFAULTS)."""
    group = optimizer.param_groups[0]
    held = dict(momentum=group["momentum"], weight_decay=group["weight_decay"])
    if scheduled:
        held.update(lr=group.get("initial_lr", args.lr), lr_steps=tuple(sorted(scheduler.milestones)))
    changed = [f"{OPTIMIZER_FLAGS[k]} {_plain(v)} → {_plain(getattr(args, k))}" for k, v in held.items()
               if k in given and v != getattr(args, k)]
    for k, v in held.items():
        if k not in given:
            setattr(args, k, v)
    for g in optimizer.param_groups:
        g.update(initial_lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)
    scheduler.milestones = collections.Counter(args.lr_steps)
    if changed or not scheduled:
        set_lr_for_epoch(optimizer, scheduler, epoch, args)
    if changed:
        log(args, "=> note: the flags given replace the checkpoint's optimizer settings: " + ", ".join(changed))


def _plain(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else value if isinstance(value, str) else f"{value:g}"


def set_lr_for_epoch(optimizer, scheduler, epoch, args):
    """Put the schedule where it would be after `epoch` epochs."""
    for group in optimizer.param_groups:
        group["lr"] = args.lr * 0.2 ** sum(epoch >= step for step in args.lr_steps)
    scheduler.last_epoch = epoch


def first_line(e):
    """An exception's message in one short line, for an error line that names the cause."""
    text = str(e).split("WeightsUnpickler error:")[-1]  # skip torch's paragraph about weights_only=False
    return ([s.strip() for s in text.splitlines() if s.strip()] or [type(e).__name__])[0].split(". ")[0][:200]


# ----------------------------------------------------------------------------------------------
# The CSV log

def append_csv(path, row):
    """One row per epoch, the header with the first. The file is rewritten whole through atomic_write,
    so that a kill leaves all of the old rows or all of the new, never half a row."""
    fields, rows = read_csv(path)
    fields += [k for k in row if k not in fields]
    write_csv(path, fields, rows + [row])


def read_csv(path):
    """(field names, rows as dicts of strings); ([], []) if there is no such file."""
    if not os.path.exists(path):
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_csv(path, fields, rows):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


def drop_csv_rows_after(path, epoch):
    """Keep the rows of epochs ≤ `epoch` (rows of a later epoch come from a run killed after writing its
    row, before its checkpoint landed; that epoch runs again). Returns the epochs dropped."""
    fields, rows = read_csv(path)
    keep = [(r.get("epoch") or "").isdigit() and int(r["epoch"]) <= epoch for r in rows]
    if all(keep):
        return []
    if any(keep):
        write_csv(path, fields, [r for r, k in zip(rows, keep) if k])
    else:
        os.unlink(path)
    return [r.get("epoch") for r, k in zip(rows, keep) if not k]


# ----------------------------------------------------------------------------------------------
# The out-dir: a run owns its files there

STATS_FILES = ("stats.json", "spike_rates.png", "time_sweep.png")  # in stats_<tag>/


class RunFiles:
    """A run's files in --out-dir, each carrying the script's tag: training writes
    checkpointT1_<tag>.pth.tar, model_bestT1_<tag>.pth.tar, log_<tag>.csv and training_curves_<tag>.png;
    --evaluate --stats/--time-sweep writes stats_<tag>/ (STATS_FILES). Both hold the lock file
    .lock_<tag> while they run; this also keeps what a training run has saved so far (for the truth of
    its last words). Rank 0 alone locks and writes."""

    def __init__(self, args):
        self.dir, self.tag = args.out_dir, args.tag
        self.checkpoint, self.best, self.log, self.curves = (os.path.join(args.out_dir, name) for name in (
            f"checkpointT1_{args.tag}.pth.tar", f"model_bestT1_{args.tag}.pth.tar", f"log_{args.tag}.csv",
            f"training_curves_{args.tag}.png"))
        self.stats_dir = os.path.join(args.out_dir, f"stats_{args.tag}")
        self.evaluates = args.evaluate
        self.own = [os.path.join(self.stats_dir, name) for name in STATS_FILES] if args.evaluate else \
            [self.checkpoint, self.best, self.log, self.curves]  # what this run writes
        self.auto = args.resume == "auto"
        if self.auto:  # the one command a job script can re-run after preemption
            args.resume = self.checkpoint if os.path.exists(self.checkpoint) else None
            if args.resume is None and args.evaluate:
                raise SystemExit(f"error: --resume auto: there is no {self.checkpoint} to evaluate")
        self.resumes_own = bool(args.resume) and os.path.exists(args.resume) and os.path.exists(
            self.checkpoint) and os.path.samefile(args.resume, self.checkpoint)
        self.lock = None  # the lock file's descriptor while this process holds it
        self.epoch = self.saved_epoch = None  # the epoch in progress; the one self.checkpoint holds

    def claim(self, args):
        """Lock the out-dir for this tag, refuse to start over a previous run's files, and remove the temp
        files a killed save left. One line and exit 1 on a refusal."""
        self._check_kinds()
        self._lock()
        found = [p for p in self.own if os.path.lexists(p)]
        continues = not self.evaluates and (self.resumes_own or self._only_a_lost_epoch(args))
        # the file resumed from is never deleted or replaced by the run it starts (but the checkpoint it continues)
        inputs = [p for p in found if paths.same_file(p, args.resume) and not (continues and p == self.checkpoint)]
        if inputs and (args.overwrite or self.evaluates or not continues):
            raise SystemExit(f"error: --resume {args.resume} is this --out-dir's own {os.path.basename(inputs[0])}, "
                             f"which this run would {'delete (--overwrite)' if args.overwrite else 'replace'}: "
                             f"resume from a copy of it outside --out-dir {self.dir}, or choose another --out-dir")
        if found and not (continues or args.overwrite):
            names = ", ".join(os.path.relpath(p, self.dir) for p in found)
            ways = ([f"continue it with --resume {self.checkpoint} (or --resume auto)"]
                    if self.checkpoint in found else []) + ["start over with --overwrite (deletes them)",
                                                            "choose another --out-dir"]
            raise SystemExit(f"error: --out-dir {self.dir} holds a previous "
                             f"{'evaluation' if self.evaluates else 'run'}'s {names}: "
                             f"{', '.join(ways[:-1])}, or {ways[-1]}")
        for target in self.own:  # atomic_write's names
            folder, name = os.path.split(target)
            for tmp in glob.glob(os.path.join(glob.escape(folder or "."), glob.escape(f".{name}.") + "*.tmp")):
                os.unlink(tmp)
                log(args, f"=> removed {tmp}, left by a save that was killed")

    def _check_kinds(self):
        """Every file this run would write or delete must be a regular file where it exists (and stats_<tag>
        a directory): one line for a device, named pipe, socket, directory or link loop, --overwrite or not."""
        lock = os.path.join(self.dir, f".lock_{self.tag}")
        for path in self.own + [lock]:
            st, why = paths.look(path)
            if st is None and os.path.lexists(path) and "link to nothing" not in why:
                raise SystemExit(f"error: --out-dir {self.dir}: {os.path.relpath(path, self.dir)} {why}")
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise SystemExit(f"error: --out-dir {self.dir}: {os.path.relpath(path, self.dir)} is "
                                 f"{paths.kind(st.st_mode)}, not a file this run may write or delete "
                                 f"(--overwrite neither): move it, or choose another --out-dir")
        if self.evaluates:
            st, why = paths.look(self.stats_dir)
            if (st is None and os.path.lexists(self.stats_dir)) or (st is not None and not stat.S_ISDIR(st.st_mode)):
                what = why if st is None else f"is {paths.kind(st.st_mode)}, not a directory"
                raise SystemExit(f"error: --out-dir {self.dir}: stats_{self.tag} {what}: move it, or choose "
                                 f"another --out-dir")

    def _lock(self):
        """flock on a descriptor held until release() or exit: the kernel drops it with the process, so a
        lock file left behind is harmless."""
        path = os.path.join(self.dir, f".lock_{self.tag}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, 0o666)
        except OSError as e:
            raise SystemExit(f"error: --out-dir {self.dir}: its lock file .lock_{self.tag} cannot be opened "
                             f"({e.strerror or e})")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise SystemExit(f"error: --out-dir {self.dir} is in use by another run of {self.tag}"
                             f"{f' ({holder})' if holder else ''}; wait for it to end, or choose another --out-dir")
        except OSError as e:  # a file system without locks (some NFS): run, but say what is not guarded
            os.close(fd)
            tqdm.write(f"WARNING: cannot lock {path} ({e.strerror or e}): a second run in --out-dir {self.dir} "
                       f"would not be refused", file=sys.stderr)
            return
        os.ftruncate(fd, 0)
        what = "evaluation" if self.evaluates else "training"
        os.write(fd, f"{what}, process {os.getpid()} on {socket.gethostname()}\n".encode())
        self.lock = fd

    def _only_a_lost_epoch(self, args):
        """--resume auto without a checkpoint, over nothing but the log row of a first epoch that was
        killed before its checkpoint landed: that epoch runs again."""
        rows = read_csv(self.log)[1]
        return self.auto and not os.path.exists(self.checkpoint) and not os.path.exists(self.best) and \
            [r.get("epoch") for r in rows] == [str(args.start_epoch + 1)]

    def prepare(self, args, start_epoch=None):
        """Just before training or writing the stats: --overwrite deletes the previous run's files; a
        resume of this directory's own checkpoint (or --resume auto over a lost first epoch) drops the
        log rows after it."""
        if args.overwrite and (self.evaluates or not self.resumes_own):
            found = [p for p in self.own if os.path.lexists(p)]
            for path in found:
                os.unlink(path)
            if found:
                log(args, f"=> --overwrite: deleted {', '.join(found)}")
        elif not self.evaluates:  # a fresh run that claim() let start has no log, or the row of a lost first epoch
            if args.overwrite:  # never the checkpoint a run starts from (docs/checkpoints.md)
                log(args, f"=> --overwrite deletes nothing: this run continues {self.checkpoint} (--resume)")
            dropped = drop_csv_rows_after(self.log, start_epoch)
            if dropped:
                log(args, f"=> dropped epoch {', '.join(dropped)} from {self.log}: it was killed before its "
                     f"checkpoint landed and runs again")

    def saved(self):
        """What this run leaves in the checkpoint, in words."""
        if self.saved_epoch is not None:
            return f"{self.checkpoint} holds epoch {self.saved_epoch}: continue with --resume {self.checkpoint}"
        return f"{self.checkpoint} is as it was" if self.resumes_own else "nothing was saved"

    def release(self):
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def writes_files(args):
    """Whether this run writes to --out-dir: training does, and an evaluation with --stats/--time-sweep."""
    return not args.evaluate or bool(args.stats or args.time_sweep)


def check_dirs(args):
    """--out-dir (when this run writes there) must be a directory, or creatable, and writable; --data-dir
    (when a dataset is read) a directory, or creatable, that this process can read: a read-only one
    holding the dataset is fine."""
    if writes_files(args):
        _usable_dir("--out-dir", args.out_dir, write=True)
    if not args.synthetic:
        _usable_dir("--data-dir", args.data_dir, write=False)
        paths.check_readable_dir("--data-dir", args.data_dir)


def _usable_dir(flag, path, write):
    st, why = paths.look(path)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise SystemExit(f"error: {flag} {path} is not a directory (it is {paths.kind(st.st_mode)})")
    if st is None and not why.startswith("no such file") and "link to nothing" not in why:
        raise SystemExit(f"error: {flag} {path} {why}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: {flag} {path} cannot be created ({e.strerror or e})")
    if write:
        try:
            tempfile.TemporaryFile(dir=path).close()
        except OSError as e:
            raise SystemExit(f"error: {flag} {path} is not writable ({e.strerror or e})")

"""Every flag given is used, or refused: what each mode of a run reads of the command line.

Called by utils.main() after parsing; a flag that the run would ignore ends it with one line (exit 2),
so that a command never seems to do what it does not (docs/checkpoints.md).
"""
import math
import os

from checkpoints import log


# What each mode reads of the flags (dest names); a flag given that its mode does not read is refused
EXPORT_READS = {"resume", "export_nir", "overwrite", "nir_on_off", "time_steps", "leak", "dataset", "device",
                "no_progress", "out_dir"}
TRAINING_ONLY = {"batch_size", "limit_train", "lr", "lr_steps", "momentum", "weight_decay", "epochs", "start_epoch",
                 "dropout", "print_freq", "dead_patience", "stop_on_dead"}


def check_flags_used(parser, args, given):
    """Every flag given is used, or the run stops here with one line (exit 2): --export-nir reads a
    checkpoint and writes a file, an evaluation trains nothing."""
    names = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    if args.export_nir:
        unused = given - EXPORT_READS | (given & {"out_dir"} if args.resume != "auto" else set())  # auto reads it
        mode = "--export-nir writes the checkpoint's network and exits"
    elif args.evaluate:
        unused = given & TRAINING_ONLY
        if args.overwrite and not (args.stats or args.time_sweep):
            unused.add("overwrite")  # an evaluation without --stats/--time-sweep writes nothing
        mode = "--evaluate trains nothing" + ("" if args.stats or args.time_sweep else " and writes nothing")
    else:
        unused = {"nir_on_off"} & given
        if unused:
            parser.error("--nir-on-off is a form of --export-nir PATH: add it")
        return
    if unused:
        flags = sorted(names.get(d, d) for d in unused)
        parser.error(f"{mode}: {', '.join(flags)} {'does' if len(flags) == 1 else 'do'} not apply; drop "
                     f"{'it' if len(flags) == 1 else 'them'}")


def cap_workers(args):
    """No more loader processes than this machine's cores, nor than the mini-batches there are to load
    (where --limit-train/--limit-val tell): more only cost their start-up and memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    batches = [math.ceil(args.limit_val / args.test_batch_size) if args.limit_val else None]
    if not args.evaluate:
        batches.append(math.ceil(args.limit_train / args.batch_size) if args.limit_train else None)
    most = min([cores] + ([max(batches)] if None not in batches else []))
    if args.workers > most:
        log(args, f"=> note: -j {args.workers} lowered to {most}: "
            + (f"{cores} cores here" if most == cores else
                                                         f"{most} mini-batch{'es' if most > 1 else ''} to load"))
        args.workers = most

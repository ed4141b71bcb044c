"""What a path on the command line names, in words, and the rules for the files a run reads and writes.

A run reads regular files (a checkpoint, a NIR file) and directories (--data-dir), and writes regular
files alone, each through a temp file and a rename (checkpoints.atomic_write). A rename goes over
whatever has the name, a device or a named pipe included: so an output that exists must be a regular
file, and never one of the run's own inputs. docs/checkpoints.md states the rules.
"""
import errno
import os
import stat

KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
         (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file"))


def kind(mode):
    """What a stat mode is, in words ("a named pipe")."""
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def look(path):
    """(os.stat result, None) for a path that names something, else (None, why it names nothing: "no
    such file", "a symbolic link loop", "a symbolic link to nothing", or the system's reason)."""
    try:
        return os.stat(path), None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "is a symbolic link loop"
        if e.errno == errno.ENOENT:
            return None, "is a symbolic link to nothing" if os.path.islink(path) else "no such file"
        if e.errno == errno.ENOTDIR:
            return None, "no such file (a part of the path is not a directory)"
        return None, f"cannot be read ({e.strerror or e})"


def same_file(a, b):
    """Whether two paths name the same file, through links and relative paths; False if either names nothing."""
    try:
        return bool(a) and bool(b) and os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_output(flag, path, overwrite, inputs=()):
    """One line (SystemExit) unless `path` may be written: it names nothing yet, or a regular file that
    --overwrite lets the run replace and that is none of the run's inputs ({flag: path}).

    A device, named pipe, socket or directory is refused with --overwrite too: the rename of the new
    file would replace it (run as root, /dev/null itself)."""
    st, why = look(path)
    if st is None:
        if why != "no such file" and not why.startswith("no such file (") and "link to nothing" not in why:
            raise SystemExit(f"error: {flag} {path} {why}")
        return
    if not stat.S_ISREG(st.st_mode):
        raise SystemExit(f"error: {flag} {path} is {kind(st.st_mode)}: a run writes regular files only, and "
                         f"never replaces anything else (--overwrite neither); name a file")
    for other_flag, other in inputs:
        if same_file(path, other):
            raise SystemExit(f"error: {flag} {path} is the same file as {other_flag} {other}, which this run reads: "
                             f"it would be replaced; name another file")
    if not overwrite:
        raise SystemExit(f"error: {flag} {path} exists: add --overwrite to replace it")


def check_readable_dir(flag, path):
    """One line unless `path` is a directory this process can list (a dataset's, read-only or not)."""
    try:
        os.listdir(path)
    except OSError as e:
        raise SystemExit(f"error: {flag} {path} cannot be read ({e.strerror or e})")

"""Bounds on an untrusted NIR file, checked on its HDF5 layout before nir.read reads any array.

nir.read loads every array of a file whole: a 2 MB file that declares a compressed 40000×40000 weight
would take 13 GB before anything could refuse it, and ten thousand nodes take half a minute. Here the
file's objects are counted, and each array's declared shape and chunks are measured, from the HDF5
metadata alone, against what a network of this repository can be (docs/nir.md); each node's type is
read (a short string) and must be one nir knows. A file beyond the bounds is one line (NIRError).
"""
import math
import os

# The largest of our exports (ResNet11) has 31 nodes, 230 HDF5 objects, 19.6 M numbers in all, and
# ResNet7's fc0 is the largest array (1024 × 16384 = 16.8 M); the bounds leave room for wider outputs
MAX_NODES = 256
MAX_OBJECTS = 2048  # groups and arrays in the file
MAX_ELEMENTS = 1 << 25  # numbers in one array (33.5 M)
MAX_TOTAL = 1 << 26  # numbers in all arrays (67 M: 512 MB as float64)
MAX_FILE_BYTES = 1 << 30  # bounds the strings too, whose length the layout does not declare
MAX_ITEM_BYTES = 16  # float64, int64 and fixed strings of NIR's fields; a longer string is no field of ours
TYPE_BYTES = 64  # a node's type name


def check_bounds(path, error, kinds):
    """Raise error(message) unless the NIR file at `path` stays within the bounds above and every node's
    type is one of `kinds` (the names nir.read knows). Reads the HDF5 metadata and the type names only."""
    import h5py  # nir's own dependency

    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise error(f"{path} has {size / 2 ** 30:.1f} GiB; a network of this repository fits in {MAX_FILE_BYTES >> 30} GiB")
    try:
        with h5py.File(path, "r") as f:
            nodes = f.get("node/nodes")
            if isinstance(nodes, h5py.Group):
                if len(nodes) > MAX_NODES:
                    raise error(f"{path} declares {len(nodes)} nodes; a network of this repository has at most "
                                f"{MAX_NODES}")
            _check_arrays(f, path, error, h5py)
            for name, node in (nodes.items() if isinstance(nodes, h5py.Group) else ()):
                kind = _type_name(node, h5py)
                if kind not in kinds:
                    shown = "no type" if kind is None else f"the type {kind!r}"
                    raise error(f"{path}: node {name!r} has {shown}, not a NIR node kind (nir knows "
                                f"{', '.join(sorted(kinds))})")
    except OSError as e:  # h5py's: not an HDF5 file after all, truncated, unreadable
        raise error(f"{path} is not a readable HDF5 file ({str(e).splitlines()[0] if str(e) else 'unreadable'})") \
            from None


def _check_arrays(f, path, error, h5py):
    """Count the objects (stopping at the bound) and measure each array from its declared shape."""
    seen, total = 0, 0

    def visit(name, obj):
        nonlocal seen, total
        seen += 1
        if seen > MAX_OBJECTS:
            raise error(f"{path} holds more than {MAX_OBJECTS} HDF5 objects; a network of this repository "
                        f"has a few hundred")
        if not isinstance(obj, h5py.Dataset):
            return None
        size = math.prod(obj.shape) if obj.shape else 1
        chunk = math.prod(obj.chunks) if obj.chunks else 0
        if size > MAX_ELEMENTS or chunk > MAX_ELEMENTS:
            shape = "×".join(map(str, obj.shape or (1,)))
            raise error(f"{path}: {name} declares {shape} numbers (chunks {obj.chunks}); a network of this "
                        f"repository has at most {MAX_ELEMENTS:,} in one array")
        if obj.dtype.itemsize > MAX_ITEM_BYTES and obj.dtype.kind != "O":
            raise error(f"{path}: {name} declares items of {obj.dtype.itemsize} bytes, not numbers")
        total += size
        if total > MAX_TOTAL:
            raise error(f"{path} declares more than {MAX_TOTAL:,} numbers in all; a network of this repository "
                        f"has at most a third of that")
        return None

    f.visititems(visit)


def _type_name(node, h5py):
    """A node group's type name, or None; read only if it is a short scalar string."""
    t = node.get("type") if isinstance(node, h5py.Group) else None
    if not isinstance(t, h5py.Dataset) or t.shape != () or t.dtype.kind not in "SOU" or \
            (t.dtype.kind == "S" and t.dtype.itemsize > TYPE_BYTES):
        return None
    value = t[()]
    if isinstance(value, bytes) and len(value) <= TYPE_BYTES:
        return value.decode("utf8", errors="replace")
    return value if isinstance(value, str) and len(value) <= TYPE_BYTES else None

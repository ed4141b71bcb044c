"""A checkpoint byte for byte as the authors' Python 2.7 + PyTorch 0.3.1 wrote it, from pickle opcodes:
no old torch or Python is needed.

torch.save (0.3.1's torch/serialization.py, `_save`, with cPickle and protocol 2) writes five pickles,
then the data:
  1. the magic number 0x1950a86a20f9469cfc6c, a Python 2 long (LONG1);
  2. the protocol version, 1001;
  3. sys_info: protocol_version, little_endian, type_sizes (short 2, int 4, long 4: struct's standard sizes);
  4. the object. A tensor pickles as torch._utils._rebuild_tensor(storage, storage_offset, size, stride),
     the first version (no requires_grad, no hooks); a storage as the persistent id ('storage',
     storage_type, root_key, location, size, view_metadata), its type normalised to the CPU class
     (normalize_storage_type: torch.FloatStorage) and its place in location ('cuda:0');
  5. the sorted list of the storage keys (str(storage._cdata));
then, for each key in that order, the storage's element count (int64, little-endian) and its raw bytes.

Python 2's `str` (every key, 'resnet18', 'cuda:0') is a byte string: SHORT_BINSTRING, BINSTRING from 256
bytes. An int beyond 32 bits, like the parameter ids (id(p)) of the optimizer's state_dict, is the text
opcode INT. A dict is written in the order Python 2.7 iterates it (its string hash, without
randomisation, and its open addressing); an OrderedDict (a state_dict) by its __reduce__, as a list of
[key, value] lists. cPickle memoises (BINPUT from 1, BINGET on a repeat) each str of 2 bytes or more,
dict, list, class, function and reduced object; not the tuples that __reduce__ and persistent_id return
(`Temp`). Checked against Python 2.7.18's cPickle running 0.3.1's `_save` on stand-in storages and
tensors, for LeNet, VGG9 and ResNet11 (`module.`) and a 300-byte str: the same bytes.
"""
import struct

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
MASK = 2 ** 64 - 1


class Long(int):
    """A Python 2 long."""


class Temp:
    """A tuple only the pickler holds (refcount 1): cPickle neither memoises nor looks it up."""

    def __init__(self, value):
        self.value = value


class Global:
    """A class or function, pickled by name (GLOBAL); one instance per name, as in Python."""
    _made = {}

    def __new__(cls, module, name):
        return cls._made.setdefault((module, name), super().__new__(cls))

    def __init__(self, module, name):
        self.module, self.name = module, name


class Reduce:
    """func(*args), as __reduce__ returns it."""

    def __init__(self, func, args):
        self.func, self.args = func, args


class Storage:
    """A CUDA float storage on device 0; data: its float32 values as little-endian bytes."""

    def __init__(self, data):
        self.data, self.size = bytes(data), len(data) // 4
        self.key = str(id(self))  # str(root._cdata): unique while it lives
        self.location = "cuda:" + str(0)  # location_tag's: a new str per storage, memoised each time


class Py2Dict:
    """A dict, in the order Python 2.7 iterates it; `items` in insertion order."""

    def __init__(self, items):
        self.items = _py2_order(list(items))


def _py2_hash(key):
    """Python 2.7's hash of a str (string_hash, randomisation off, as by default), as size_t."""
    data = key.encode()
    if not data:
        return 0
    x = data[0] << 7
    for c in data:
        x = ((1000003 * x) ^ c) & MASK
    x ^= len(data)
    return MASK - 1 if x == MASK else x  # -1 is reserved for errors: -2


def _py2_order(items):
    """items in the slot order of a Python 2.7 dict they were inserted into in this order."""
    def insert(table, item):
        mask, h = len(table) - 1, _py2_hash(item[0])
        i, perturb = h & mask, h
        while table[i & mask] is not None:
            i = (5 * i + perturb + 1) & MASK
            perturb >>= 5
        table[i & mask] = item
    table, used = [None] * 8, 0
    for item in items:
        insert(table, item)
        used += 1
        if 3 * used >= 2 * len(table):  # dictresize(4 * used): the smallest power of 2 above it
            size = 8
            while size <= 4 * used:
                size *= 2
            old, table = table, [None] * size
            for entry in old:
                if entry is not None:
                    insert(table, entry)
    return [item for item in table if item is not None]


class Pickler:
    """cPickle of Python 2.7, protocol 2, for the values above."""

    def __init__(self, storages, storage_type=("torch", "FloatStorage")):
        self.out, self.memo, self.storages, self.storage_type = bytearray(), {}, storages, Global(*storage_type)

    def dump(self, obj):
        self.out += b"\x80\x02"
        self.save(obj)
        self.out += b"."

    def put(self, obj):
        n = len(self.memo) + 1  # cPickle's memo keys start at 1
        self.memo[id(obj)] = n, obj  # obj kept alive: its id stays its own
        self.out += b"q" + bytes([n]) if n < 256 else b"r" + struct.pack("<I", n)

    def get(self, obj):
        n = self.memo[id(obj)][0]
        self.out += b"h" + bytes([n]) if n < 256 else b"j" + struct.pack("<I", n)

    def save(self, obj):
        held = not isinstance(obj, Temp)
        obj = obj.value if isinstance(obj, Temp) else obj
        if id(obj) in self.memo:
            return self.get(obj)
        w = self.out
        if obj is None:
            w += b"N"
        elif obj is True or obj is False:
            w += b"\x88" if obj else b"\x89"
        elif isinstance(obj, Long):
            data = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
            w += b"\x8a" + bytes([len(data)]) + data
        elif isinstance(obj, int):
            if 0 <= obj < 256:
                w += b"K" + bytes([obj])
            elif 0 <= obj < 65536:
                w += b"M" + struct.pack("<H", obj)
            elif -2 ** 31 <= obj < 2 ** 31:
                w += b"J" + struct.pack("<i", obj)
            else:  # a 64-bit int: the text opcode
                w += b"I%d\n" % obj
        elif isinstance(obj, float):
            w += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            data = obj.encode()
            w += (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data
            if len(data) >= 2:  # cPickle writes strings shorter than 2 bytes without a memo
                self.put(obj)
        elif isinstance(obj, tuple):
            if not obj:
                w += b")"
                return
            if len(obj) > 3:
                w += b"("
            for x in obj:
                self.save(x)
            w += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(obj), b"t")
            if held:
                self.put(obj)
        elif isinstance(obj, list):
            w += b"]"
            self.put(obj)
            self._batch(obj, b"a", b"e")
        elif isinstance(obj, Py2Dict):
            w += b"}"
            self.put(obj)
            self._batch(obj.items, b"s", b"u")
        elif isinstance(obj, Global):
            w += b"c" + f"{obj.module}\n{obj.name}\n".encode()
            self.put(obj)
        elif isinstance(obj, Reduce):
            self.save(obj.func)
            self.save(Temp(obj.args))
            w += b"R"
            self.put(obj)
        elif isinstance(obj, Storage):  # persistent_id's tuple, then BINPERSID
            self.storages.setdefault(obj.key, obj)
            self.save(Temp(("storage", self.storage_type, obj.key, obj.location, obj.size, None)))
            w += b"Q"
        else:
            raise TypeError(f"no Python 2 form for {type(obj).__name__}")

    def _batch(self, items, one, many):
        """APPEND/SETITEM for one item, MARK … APPENDS/SETITEMS for more, in batches of 1000."""
        for start in range(0, len(items), 1000):
            batch = items[start:start + 1000]
            if len(batch) > 1:
                self.out += b"("
            for item in batch:
                for x in (item if one == b"s" else (item,)):
                    self.save(x)
            self.out += many if len(batch) > 1 else one


def tensor(data, shape):
    """A contiguous float32 CUDA tensor of 0.3.1: _rebuild_tensor(storage, 0, size, stride)."""
    return Reduce(Global("torch._utils", "_rebuild_tensor"),
                  (Storage(data), 0, Temp(tuple(shape)), Temp(_strides(shape))))


def _strides(shape):
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def state_dict(weights):
    """0.3.1's Module.state_dict(): an OrderedDict of tensors; weights: name -> (float32 bytes, shape)."""
    items = [[name, tensor(data, shape)] for name, (data, shape) in weights.items()]
    return Reduce(Global("collections", "OrderedDict"), (items,))


def sgd_state(param_ids, lr, weight_decay):
    """optimizer.state_dict() of 0.3.1's SGD (momentum 0: no buffers); param_ids: the id(p) of each."""
    defaults = [("lr", lr), ("momentum", 0), ("dampening", 0), ("weight_decay", weight_decay), ("nesterov", False)]
    group = Py2Dict([("params", None)] + Py2Dict(defaults).items)  # {'params': …}, then setdefault per default
    packed = Py2Dict([kv for kv in group.items if kv[0] != "params"] +
                     [("params", list(param_ids))])
    return Py2Dict([("state", Py2Dict([])), ("param_groups", [packed])])


def save(checkpoint, path, storage_type=("torch", "FloatStorage")):
    """torch.save(checkpoint, path) of PyTorch 0.3.1 under Python 2.7; checkpoint: values as above.
    storage_type: the storages' class as pickled (0.3.1 wrote the CPU class, with location 'cuda:0')."""
    storages = {}
    out = bytearray()
    sys_info = Py2Dict([("protocol_version", PROTOCOL_VERSION), ("little_endian", True),
                        ("type_sizes", Py2Dict([("short", 2), ("int", 4), ("long", 4)]))])
    for obj in (Long(MAGIC_NUMBER), PROTOCOL_VERSION, sys_info, checkpoint):
        pickler = Pickler(storages, storage_type)
        pickler.dump(obj)
        out += pickler.out
    keys = sorted(storages)
    pickler = Pickler({})
    pickler.dump(keys)
    out += pickler.out
    for key in keys:
        out += struct.pack("<q", storages[key].size) + storages[key].data
    with open(path, "wb") as f:
        f.write(out)


def authors_checkpoint(weights, path, arch="resnet18", storage_type=("torch", "FloatStorage"), param_ids=None):
    """The dict the authors' scripts saved (pytorch/examples' keys, their `arch`, always 'resnet18': a
    leftover of the ImageNet example), epoch 7, best Prec@1 90.1, in the bytes PyTorch 0.3.1 wrote.
    weights: name -> (float32 bytes, shape); param_ids: id(p) of each parameter (addresses, by default
    like a 64-bit Linux process's)."""
    ids = param_ids or [140_270_000_000_000 + 4096 * i for i in range(len(weights))]
    save(Py2Dict([("epoch", 7), ("arch", arch), ("state_dict", state_dict(weights)), ("best_prec1", 90.1),
                  ("optimizer", sgd_state(ids, lr=0.0033, weight_decay=5e-4))]), path, storage_type)


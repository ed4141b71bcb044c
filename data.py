"""The data of a run: the datasets (their shapes, classes, transforms and input scales), read through
torchvision (downloaded once per node under torchrun; Fashion-MNIST also from its Debian package) or
from a folder of one's own images, damaged-file checks, the synthetic stand-in, and the loaders (a
DistributedSampler's share per process). The dataset decides the network's output width and the
scale of its input code (`network`)."""
import contextlib
import gzip
import math
import os
import shutil
import struct
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets
from torchvision import transforms
from torchvision.datasets.utils import check_integrity
from PIL import Image

from checkpoints import first_line, log

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install -y dataset-fashion-mnist


class Dataset(NamedTuple):
    """What a run needs to know of a dataset: its images, its classes, and how they become input spikes."""
    cls: type                 # the torchvision dataset class
    shape: tuple              # (C, H, W) of an image: it fits the networks that take this shape
    classes: int              # the width of the network's output layer
    sizes: tuple              # (training, test) images: --synthetic makes at most as many
    mean: tuple = None        # Normalize(mean, std) after ToTensor; None: ToTensor only
    std: tuple = None
    scale: float = 1.0        # the Poisson code's: s = sign(x)·1[u < |x|·scale]
    crop: bool = False        # training: RandomCrop(32, padding=4)
    flip: bool = False        # training: RandomHorizontalFlip (not for digits)


# The authors' rule (their CIFAR-10 values): the channel means, and stds ≈ 2.25× the channel stds, so that
# a normalised pixel stays near |x| ≤ 1 and the Poisson code carries the image (docs/reproduce.md)
DATASETS = {
    # ToTensor only, pixels in [0, 1]: a pixel fires with probability up to 1/2 per step
    "mnist": Dataset(datasets.MNIST, (1, 28, 28), 10, (60000, 10000), scale=0.5),
    "fashion-mnist": Dataset(datasets.FashionMNIST, (1, 28, 28), 10, (60000, 10000), scale=0.5),
    "cifar10": Dataset(datasets.CIFAR10, (3, 32, 32), 10, (50000, 10000), (0.4914, 0.4822, 0.4465),
                       (0.557, 0.549, 0.5534), crop=True, flip=True),  # the authors' values
    "cifar100": Dataset(datasets.CIFAR100, (3, 32, 32), 100, (50000, 10000), (0.5071, 0.4865, 0.4409),
                        (0.6014, 0.5769, 0.6215), crop=True, flip=True),  # 2.25 × (0.2673, 0.2564, 0.2762)
    "svhn": Dataset(datasets.SVHN, (3, 32, 32), 10, (73257, 26032), (0.4377, 0.4438, 0.4728),
                    (0.4455, 0.4523, 0.4433), crop=True),  # 2.25 × (0.1980, 0.2010, 0.1970)
}
TORCHVISION = {name: d.cls for name, d in DATASETS.items()}
FOLDER = "folder"  # --dataset folder: --data-dir/train/<class>/… and --data-dir/test/<class>/…
IMAGES = datasets.folder.IMG_EXTENSIONS


def fitting(name):
    """The datasets whose images fit the network made for dataset `name` (the same shape), and folder."""
    return tuple(n for n, d in DATASETS.items() if d.shape == DATASETS[name].shape) + (FOLDER,)


def image_shape(name):
    """(C, H, W) of dataset `name`'s images: the input of the networks it fits."""
    return DATASETS[name].shape


def classes(args):
    """The network's output width for args.dataset: its classes; for a folder, train/'s class folders."""
    if args.dataset == FOLDER and args.synthetic:
        raise SystemExit("error: --synthetic stands in for a named dataset; --dataset folder reads your images")
    return len(folder_classes(args)) if args.dataset == FOLDER else DATASETS[args.dataset].classes


def network(Model, args, **kw):
    """The script's network for args.dataset: an output per class, and the dataset's input scale (the
    Poisson code belongs to how the dataset's images are turned into rates, not to the network)."""
    shape = tuple(getattr(args, "image_shape", None) or ())  # the script's; a checkpoint's dataset may differ
    if shape and args.dataset != FOLDER and (args.dataset not in DATASETS or DATASETS[args.dataset].shape != shape):
        fits = ", ".join(n for n, d in DATASETS.items() if d.shape == shape)
        raise SystemExit(f"error: --dataset {args.dataset} does not fit {Model.__name__}, which takes images of "
                         f"shape {shape}: its datasets are {fits} and {FOLDER}")
    args.classes = classes(args)  # recorded in the checkpoint
    net = Model(time_steps=args.time_steps, leak=args.leak, dropout=args.dropout, classes=args.classes, **kw)
    net.input_scale = DATASETS[args.dataset].scale if args.dataset in DATASETS else 1.0
    return net


def get_transform(name, train, shape=None):
    """Image to tensor for dataset `name` (training: with its augmentation); shape: the network's (C, H, W)."""
    if name == FOLDER:  # any image: the network's channels, resized and centre-cropped to its size, into [-1, 1]
        c, h, w = shape
        gray = [transforms.Grayscale(1)] if c == 1 else []  # ImageFolder reads every image as RGB
        return transforms.Compose(gray + [transforms.Resize(min(h, w)), transforms.CenterCrop((h, w)),
                                          transforms.ToTensor(), transforms.Normalize((0.5,) * c, (0.5,) * c)])
    d = DATASETS.get(name)
    if d is None or d.mean is None:  # (Fashion-)MNIST: ToTensor only; the Poisson code reads intensities
        return transforms.ToTensor()
    augment = ([transforms.RandomCrop(d.shape[1:], padding=4)] if d.crop else []) + \
        ([transforms.RandomHorizontalFlip()] if d.flip else [])
    tensor = [transforms.ToTensor(), transforms.Normalize(d.mean, d.std)]
    return transforms.Compose((augment if train else []) + tensor)


def get_dataset(args, train):
    """The dataset (or --synthetic stand-in) with its transform, cut to the first --limit-* examples."""
    transform = get_transform(args.dataset, train, getattr(args, "image_shape", None))
    limit = args.limit_train if train else args.limit_val
    if args.synthetic:
        d = DATASETS[args.dataset]
        size = min(limit, d.sizes[not train]) if limit else 1024 if train else 256
        data = datasets.FakeData(size, d.shape, d.classes, transform,
                                 random_offset=0 if train else 10 ** 6)  # test images differ from training
    elif args.dataset == FOLDER:
        data = folder_dataset(args, train, transform)
    else:  # under torchrun, one process per node downloads; the others wait for it, then read
        first = not args.distributed or int(os.environ.get("LOCAL_RANK", 0)) == 0
        with _after_the_node_first(args, first):
            data = _torchvision_dataset(args, train, transform, download=first)
    return Subset(data, range(min(limit, len(data)))) if limit else data


# ----------------------------------------------------------------------------------------------
# A folder of one's own images (torchvision's ImageFolder layout)

def folder_classes(args):
    """train/'s class folders, sorted (ImageFolder's order: the index of each output)."""
    train = _split_dir(args, "train")
    names = sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise SystemExit(f"error: --dataset folder: {train} holds no class folders; put each class's images in "
                         f"{train}/<class>/")
    return names


def _split_dir(args, split):
    path = os.path.join(args.data_dir, split)
    if not os.path.isdir(path):
        raise SystemExit(f"error: --dataset folder: {args.data_dir} has no {split}/ folder; it needs "
                         f"train/<class>/… and test/<class>/… (torchvision's ImageFolder layout)")
    return path


class _ClassFolders(datasets.ImageFolder):
    """ImageFolder with the training split's classes, so a test image's label is its train/ index."""

    def __init__(self, root, names, transform):
        self.names = names
        super().__init__(root, transform, allow_empty=True)

    def find_classes(self, directory):
        return self.names, {c: i for i, c in enumerate(self.names)}


def folder_dataset(args, train, transform):
    """One split of --data-dir as an ImageFolder; a bad folder is one line: a split missing, a test class
    that train/ has not, a class of train/ (or a whole split) without images, an image that cannot be read."""
    names, split = folder_classes(args), "train" if train else "test"
    root = _split_dir(args, split)
    if not train:
        extra = sorted({e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")} - set(names))
        if extra:
            raise SystemExit(f"error: --dataset folder: {root} has classes that {args.data_dir}/train has not "
                             f"({', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}); the network's outputs "
                             f"are train/'s classes")
    data = _ClassFolders(root, names, transform)
    found = {label for _, label in data.samples}
    empty = [n for i, n in enumerate(names) if i not in found]
    if not data.samples or (train and empty):
        where = root if not data.samples else os.path.join(root, empty[0])
        raise SystemExit(f"error: --dataset folder: {where} holds no images (files ending "
                         f"{', '.join(IMAGES)})")
    for path, _ in data.samples:  # a file that is not an image would stop the run mid-epoch
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as e:
            raise SystemExit(f"error: --dataset folder: {path} cannot be read as an image ({first_line(e)}); "
                             f"replace or delete it")
    return data


@contextlib.contextmanager
def _after_the_node_first(args, first):
    """Under torchrun, the block runs in the node's first process (LOCAL_RANK 0) before the others:
    they wait at a barrier that it reaches when done (or failed), so no two write the same files."""
    if args.distributed and not first:
        dist.barrier()
    try:
        yield
    finally:
        if args.distributed and first:
            dist.barrier()


def _torchvision_dataset(args, train, transform, download=True):
    name, root = args.dataset, args.data_dir
    if name == "fashion-mnist":
        _unpack_debian_fashion_mnist(args)
    cls = TORCHVISION[name]
    split = dict(split="train" if train else "test") if name == "svhn" else dict(train=train)
    try:
        return cls(root, transform=transform, download=False, **split)
    except Exception as e:  # not there (a RuntimeError): download it; there but damaged: say which file
        check_dataset_files(cls, root, train, e)
        missing = e
    try:
        if not download:
            raise missing
        return cls(root, transform=transform, download=True, **split)
    except Exception as e:
        how = (f"install it with apt-get update && apt-get install -y dataset-fashion-mnist (as root, "
               f"into {DEBIAN_FASHION_MNIST}), or run once with internet access" if name == "fashion-mnist" else
               f"run once with internet access, or copy torchvision's {cls.__name__} files under {root}")
        raise SystemExit(f"error: {name} is not in {root} and could not be downloaded ({first_line(e)}); {how}")


def check_dataset_files(cls, root, train, error):
    """After torchvision failed to read the dataset (`error`): one line naming a damaged file, if one
    is; unless it failed because the files are not there, one line all the same."""
    damaged = _damaged_file(cls, root, train)
    if damaged:
        path, why = damaged
        again = f"decompressed anew from {DEBIAN_FASHION_MNIST}" if cls is datasets.FashionMNIST and \
            os.path.isdir(DEBIAN_FASHION_MNIST) else "downloaded anew"
        raise SystemExit(f"error: {path} is damaged ({why}): delete it, and the next run has it {again}")
    if not isinstance(error, RuntimeError):
        raise SystemExit(f"error: torchvision cannot read {cls.__name__} in {root} ({first_line(error)}); "
                         f"delete its files there, and the next run fetches them anew")


def _damaged_file(cls, root, train):
    """(path, why) of a file of this split that is there but not whole, or None. (Fashion-)MNIST: the
    size of an IDX file must be what its header says; CIFAR-10 and SVHN: torchvision's checksums."""
    if issubclass(cls, datasets.MNIST):
        split = "train" if train else "t10k"
        for kind, dims in (("images", 3), ("labels", 1)):
            path = os.path.join(root, cls.__name__, "raw", f"{split}-{kind}-idx{dims}-ubyte")
            why = os.path.isfile(path) and _idx_damage(path, dims)
            if why:
                return path, why
        return None
    if cls is datasets.SVHN:
        folder, files = root, [cls.split_list["train" if train else "test"][1:]]
    elif issubclass(cls, datasets.CIFAR10):
        folder, files = os.path.join(root, cls.base_folder), cls.train_list + cls.test_list
    else:  # a dataset class of the user's
        return None
    for name, md5 in files:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not check_integrity(path, md5):
            return path, "its checksum is not the dataset's"
    return None


def _idx_damage(path, dims):
    """Why an IDX file of unsigned bytes with `dims` dimensions is damaged, or None if it is whole."""
    with open(path, "rb") as f:
        header = f.read(4 + 4 * dims)
    if len(header) < 4 + 4 * dims or header[:4] != bytes((0, 0, 8, dims)):
        return f"not an IDX file of bytes: it begins {header[:4].hex()}, not 000008{dims:02x}"
    size, actual = 4 + 4 * dims + math.prod(struct.unpack(f">{dims}I", header[4:])), os.path.getsize(path)
    return None if actual == size else f"{actual} bytes, where its header says {size}"


def _unpack_debian_fashion_mnist(args):
    """torchvision reads decompressed IDX files from <root>/FashionMNIST/raw; Debian ships them gzipped."""
    raw = os.path.join(args.data_dir, "FashionMNIST", "raw")
    names = [f"{s}-{k}-idx{d}-ubyte" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
    missing = [n for n in names if not os.path.exists(os.path.join(raw, n))]
    if not missing or not all(os.path.exists(os.path.join(DEBIAN_FASHION_MNIST, n + ".gz")) for n in missing):
        return
    os.makedirs(raw, exist_ok=True)
    for n in missing:  # through a temp file: torchrun's processes may all do this at once
        tmp = os.path.join(raw, f".{n}.{os.getpid()}")
        with gzip.open(os.path.join(DEBIAN_FASHION_MNIST, n + ".gz")) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, os.path.join(raw, n))
    log(args, f"=> decompressed Fashion-MNIST from {DEBIAN_FASHION_MNIST} into {raw}")


def check_input_memory(args, loader, device):
    """The Poisson code makes a mini-batch's input spike trains at once, (T, B, C, H, W) in float32: a
    lower bound of what one step takes. More than the device's memory ends in one line, before any work."""
    images = min(loader.batch_size, len(loader.dataset))
    need = 4 * args.time_steps * images * math.prod(args.image_shape)
    have = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise SystemExit(f"error: --time-steps {args.time_steps} with {images} images per mini-batch: their input "
                         f"spike trains alone take {need / 2 ** 30:.3g} GiB, more than this {device.type}'s "
                         f"{have / 2 ** 30:.3g} GiB; lower --time-steps or the batch size")


def get_loader(args, train, device):
    data, sampler = get_dataset(args, train), None
    if args.distributed and train:
        sampler = DistributedSampler(data, shuffle=True, seed=args.seed)
    elif args.distributed:  # a strided share: DistributedSampler would pad, counting some images twice
        data = Subset(data, range(args.rank, len(data), args.world_size))
    return DataLoader(data, batch_size=args.batch_size if train else args.test_batch_size,
                      shuffle=train and sampler is None, sampler=sampler, num_workers=args.workers,
                      pin_memory=device.type == "cuda")

"""The data of a run: the paper's datasets through torchvision (downloaded once per node under
torchrun; Fashion-MNIST also from its Debian package), their transforms, damaged-file checks, the
synthetic stand-in, and the loaders (a DistributedSampler's share per process)."""
import contextlib
import gzip
import math
import os
import shutil
import struct

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets
from torchvision import transforms
from torchvision.datasets.utils import check_integrity

from checkpoints import first_line, log

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install -y dataset-fashion-mnist


NORMALISE = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.557, 0.549, 0.5534)),  # the authors' values
             "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))}
TORCHVISION = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST,
               "cifar10": datasets.CIFAR10, "svhn": datasets.SVHN}
SIZES = {"mnist": (60000, 10000), "fashion-mnist": (60000, 10000), "cifar10": (50000, 10000),
         "svhn": (73257, 26032)}  # (training, test) images: --synthetic makes at most as many


def image_shape(name):
    return (3, 32, 32) if name in NORMALISE else (1, 28, 28)


def get_transform(name, train):
    if name not in NORMALISE:  # (Fashion-)MNIST: ToTensor only; the Poisson code reads intensities
        return transforms.ToTensor()
    augment = [transforms.RandomCrop(32, padding=4)]
    if name == "cifar10":
        augment.append(transforms.RandomHorizontalFlip())
    tensor = [transforms.ToTensor(), transforms.Normalize(*NORMALISE[name])]
    return transforms.Compose((augment if train else []) + tensor)


def get_dataset(args, train):
    """The dataset (or --synthetic stand-in) with its transform, cut to the first --limit-* examples."""
    transform, limit = get_transform(args.dataset, train), args.limit_train if train else args.limit_val
    if args.synthetic:
        size = min(limit, SIZES[args.dataset][not train]) if limit else 1024 if train else 256
        data = datasets.FakeData(size, image_shape(args.dataset), 10, transform,
                                 random_offset=0 if train else 10 ** 6)  # test images differ from training
    else:  # under torchrun, one process per node downloads; the others wait for it, then read
        first = not args.distributed or int(os.environ.get("LOCAL_RANK", 0)) == 0
        with _after_the_node_first(args, first):
            data = _torchvision_dataset(args, train, transform, download=first)
    return Subset(data, range(min(limit, len(data)))) if limit else data


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
    need = 4 * args.time_steps * images * math.prod(image_shape(args.dataset))
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

"""Every script on every dataset that fits its network: the output width and the input code follow the
dataset, a checkpoint records them, a folder of one's own images trains, and each bad folder is one line."""
import re

import pytest
import torch
from PIL import Image

import data
import utils
from conftest import SCRIPTS, TAGS, exit_message, network, run_main

FITS = {"mnist_LeNet.py": ("mnist", "fashion-mnist"), "cifar10_VGG9.py": ("cifar10", "cifar100", "svhn"),
        "cifar10_ResNet11.py": ("cifar10", "cifar100", "svhn"), "svhn_ResNet.py": ("cifar10", "cifar100", "svhn")}
DEFAULT = {"mnist_LeNet.py": "mnist", "cifar10_VGG9.py": "cifar10", "cifar10_ResNet11.py": "cifar10",
           "svhn_ResNet.py": "svhn"}
CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}


def few(tmp_path, train=True):
    """A handful of images, T = 2: one tiny epoch and its test pass take seconds."""
    return ["--time-steps", "2", *(["--limit-train", "4", "-b", "4"] if train else []), "--limit-val", "2",
            "--test-batch-size", "2", "-j", "0", "--device", "cpu", "--no-progress", "--out-dir", tmp_path]


# the paper's pairs (each script's default) train, resume and evaluate in test_scripts.py
@pytest.mark.parametrize("script,dataset", [(s, d) for s in SCRIPTS for d in FITS[s] if d != DEFAULT[s]])
def test_each_script_trains_and_evaluates_on_each_of_its_datasets(script, dataset, tmp_path, capsys):
    net = run_main(script, ["--dataset", dataset, "--synthetic", "--epochs", "1", *few(tmp_path)])
    assert re.search(r"=> epoch 1/1 .*\| Test: Prec@1 [\d.]+ ", capsys.readouterr().out)  # trained, then evaluated
    assert net.fc1.weight.shape[0] == CLASSES[dataset]
    assert net.input_scale == (0.5 if dataset in ("mnist", "fashion-mnist") else 1.0)
    ckpt = torch.load(tmp_path / f"checkpointT1_{TAGS[script]}.pth.tar", map_location="cpu", weights_only=True)
    assert (ckpt["dataset"], ckpt["classes"]) == (dataset, CLASSES[dataset])


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_offers_the_datasets_that_fit_and_the_default_is_the_papers(script, capsys):
    net, module = network(script, time_steps=2)
    with pytest.raises(SystemExit):
        utils.main(type(net), module.DEFAULTS, argv=["--help"])
    out = capsys.readouterr().out
    assert f"--dataset {'|'.join(data.fitting(module.DEFAULTS['dataset']))}" in out
    assert set(data.fitting(module.DEFAULTS["dataset"])) == {*FITS[script], "folder"}
    assert f"(default: {module.DEFAULTS['dataset']})" in out and "centre-cropped" in out
    code, _ = exit_message(script, ["--dataset", "imagenet", "--synthetic"])
    assert code == 2


def test_the_input_scale_is_the_datasets_not_the_networks():
    import mnist_LeNet
    assert "input_scale" not in vars(mnist_LeNet.LeNet)  # the network has none of its own
    assert {n: d.scale for n, d in data.DATASETS.items()} == {"mnist": 0.5, "fashion-mnist": 0.5, "cifar10": 1.0,
                                                             "cifar100": 1.0, "svhn": 1.0}


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_normalised_pixels_stay_near_one_at_most(name):
    """The authors' rule (their CIFAR-10 values): a pixel of 0 or 1 lands at |x| ≤ 1.3, so the Poisson code
    s = sign(x)·1[u < |x|] carries the image; SVHN's own channel stds (0.198) put it at up to 2.8."""
    d = data.DATASETS[name]
    extremes = [max(m / s, (1 - m) / s) for m, s in zip(d.mean, d.std)]
    assert max(extremes) <= 1.3, extremes
    if name == "svhn":
        assert all(abs(s / own - 2.25) < 0.01 for s, own in zip(d.std, (0.1980, 0.2010, 0.1970)))


class _Recorded:
    """A stand-in for a torchvision dataset class: white 32×32 images, the keyword arguments recorded."""
    seen = []

    def __init__(self, root, transform=None, download=False, **split):
        self.transform = transform
        _Recorded.seen.append(split)

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.transform(Image.new("RGB", (32, 32), (255, 255, 255))), 99


@pytest.mark.parametrize("name,split", [("cifar100", {"train": False}), ("svhn", {"split": "test"})])
def test_a_named_dataset_is_read_with_its_split_and_normalisation(name, split, monkeypatch):
    import cifar10_VGG9
    monkeypatch.setitem(data.TORCHVISION, name, _Recorded)
    args = utils.get_parser("", {**cifar10_VGG9.DEFAULTS, "dataset": name}).parse_args([])
    utils.processes(args)
    image, _ = data.get_dataset(args, train=False)[0]
    assert _Recorded.seen[-1] == split
    d = data.DATASETS[name]
    assert torch.allclose(image[:, 0, 0], (1 - torch.tensor(d.mean)) / torch.tensor(d.std))


# ----------------------------------------------------------------------------------------------
# A 100-class network

def test_a_100_class_network_saves_resumes_and_refuses_another_width(tmp_path, capsys):
    flags = ["--dataset", "cifar100", "--synthetic", *few(tmp_path)]
    run_main("cifar10_VGG9.py", [*flags, "--epochs", "1"])
    last = tmp_path / "checkpointT1_cifar10_v9.pth.tar"
    net = run_main("cifar10_VGG9.py", [*flags, "--epochs", "2", "--resume", last])
    assert net.fc1.weight.shape == (100, 1024)
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 2
    # without --dataset, the checkpoint's: what a checkpoint fixes, the checkpoint decides
    capsys.readouterr()
    net = run_main("cifar10_VGG9.py", ["--synthetic", *few(tmp_path, train=False), "--resume", last, "--evaluate"])
    assert net.fc1.weight.shape == (100, 1024) and "--dataset cifar100" in capsys.readouterr().out
    code, message = exit_message("cifar10_VGG9.py", ["--synthetic", *few(tmp_path, train=False), "--resume", last,
                                                      "--evaluate", "--dataset", "cifar10"])
    assert code == 1 and message == (f"error: --resume {last} holds a VGG9 for 100 classes (trained with --dataset "
                                     f"cifar100), and this one has 10 outputs, one per class of its --dataset: give "
                                     f"the --dataset it was trained on")


def test_a_checkpoints_dataset_that_does_not_fit_the_network_is_one_line(tmp_path):
    run_main("mnist_LeNet.py", ["--dataset", "fashion-mnist", "--synthetic", "--epochs", "1", *few(tmp_path)])
    path = tmp_path / "checkpointT1_mnist1.pth.tar"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["args"]["dataset"] = ckpt["dataset"] = "svhn"
    torch.save(ckpt, path)
    code, message = exit_message("mnist_LeNet.py", ["--synthetic", *few(tmp_path, train=False), "--resume", path,
                                                    "--evaluate"])
    assert code == 1 and message == ("error: --dataset svhn does not fit LeNet, which takes images of shape "
                                     "(1, 28, 28): its datasets are mnist, fashion-mnist and folder")


# ----------------------------------------------------------------------------------------------
# A folder of one's own images

def write_images(folder, classes, n=2, size=(40, 30), mode="RGB", stem="image"):
    for i, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            colour = (40 * i + 20 * j,) * len(mode) if mode != "L" else 40 * i + 20 * j
            Image.new(mode, size, colour).save(folder / name / f"{stem}{j}.png")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    write_images(root / "train", ["cat", "dog", "eel"], n=4, mode="RGB")
    write_images(root / "train", ["eel"], n=1, size=(20, 50), mode="L", stem="gray")  # any size, any mode
    write_images(root / "test", ["dog", "cat"], n=2, size=(64, 64), mode="RGBA")
    return root


def test_a_folder_dataset_trains_with_its_classes(folder, tmp_path):
    net = run_main("mnist_LeNet.py", ["--dataset", "folder", "--data-dir", folder, "--epochs", "1",
                                      *few(tmp_path / "run"), "--limit-train", "12"])
    assert net.fc1.weight.shape == (3, 200) and net.input_scale == 1.0
    ckpt = torch.load(tmp_path / "run" / "checkpointT1_mnist1.pth.tar", map_location="cpu", weights_only=True)
    assert (ckpt["dataset"], ckpt["classes"]) == ("folder", 3)


@pytest.mark.parametrize("script,shape", [("mnist_LeNet.py", (1, 28, 28)), ("cifar10_VGG9.py", (3, 32, 32))])
def test_folder_images_become_the_networks_channels_and_size_in_minus_one_to_one(folder, script, shape):
    module = network(script, time_steps=2)[1]
    args = utils.get_parser("", module.DEFAULTS).parse_args(["--dataset", "folder", "--data-dir", str(folder)])
    utils.processes(args)
    train, test = data.get_dataset(args, train=True), data.get_dataset(args, train=False)
    assert data.classes(args) == 3 and len(train) == 13 and len(test) == 4
    images = torch.stack([image for image, _ in train])
    assert images.shape[1:] == shape and images.min() >= -1 and images.max() <= 1
    assert images.min() == -1  # the black image: 0 → -1
    assert sorted({label for _, label in test}) == [0, 1]  # cat, dog: train/'s indices (test/ has no eel)


@pytest.mark.parametrize("damage,phrase", [
    ("no test", "has no test/ folder; it needs train/<class>/… and test/<class>/…"),
    ("no train", "has no train/ folder"),
    ("a class only in test", "test has classes that {root}/train has not (fox); the network's outputs are "
                             "train/'s classes"),
    ("an unreadable image", "train/dog/image0.png cannot be read as an image ("),
    ("a class without images", "train/eel holds no images (files ending .jpg"),
    ("no class folders", "train holds no class folders"),
    ("a test split without images", "test holds no images")])
def test_each_bad_folder_is_one_line(folder, damage, phrase, tmp_path):
    import shutil
    if damage == "no test":
        shutil.rmtree(folder / "test")
    elif damage == "no train":
        shutil.rmtree(folder / "train")
    elif damage == "a class only in test":
        write_images(folder / "test", ["fox"])
    elif damage == "an unreadable image":
        (folder / "train" / "dog" / "image0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    elif damage == "a class without images":
        shutil.rmtree(folder / "train" / "eel")
        (folder / "train" / "eel").mkdir()
        (folder / "train" / "eel" / "notes.txt").write_text("no image here")
    elif damage == "no class folders":
        shutil.rmtree(folder / "train")
        (folder / "train").mkdir()
        Image.new("L", (28, 28)).save(folder / "train" / "loose.png")
    elif damage == "a test split without images":
        for png in (folder / "test").rglob("*.png"):
            png.unlink()
    code, message = exit_message("mnist_LeNet.py", ["--dataset", "folder", "--data-dir", folder, "--epochs", "1",
                                                    *few(tmp_path / "run")])
    assert code == 1 and message.startswith("error: --dataset folder: ")
    assert phrase.format(root=folder) in message, message


def test_synthetic_is_no_stand_in_for_a_folder(tmp_path):
    code, message = exit_message("mnist_LeNet.py", ["--dataset", "folder", "--synthetic", "-e",
                                                    *few(tmp_path, train=False)])
    assert code == 1 and "--synthetic stands in for a named dataset" in message


@pytest.mark.parametrize("key,value,what", [
    ("classes", 0, "a number of classes ≥ 1"), ("classes", 10.0, "a number of classes"), ("dataset", 7, "a dataset's name")])
def test_the_recorded_dataset_and_classes_are_validated(key, value, what, tmp_path):
    import checkpoints
    net, _ = network("mnist_LeNet.py", time_steps=2)
    path = tmp_path / "odd.pth.tar"
    torch.save({"epoch": 1, "arch": "LeNet", "state_dict": net.state_dict(), "best_prec1": 5.0, key: value}, path)
    with pytest.raises(SystemExit) as e:
        checkpoints.load_checkpoint(str(path), net)
    assert str(e.value).startswith(f"error: --resume {path}: its {key} is ") and what in str(e.value), e.value

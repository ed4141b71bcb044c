"""docs/extending.md's worked example, as the page shows it: a network of about twenty lines on
SpikingNetwork trains one tiny epoch and evaluates through utils.main, on each dataset it fits."""
import importlib.util
import os
import re
import sys

import pytest
import torch

import utils
from conftest import ROOT

PAGE = os.path.join(ROOT, "docs", "extending.md")


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The page's first Python block, saved as tiny_snn.py and imported as a module."""
    code = re.search(r"```python\n(.*?)```", open(PAGE).read(), re.S).group(1)
    path = tmp_path / "tiny_snn.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("tiny_snn", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "tiny_snn", module)  # utils.main reads the script's docstring there
    spec.loader.exec_module(module)
    return module, code


@pytest.mark.parametrize("dataset,classes", [("mnist", 10), ("folder", 2)])
def test_the_example_network_trains_one_tiny_epoch(example, dataset, classes, tmp_path, capsys):
    module, code = example
    body = code[code.index("class TinySNN"):code.index('if __name__')].strip().splitlines()
    assert len(body) <= 20  # "a new network in twenty lines"
    flags = ["--time-steps", "2", "--limit-train", "8", "--limit-val", "4", "-b", "4", "--test-batch-size", "4",
             "-j", "0", "--device", "cpu", "--no-progress", "--epochs", "1", "--out-dir", tmp_path / "run"]
    if dataset == "folder":
        from PIL import Image
        for split in ("train", "test"):
            for name in ("a", "b"):
                (tmp_path / "images" / split / name).mkdir(parents=True)
                for i in range(3):
                    Image.new("RGB", (30, 30), (100 * i,) * 3).save(tmp_path / "images" / split / name / f"{i}.png")
        flags += ["--data-dir", tmp_path / "images"]
    else:
        flags += ["--synthetic"]
    net = utils.main(module.TinySNN, module.DEFAULTS, argv=["--dataset", dataset, *map(str, flags)])
    assert re.search(r"=> epoch 1/1 .*\| Test: Prec@1 .* rates cnn1 [\d.]+ pool1 [\d.]+ fc0", capsys.readouterr().out)
    assert net.fc1.weight.shape == (classes, 128)
    ckpt = torch.load(tmp_path / "run" / "checkpointT1_tiny.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["arch"] == "TinySNN" and ckpt["classes"] == classes


def test_the_example_offers_the_datasets_that_fit(example, capsys):
    module, _ = example
    with pytest.raises(SystemExit):
        utils.main(module.TinySNN, module.DEFAULTS, argv=["--help"])
    out = capsys.readouterr().out
    assert "--dataset mnist|fashion-mnist|folder" in out and "A small spiking CNN" in out

"""Fixtures for the script tests: the repository on sys.path, a subprocess runner, tiny offline flags."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture
def tiny():
    """Flags for a run that takes seconds: T = 2, a few synthetic images, no workers, no bar."""
    return ["--synthetic", "--time-steps", "2", "--limit-train", "32", "--limit-val", "16", "-b", "16",
            "--test-batch-size", "16", "-j", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture
def offline():
    """Environment in which a torchvision download fails at once, even on a connected machine."""
    proxy = "http://127.0.0.1:9"  # nothing listens on the discard port
    return {"http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "no_proxy": ""}


@pytest.fixture
def run_script():
    """run_script("mnist_LeNet.py", *flags, env={...}) -> CompletedProcess, plus .out = stdout + stderr."""
    def run(script, *flags, env=None, timeout=600):
        p = subprocess.run([sys.executable, script, *map(str, flags)], cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, **(env or {})})
        p.out = p.stdout + p.stderr
        return p
    return run


@pytest.fixture
def clean_error():
    """clean_error(p, *phrases): bad input ended with exit 1 (or `code`), no traceback, and one stderr
    line holding every phrase."""
    def check(p, *phrases, code=1):
        assert p.returncode == code, p.out
        assert "Traceback" not in p.out, p.out
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, p.stderr
        for phrase in phrases:
            assert phrase in lines[0], lines[0]
    return check

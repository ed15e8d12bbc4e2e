"""pytest's fixtures and hooks; what tests share besides fixtures is in tests/helpers.py."""
import fcntl
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import CONVERGENCE_TIMEOUT, SIMCLR_CONVERGENCE_FLAGS, knn_top1, run_script


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """An ImageFolder of 3 classes x 8 random 40x40 JPEGs, with class-specific colours."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i in range(8):
            pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            pixels[..., c] = 255
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.jpg")
    return root


def pytest_configure(config):
    """The controller names a file where every convergence verdict is recorded (xdist workers inherit it)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        fd, path = tempfile.mkstemp(prefix="ssl-convergence-", suffix=".jsonl")
        os.close(fd)
        os.environ["SSL_TEST_CONVERGENCE_LOG"] = path


def pytest_collection_modifyitems(items):
    """Every test that launches torchrun is marked `distributed` (`make test-fast` leaves them out)."""
    import inspect

    for item in items:
        function = getattr(item, "function", None)
        try:
            source = inspect.getsource(function) if function else ""
        except (OSError, TypeError):
            continue
        if "run_torchrun(" in source or "torch.distributed.run" in source:
            item.add_marker(pytest.mark.distributed)


def pytest_terminal_summary(terminalreporter):
    """The convergence runs' kNN top-1 next to the random-init trunk's and the asserted margin."""
    path = os.environ.get("SSL_TEST_CONVERGENCE_LOG")
    if not path or "PYTEST_XDIST_WORKER" in os.environ or not os.path.exists(path):
        return
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    os.unlink(path)
    if rows:
        terminalreporter.section("convergence (kNN top-1 on the 10,000 CIFAR-10 test images)")
        for row in sorted(rows, key=lambda r: r["method"]):
            terminalreporter.line(f"{row['method']:<16} {row['top1']:6.2f}  random init {row['random']:6.2f}  "
                                  f"gain {row['top1'] - row['random']:+5.2f}  asserted > {row['margin']:+.2f}  "
                                  f"threads {row['threads']}")


@pytest.fixture(scope="session")
def random_knn_top1(tmp_path_factory):
    """`knn_top1("random")`, computed once per `make test-convergence` run: under xdist the first worker to need
    it writes it beside the workers' temporary directories and the other reads it (each evaluation costs ~20 s of
    CPU)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process
        return knn_top1("random")
    shared = tmp_path_factory.getbasetemp().parent / "random_knn_top1.json"
    with open(shared.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits here while the first computes it
        if not shared.exists():
            shared.write_text(json.dumps(knn_top1("random")))
        return json.loads(shared.read_text())


@pytest.fixture(scope="session")
def simclr_checkpoint(tmp_path_factory):
    """A briefly trained SimCLR checkpoint (the SimCLR convergence recipe), trained once per session.

    For tests that need a network better than random init, e.g. ClusterFit's features to cluster.
    """
    out = tmp_path_factory.mktemp("simclr-trained")
    run_script("simclr.py", *SIMCLR_CONVERGENCE_FLAGS, "--output-dir", out, timeout=CONVERGENCE_TIMEOUT)
    from common import checkpoint
    return str(checkpoint.latest(out))



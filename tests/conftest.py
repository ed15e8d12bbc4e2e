import fcntl
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# Under pytest-xdist (`make test`, `make test-convergence`: two workers on 2 cores) every script runs on one thread:
# two processes with two OpenMP threads each on 2 cores spin-wait on each other (the suite's CPU time grew from 46
# to 60 min).
SCRIPT_THREADS = {"OMP_NUM_THREADS": "1"} if "PYTEST_XDIST_WORKER" in os.environ else {}


def script_env(env=None):
    """The environment the tests run scripts in: the repo on PYTHONPATH, one thread under xdist, then `env`."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **SCRIPT_THREADS, **(env or {})}


# a convergence run's pretraining takes 2-15 minutes on one core, depending on the machine's speed: its time limit
# only catches a hung run
CONVERGENCE_TIMEOUT = 3600


def run_script(*argv, env=None, check=True, timeout=900, **subprocess_options):
    """Run `python <script> args...` from the repo root; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=script_env(env), capture_output=True,
                          text=True, timeout=timeout, **subprocess_options)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc, *argv, timeout=600):
    """torchrun --nproc_per_node=nproc on CPU (gloo), from the repo root."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", *map(str, argv)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


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


def knn_top1(weights, *extra):
    """Weighted-kNN top-1 (k=20, T=0.07) of a ResNet-18 (ImageNet stem) on CIFAR-10's 10,000 test images (the
    embedded cifar10-test) with cifar10-mini's 4,000 training images as the bank; `extra` are further eval_knn.py
    flags.

    Used by every method's convergence test; `weights="random"` gives the seeded random-init baseline.
    """
    proc = run_script("eval_knn.py", "--weights", weights, "--arch", "resnet18", "--no-cifar-stem", "--image-size",
                      "32", "--train-data", "cifar10-mini", "--test-data", "cifar10-test", "--workers", "2",
                      "--seed", "0", *extra)
    return last_json(proc.stdout)["top1"]


def pretrain_knn_top1(output_dir, script, *flags, eval_flags=()):
    """Pretrain with `script flags... --output-dir output_dir`, then `knn_top1` of its last checkpoint."""
    run_script(script, *flags, "--output-dir", output_dir, timeout=CONVERGENCE_TIMEOUT)
    from common import checkpoint
    return knn_top1(str(checkpoint.latest(output_dir)), *eval_flags)


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


def assert_beats_random_init(method, top1, random_top1, margin):
    """A convergence test's verdict: kNN top-1 above the random-init trunk's by more than `margin` points."""
    print(f"{method} kNN top-1 {top1:.2f} vs random init {random_top1:.2f}")
    log = os.environ.get("SSL_TEST_CONVERGENCE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"method": method, "top1": top1, "random": random_top1, "margin": margin,
                                "threads": script_env().get("OMP_NUM_THREADS", "default")}) + "\n")
    assert top1 > random_top1 + margin, (top1, random_top1)


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


# the SimCLR convergence recipe (tests/test_convergence_instance.py): 8 epochs of cifar10-mini, ~100 s on 2 idle cores
SIMCLR_CONVERGENCE_FLAGS = ("--preset", "cifar", "--data", "cifar10-mini", "--no-cifar-stem", "--epochs", "8",
                            "--warmup-epochs", "1", "--batch-size", "256", "--lr", "2.0", "--temperature", "0.2",
                            "--workers", "2", "--print-every", "40")


@pytest.fixture(scope="session")
def simclr_checkpoint(tmp_path_factory):
    """A briefly trained SimCLR checkpoint (the SimCLR convergence recipe), trained once per session.

    For tests that need a network better than random init, e.g. ClusterFit's features to cluster.
    """
    out = tmp_path_factory.mktemp("simclr-trained")
    run_script("simclr.py", *SIMCLR_CONVERGENCE_FLAGS, "--output-dir", out, timeout=CONVERGENCE_TIMEOUT)
    from common import checkpoint
    return str(checkpoint.latest(out))


def swav_sinkhorn(scores, epsilon, n_iters):
    """SwAV's published Sinkhorn-Knopp (Caron et al. 2020, Alg. 1), single process, no stabilisation."""
    q = torch.exp(scores / epsilon).t()
    q /= q.sum()
    k, b = q.shape
    for _ in range(n_iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    return (q * b).t()

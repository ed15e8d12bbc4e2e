"""What the tests share: running scripts and torchrun, reading their output, the convergence verdict, and
float64 references used by more than one test file. Tests import from here (`from tests.helpers import ...`);
tests/conftest.py holds only pytest's fixtures and hooks."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

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


# eval_knn.py flags that score a trunk with BatchNorm statistics re-estimated on the 4,000 bank images
PRECISE_BN = ("--precise-bn", "4000")


def pretrain_knn_top1(output_dir, script, *flags, eval_flags=()):
    """Pretrain with `script flags... --output-dir output_dir`, then `knn_top1` of its last checkpoint."""
    run_script(script, *flags, "--output-dir", output_dir, timeout=CONVERGENCE_TIMEOUT)
    from common import checkpoint
    return knn_top1(str(checkpoint.latest(output_dir)), *eval_flags)


def assert_beats_random_init(method, top1, random_top1, margin):
    """A convergence test's verdict: kNN top-1 above the random-init trunk's by more than `margin` points."""
    print(f"{method} kNN top-1 {top1:.2f} vs random init {random_top1:.2f}")
    log = os.environ.get("SSL_TEST_CONVERGENCE_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"method": method, "top1": top1, "random": random_top1, "margin": margin,
                                "threads": script_env().get("OMP_NUM_THREADS", "default")}) + "\n")
    assert top1 > random_top1 + margin, (top1, random_top1)


# the SimCLR convergence recipe (tests/test_convergence_instance.py): 8 epochs of cifar10-mini, ~100 s on 2 idle cores
SIMCLR_CONVERGENCE_FLAGS = ("--preset", "cpu", "--print-every", "40")


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


# NPID's noise-contrastive estimation, one term at a time (tests/test_npid.py, tests/test_pirl.py)
def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=1)


EPS = 2.0 ** -23  # float32's eps, which VISSL's NCECriterion adds to both denominators


def naive_nce(v, positives, noise, z, temperature, n_data):
    """Wu et al. 2018 Eq. 2-4, one sample and one noise draw at a time, float64."""
    m = len(noise)
    total = 0.0
    for i in range(len(v)):
        def p(memory_entry):  # Eq. 2: P(i|v), with Pn = 1/n below
            return math.exp(float(v[i] @ memory_entry) / temperature) / z
        # Eq. 3: P(D=1 | i, v) = P / (P + m Pn + eps), P(D=0 | j, v) = m Pn / (P + m Pn + eps)
        total -= math.log(p(positives[i]) / (p(positives[i]) + m / n_data + EPS))
        total -= sum(math.log((m / n_data) / (p(noise[j]) + m / n_data + EPS)) for j in range(m))
    return total / len(v)


# the data of tests/test_ops_distributed.py and its torchrun worker
# rows held by rank 0 and rank 1 (uneven on purpose, except SimCLR's equal per-rank batches)
SPLIT = {"scores": [0, 23, 61], "x": [0, 400, 1037], "z": [0, 37, 74]}  # SimCLR: equal batches


def global_data():
    g = torch.Generator().manual_seed(1234)
    centers = torch.randn(9, 6, generator=g) * 3
    x = centers[torch.randint(0, 9, (1037,), generator=g)] + torch.randn(1037, 6, generator=g)
    n = 74
    z = F.normalize(torch.randn(n, 16, generator=g), dim=1)
    pos = torch.randint(0, n, (n,), generator=g)
    self_index = (pos + 1 + torch.randint(0, n - 1, (n,), generator=g)) % n
    return {
        "scores": F.normalize(torch.randn(61, 29, generator=g), dim=1),
        "x": x, "z": z, "pos": pos, "self": self_index,
    }


# tiny flags of moco.py and pirl.py (tests/test_moco.py, tests/test_pirl.py, tests/test_gpu_aug_scripts.py)
MOCO_SMALL = ["--data", "cifar10-mini", "--data-fraction", "0.03", "--arch", "resnet18", "--image-size", "32",
              "--batch-size", "16", "--hidden-dim", "64", "--embedding-dim", "32", "--queue-size", "64",
              "--shuffle-bn-splits", "2", "--blur-p", "0", "--workers", "0", "--epochs", "2", "--print-every", "1"]

PIRL_SMALL = ["--data", "cifar10-mini", "--data-fraction", "0.02", "--arch", "resnet18", "--image-size", "32",
              "--patch-crop-size", "48", "--patch-size", "14", "--batch-size", "16", "--num-negatives", "64",
              "--workers", "0", "--epochs", "2", "--print-every", "1"]

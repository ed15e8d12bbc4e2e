"""A short CPU SwAV run must lift weighted-kNN accuracy on CIFAR-10 test above a random-init trunk.

Budget: 8 epochs over cifar10-mini's 4,000 training images (248 steps of 128 images x 2 crops of
32 px, ResNet-18 with the ImageNet stem), about 100-200 s on 2 idle cores. Recipe: --preset cifar
with 2x32 crops only, 100 prototypes (frozen for the first epoch), no queue, lr 1.0 per 256 images
after a half-epoch warmup, SimCLR's optimiser groups (--exclude-bias-and-norm), and --epsilon 0.01:
at the VISSL default 0.05 the Sinkhorn codes of a fresh network stay near uniform (mean largest
code 0.03 of 1 after 30 steps) and the run ended at 30.13, below random init; 0.03 gave 31.65,
0.02 33.20 (the swav.py docstring quotes the paper on a high epsilon's trivial solution).

Measured when this test was written (kNN k=20, T=0.07, cifar10-mini train as the bank, the 10,000
CIFAR-10 test images): 34.06 (seed 0) and 33.09 (seed 1) vs random init 31.77, i.e. +2.3 and +1.3
points. The assertion asks for +0.5 points, below both.
"""
import pytest

from common import checkpoint
from tests.conftest import knn_top1, run_script

MARGIN = 0.5


@pytest.mark.convergence
def test_swav_beats_random_init(tmp_path, random_knn_top1):
    run_script("swav.py", "--preset", "cifar", "--data", "cifar10-mini", "--no-cifar-stem", "--crops", "2x32",
               "--batch-size", "128", "--epochs", "8", "--warmup-epochs", "0.5", "--lr", "1.0", "--n-prototypes", "100",
               "--queue-length", "0", "--exclude-bias-and-norm", "--epsilon", "0.01", "--workers", "2",
               "--print-every", "40", "--output-dir", tmp_path)
    top1 = knn_top1(str(checkpoint.latest(tmp_path)))
    print(f"swav kNN top-1 {top1:.2f} vs random init {random_knn_top1:.2f}")
    assert top1 > random_knn_top1 + MARGIN, (top1, random_knn_top1)

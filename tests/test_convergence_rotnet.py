"""A short CPU RotNet run must lift weighted-kNN accuracy on CIFAR-10 test above a random-init trunk.

Budget: 4 epochs over cifar10-mini's 4,000 training images, 500 steps of 32 images x 4 rotations
(64,000 32-px views, ResNet-18 with the ImageNet stem), about 100 s on 2 idle cores. The learning
rate matters most: VISSL's 0.1 per 256 images (0.0125 at 32) decayed by a cosine over the run
learns the rotations (~60 % accuracy at the end) and gave 34.54; 8x that, 0.1 at 64 images x 4,
destabilises the trunk (rotation accuracy ~50 %, kNN 25.26, below random init). Measured when this
test was written (kNN k=20, T=0.07, cifar10-mini train as the bank, the 10,000 CIFAR-10 test images):
34.54 (seed 0) and 33.65 (seed 1) vs random init 31.77, i.e. +2.8 and +1.9 points. The assertion asks
for +1 point, below both (CPU runs are deterministic per seed; the test runs seed 0 and got 34.54 again
through pytest). Wall time on the shared 2-core machine: 2 min 43 s.
"""
import pytest

from common import checkpoint
from tests.conftest import knn_top1, run_script

MARGIN = 1.0


@pytest.mark.convergence
def test_rotnet_beats_random_init(tmp_path, random_knn_top1):
    run_script("rotnet.py", "--preset", "cifar", "--data", "cifar10-mini", "--no-cifar-stem", "--epochs", "4",
               "--batch-size", "32", "--lr", "0.1", "--lr-schedule", "cosine", "--workers", "2",
               "--print-every", "100", "--output-dir", tmp_path)
    top1 = knn_top1(str(checkpoint.latest(tmp_path)))
    print(f"rotnet kNN top-1 {top1:.2f} vs random init {random_knn_top1:.2f}")
    assert top1 > random_knn_top1 + MARGIN, (top1, random_knn_top1)

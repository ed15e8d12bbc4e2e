"""A short CPU DeepCluster-v2 run must lift weighted-kNN accuracy on CIFAR-10 test above a random-init trunk.

Budget: 28 epochs over a quarter of cifar10-mini (--data-fraction 0.25: 1,000 training images, 100 per
class), 196 steps of 128 images x 2 crops of 32 px (ResNet-18 with the ImageNet stem), 50,000 training
views plus 28 forward passes over the 1,000 images for the memory bank, roughly 100 s on 2 idle cores.
Recipe: --preset cifar with 2x32 crops only (no 16-px crops, whose passes would also feed BatchNorm's
running statistics), 3 clusterings of 30 centroids, lr 1.0 per 256 images (0.5 at batch 128) after a
half-epoch warmup, and SimCLR's optimiser groups (--exclude-bias-and-norm: biases and BN get plain SGD
without decay); with LARC on every parameter (the swav repository's default) the whole set for 7 epochs
measured 30.64 %.

Why a quarter of the images for four times the epochs: the k-means of every epoch clusters the memory
bank of the previous one, so a smaller set gives targets from a fresher network for the same compute
(NPID's convergence test shows the same for its bank). The kNN bank is still all 4,000 images.

Measured when this test was written (kNN k=20, T=0.07, cifar10-mini train as the bank, the 10,000
CIFAR-10 test images): 33.66 (seed 0) and 33.41 (seed 1) vs random init 31.77, +1.9 and +1.6 points.
The same compute on the whole set (7 epochs, 3 x 100 centroids) gave 32.75 / 32.83, with 3 x 30
centroids 33.07; an eighth of the set for 56 epochs 31.93. The random-init baseline is flattering:
its BatchNorm layers keep their initial running statistics, and the same trunk after 25 steps at
lr 0 (BatchNorm statistics of augmented training crops, weights untouched) scores 27.9 %. The
assertion asks for +0.5 points, about one point below both measurements.
"""
import pytest

from common import checkpoint
from tests.conftest import knn_top1, run_script

MARGIN = 0.5


@pytest.mark.convergence
def test_deepcluster_v2_beats_random_init(tmp_path, random_knn_top1):
    run_script("deepcluster_v2.py", "--preset", "cifar", "--data", "cifar10-mini", "--no-cifar-stem", "--crops", "2x32",
               "--data-fraction", "0.25", "--batch-size", "128", "--epochs", "28", "--warmup-epochs", "0.5",
               "--lr", "1.0", "--num-clusters", "30", "30", "30", "--exclude-bias-and-norm", "--workers", "2",
               "--print-every", "40", "--output-dir", tmp_path)
    top1 = knn_top1(str(checkpoint.latest(tmp_path)))
    print(f"deepcluster_v2 kNN top-1 {top1:.2f} vs random init {random_knn_top1:.2f}")
    assert top1 > random_knn_top1 + MARGIN, (top1, random_knn_top1)

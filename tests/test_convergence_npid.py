"""A short CPU NPID run must lift weighted-kNN accuracy on CIFAR-10 test above a random-init trunk.

Budget: 100 epochs over an eighth of cifar10-mini (--data-fraction 0.125: 500 training images, 50 per
class), 300 steps of 128 images (38,400 32-px views, ResNet-18 with the ImageNet stem), about 100 s on
2 idle cores. Recipe: --preset cifar (128-d embeddings, memory momentum 0.5, T = 0.07) with InfoNCE
over 256 noise entries of the bank (--loss-type cross_entropy; NCE's Z estimate is the paper's default),
lr 0.03 per 256 images with a cosine schedule.

Why a small subset for many epochs: a memory-bank entry is refreshed once per epoch, so with 4,000
images the positive m_I is 31 steps stale while the noise entries are fresh, and at the CPU budget
the loss never left chance level. With 500 images the bank is 3 steps old and instance discrimination
learns (loss ln 257 = 5.55 -> ~3.3). The kNN bank is still all 4,000 training images.

Measured when this test was written (kNN k=20, T=0.07, cifar10-mini train as the bank, the 10,000
CIFAR-10 test images): 35.87 (seed 0) and 35.36 (seed 1) vs random init 31.77, i.e. +4.1 and +3.6
points; the whole set (--data-fraction 0.5 for 28 epochs, 1024 negatives) gave only 33.62 / 32.11.
The assertion asks for +2 points, below both.
"""
import pytest

from common import checkpoint
from tests.conftest import knn_top1, run_script

MARGIN = 2.0


@pytest.mark.convergence
def test_npid_beats_random_init(tmp_path, random_knn_top1):
    run_script("npid.py", "--preset", "cifar", "--data", "cifar10-mini", "--no-cifar-stem", "--data-fraction", "0.125",
               "--epochs", "100", "--batch-size", "128", "--lr", "0.03", "--lr-schedule", "cosine",
               "--loss-type", "cross_entropy", "--num-negatives", "256", "--workers", "2", "--print-every", "50",
               "--output-dir", tmp_path)
    top1 = knn_top1(str(checkpoint.latest(tmp_path)))
    print(f"npid kNN top-1 {top1:.2f} vs random init {random_knn_top1:.2f}")
    assert top1 > random_knn_top1 + MARGIN, (top1, random_knn_top1)

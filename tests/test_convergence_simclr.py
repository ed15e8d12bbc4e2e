"""A short CPU SimCLR run must lift weighted-kNN accuracy on CIFAR-10 test well above a random-init trunk.

Budget: 8 epochs over cifar10-mini's 4,000 training images (120 steps of 256 images x 2 views,
ResNet-18 with the ImageNet stem at 32 px), about 100 s on 2 idle cores. Measured when this test was
written (kNN k=20, T=0.07, cifar10-mini train as the bank, the 10,000 CIFAR-10 test images):
SimCLR 38.85 % vs random init 31.77 % (+7.1 points; +7.2 in a second run with the batched
augmentations). The assertion asks for +3 points, well below that, so seeds and machines do not flake.
"""
import pytest

from common import checkpoint
from tests.conftest import knn_top1, run_script

MARGIN = 3.0


@pytest.mark.convergence
def test_simclr_beats_random_init(tmp_path, random_knn_top1):
    run_script("simclr.py", "--preset", "cifar", "--data", "cifar10-mini", "--no-cifar-stem", "--epochs", "8",
               "--warmup-epochs", "1", "--batch-size", "256", "--lr", "2.0", "--temperature", "0.2",
               "--workers", "2", "--print-every", "40", "--output-dir", tmp_path)
    top1 = knn_top1(str(checkpoint.latest(tmp_path)))
    print(f"simclr kNN top-1 {top1:.2f} vs random init {random_knn_top1:.2f}")
    assert top1 > random_knn_top1 + MARGIN, (top1, random_knn_top1)

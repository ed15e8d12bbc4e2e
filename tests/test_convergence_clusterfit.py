"""ClusterFit on a briefly trained SimCLR network must give a fresh trunk better kNN accuracy than random init.

The paper's protocol (Yan et al. 2020, Fig. 2): cluster the pooled features of a pretrained network
N_pre over the training images, then train a fresh trunk N_cf to predict the clusters. N_pre is the
`simclr_checkpoint` fixture (the SimCLR convergence recipe, trained once per session; its own kNN
top-1 is ~38.9).

Budget of the fresh trunk: 14 epochs over cifar10-mini's 4,000 training images (210 steps of 256
images, 56,000 32-px views, ResNet-18 with the ImageNet stem), about 90 s on 2 idle cores, plus
feature extraction and k-means (seconds). 30 clusters, not the preset's 100: with 4,000 images and a
weak teacher (100 clusters are 37 % pure w.r.t. the CIFAR classes) the coarser pseudo-labels gave the
better student (100 clusters, lr 0.4: 33.22). Measured when this test was written (kNN k=20, T=0.07,
cifar10-mini train as the bank, the 10,000 CIFAR-10 test images): 34.96 (seed 0) and 34.36 (seed 1)
vs random init 31.77, i.e. +3.2 and +2.6 points (seed 0 again through pytest: 34.96, the run is
deterministic on CPU). The assertion asks for +1 point, below both. Wall time on the shared 2-core
machine: 6 min, half of it the session's SimCLR fixture.
"""
import pytest

from common import checkpoint
from tests.conftest import knn_top1, run_script

MARGIN = 1.0
RECIPE = ("--preset", "cifar", "--num-clusters", "30", "--batch-size", "256", "--lr", "0.2", "--warmup-epochs", "1",
          "--epochs", "14")


@pytest.mark.convergence
def test_clusterfit_beats_random_init(tmp_path, simclr_checkpoint, random_knn_top1):
    run_script("clusterfit.py", "--weights", simclr_checkpoint, *RECIPE, "--data", "cifar10-mini", "--no-cifar-stem",
               "--workers", "2", "--print-every", "50", "--output-dir", tmp_path)
    top1 = knn_top1(str(checkpoint.latest(tmp_path)))
    print(f"clusterfit kNN top-1 {top1:.2f} vs random init {random_knn_top1:.2f}")
    assert top1 > random_knn_top1 + MARGIN, (top1, random_knn_top1)

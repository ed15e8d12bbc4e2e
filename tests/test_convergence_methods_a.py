"""Short CPU runs of MoCo v2, SwAV and DeepCluster-v2 must lift weighted-kNN accuracy on CIFAR-10 test
above a random-init trunk.

Each pretrains on cifar10-mini's 4,000 training images with ResNet-18 (ImageNet stem, 32 px), batch 256,
then `knn_top1` (k=20, T=0.07, cifar10-mini train as the bank) is compared with the seeded random-init
trunk. Budgets, in 32-px view passes (forward + backward) at about 600 per second on 2 idle cores,
about 90 s each:
  - moco: 8 epochs (120 steps), 1 query view with gradient + 1 key view forward only (~43k passes);
    queue 1024 (with 4,000 images a 4096 queue would hold mostly stale copies of the positives),
    otherwise the cifar preset (m=0.99, T=0.1), lr 0.06 per 256;
  - swav: 6 epochs (90 steps), crops 2x32 (~48k passes), 100 prototypes frozen for the first epoch,
    no queue, warmup 1 epoch;
  - deepcluster_v2: 6 epochs (90 steps), crops 2x32, 3 x 100 clusters (3000 centroids for 4,000 images
    would be near-singletons), plus the initial memory-bank pass (4k forward passes).

NOT YET CALIBRATED: on the shared, loaded cores of the session that wrote this (5-15 img/s instead of
~300), these budgets could not be run before its deadline. The shorter runs it could measure (on
cifar10-mini's 1,000 test images; random init 32.9 % top-1) were all BELOW random init:
moco 2 epochs x batch 128: 26.9; swav 1 epoch x batch 128: 28.2; deepcluster_v2 2 epochs on half
the data x batch 64: 29.2. Early SSL training first destroys the (surprisingly good, 33 %) random
features before it improves on them; whether these budgets get past that point is unmeasured, so
MARGIN is a placeholder to be set clearly below the first measured gain (see the report of issue 4).
"""
import pytest

from common import checkpoint
from tests.conftest import knn_top1, run_script

COMMON = ["--preset", "cifar", "--data", "cifar10-mini", "--no-cifar-stem", "--batch-size", "256", "--workers", "2",
          "--print-every", "15"]
RUNS = {
    "moco": ["--epochs", "8", "--lr", "0.06", "--queue-size", "1024"],
    "swav": ["--epochs", "6", "--warmup-epochs", "1", "--crops", "2x32", "--n-prototypes", "100", "--queue-length", "0"],
    "deepcluster_v2": ["--epochs", "6", "--warmup-epochs", "1", "--crops", "2x32", "--num-clusters", "100", "100",
                       "100"],
}
MEASURED = {"moco": None, "swav": None, "deepcluster_v2": None}  # kNN top-1 (%) at these budgets: not yet run
MARGIN = {"moco": 2.0, "swav": 2.0, "deepcluster_v2": 2.0}


@pytest.mark.convergence
@pytest.mark.parametrize("method", sorted(RUNS))
def test_method_beats_random_init(method, tmp_path, random_knn_top1):
    run_script(f"{method}.py", *COMMON, *RUNS[method], "--output-dir", tmp_path)
    top1 = knn_top1(str(checkpoint.latest(tmp_path)))
    print(f"{method} kNN top-1 {top1:.2f} vs random init {random_knn_top1:.2f}")
    assert top1 > random_knn_top1 + MARGIN[method], (method, top1, random_knn_top1)

"""CPU convergence tests, clustering and pretext methods: a short pretraining run must lift weighted-kNN
accuracy on CIFAR-10 test above a random-init trunk by a stated margin.

Every run pretrains a ResNet-18 (ImageNet stem, 32 px) on cifar10-mini (or a stated fraction of it);
`knn_top1` (conftest) then measures weighted kNN (k=20, T=0.07) on the 10,000 CIFAR-10 test images
(the embedded cifar10-test, the same on every machine) with cifar10-mini's 4,000 training images
as the bank. The seeded random-init trunk's score under the same evaluation (31.77 on the full test
split) is the session fixture `random_knn_top1`. Each test's docstring gives its budget, how the recipe
was found and the accuracies measured when it was written; the margins sit below every measurement.

SwAV, DeepCluster-v2, RotNet and Jigsaw (RotNet and Jigsaw scored at res4, both trunks with precise BN); SimCLR,
MoCo v2, NPID, PIRL and ClusterFit are in tests/test_convergence_instance.py (two files of similar length
for the two xdist workers of `make test-convergence`), MoCo v3 and Barlow Twins in tests/test_convergence_recent.py.
"""
import pytest

from tests.helpers import assert_beats_random_init, knn_top1, pretrain_knn_top1


SWAV_MARGIN = 1.0


@pytest.mark.convergence
def test_swav_beats_random_init(tmp_path, random_knn_top1):
    """A short CPU SwAV run must lift weighted-kNN accuracy on CIFAR-10 test above a random-init trunk.

    Budget: 12 epochs over cifar10-mini's 4,000 training images (372 steps of 128 images x 2 crops of
    32 px, ResNet-18 with the ImageNet stem), about 4 min single-threaded. Recipe (`--preset cpu`): --preset cifar
    with 2x32 crops only, 100 prototypes (frozen for the first epoch), no queue, lr 1.0 per 256 images
    after a half-epoch warmup, SimCLR's optimiser groups (--exclude-bias-and-norm), and --epsilon 0.01:
    at the VISSL default 0.05 the Sinkhorn codes of a fresh network stay near uniform (mean largest
    code 0.03 of 1 after 30 steps) and the run ended at 30.13, below random init; 0.03 gave 31.65,
    0.02 33.20 (the swav.py docstring quotes the paper on a high epsilon's trivial solution).

    Why 12 epochs: 8 gave 34.06 / 33.09 (seeds 0 / 1, two threads), but only 32.05 in a CI run, once the
    Sinkhorn kernel's shift multiplied by 1/eps instead of dividing (one rounding in the codes, in effect
    another seed): too close to the margin. Measured when this test was written (kNN k=20, T=0.07,
    cifar10-mini train as the bank, the 10,000 CIFAR-10 test images, one thread per run as under
    `make test-convergence`): 34.49, 34.86, 34.64 and 34.29 (seeds 0-3) vs random init 31.77, +2.5 to +3.1 points;
    re-measured once both data paths were built from the one view recipe: 34.96 / 33.76 (seeds 0 / 1), +3.2 / +2.0;
    with two threads per run, 34.59 / 33.12 (seeds 0 / 1), +2.8 / +1.35. The assertion asks for +1 point, below
    every measurement.
    """
    top1 = pretrain_knn_top1(tmp_path, "swav.py", "--preset", "cpu", "--print-every", "40")
    assert_beats_random_init("swav", top1, random_knn_top1, SWAV_MARGIN)


DEEPCLUSTER_V2_MARGIN = 0.3


@pytest.mark.convergence
def test_deepcluster_v2_beats_random_init(tmp_path, random_knn_top1):
    """A short CPU DeepCluster-v2 run must lift weighted-kNN accuracy on CIFAR-10 test above a random-init trunk.

    Budget: 28 epochs over a quarter of cifar10-mini (--data-fraction 0.25: 1,000 training images, 100 per
    class), 196 steps of 128 images x 2 crops of 32 px (ResNet-18 with the ImageNet stem), 50,000 training
    views plus one forward pass over the 1,000 images' two bank crops before training and 28 k-means
    clusterings, roughly 100 s on 2 idle cores (13 min single-threaded on a busy shared machine).
    Recipe (`--preset cpu`): --preset cifar with 2x32 crops only (no 16-px crops, whose passes would also feed BatchNorm's
    running statistics), 3 clusterings of 30 centroids, lr 1.0 per 256 images (0.5 at batch 128) after a
    half-epoch warmup, and SimCLR's optimiser groups (--exclude-bias-and-norm: biases and BN get plain SGD
    without decay); with LARC on every parameter (the swav repository's default) the whole set for 7 epochs
    measured 30.64 %.

    Why a quarter of the images for four times the epochs: the k-means of every epoch clusters the memory
    bank of the previous one, so a smaller set gives targets from a fresher network for the same compute
    (NPID's convergence test shows the same for its bank). The kNN bank is still all 4,000 images.

    Measured with the default memory banks, crops 0 and 1 (heads 0 and 2 cluster crop 0's bank, head 1
    crop 1's; kNN k=20, T=0.07, cifar10-mini train as the bank, the 10,000 CIFAR-10 test images, one
    thread): 33.89 (seed 0) and 32.63 (seed 1) vs random init 31.77, +2.1 and +0.9 points. With the
    bank of crop 0 alone (all three heads clustering it) the recipe gave 33.66 / 33.41. The same compute
    on the whole set (7 epochs, 3 x 100 centroids, crop 0's bank) gave 32.75 / 32.83, with 3 x 30
    centroids 33.07; an eighth of the set for 56 epochs 31.93. The random-init baseline is flattering:
    its BatchNorm layers keep their initial running statistics, and the same trunk after 25 steps at
    lr 0 (BatchNorm statistics of augmented training crops, weights untouched) scores 27.9 %.
    Re-measured once both data paths were built from the one view recipe (one thread per run): 32.43 / 33.15
    (seeds 0 / 1), +0.66 / +1.38; with two threads per run, 33.51 / 32.27 (seeds 0 / 1), +1.74 / +0.50.
    The assertion asks for +0.3 points, below every measurement: a thin margin (a 10,000-image accuracy has a
    standard error of about 0.5 points), which still fails a run whose weights do not learn: with only its BatchNorm
    statistics trained (lr 0, above) the trunk scores 27.9, below the random-init baseline.
    """
    top1 = pretrain_knn_top1(tmp_path, "deepcluster_v2.py", "--preset", "cpu", "--print-every", "40")
    assert_beats_random_init("deepcluster_v2", top1, random_knn_top1, DEEPCLUSTER_V2_MARGIN)


ROTNET_MARGIN = 1.5
RES4_WITH_PRECISE_BN = ("--layers", "res4", "--precise-bn", "4000")


@pytest.mark.convergence
def test_rotnet_beats_random_init_at_res4(tmp_path):
    """A short CPU RotNet run must lift weighted-kNN accuracy of res4 features above a random-init trunk's.

    Budget: 4 epochs over cifar10-mini's 4,000 training images, 500 steps of 32 images x 4 rotations
    (64,000 32-px views, ResNet-18 with the ImageNet stem), about 100 s on 2 idle cores. The learning
    rate matters most: VISSL's 0.1 per 256 images (0.0125 at 32) decayed by a cosine over the run
    learns the rotations (~60 % accuracy at the end) and gave 34.54; 8x that, 0.1 at 64 images x 4,
    destabilises the trunk (rotation accuracy ~50 %, kNN 25.26, below random init). Measured when this
    test was written (kNN k=20, T=0.07, cifar10-mini train as the bank, the 10,000 CIFAR-10 test images):
    34.54 (seed 0) and 33.65 (seed 1) vs random init 31.77, i.e. +2.8 and +1.9 points. Re-measured
    with both data paths built from the one view recipe, after the rotations' per-step draws moved to
    the run's seeded generator (one thread per run, as under `make test-convergence`): 33.16 / 33.20 (seeds 0 / 1), +1.4 / +1.4.

    Why res4 with precise BN, for both trunks: the pooled res5 feature did not hold its margin with two threads
    per run (a plain `pytest` on 2 cores): 31.92 at seed 0, +0.15. The last block specialises in the rotation
    task (Gidaris et al. 2018 find RotNet's best features in the middle blocks), and the trunk's BatchNorm
    statistics are those of rotated images. At res4 with statistics re-estimated on the bank images
    (eval_knn.py --precise-bn 4000), the same checkpoints score 34.41 / 35.38 (seeds 0 / 1, one thread) and
    34.01 / 34.74 (two threads) against 31.16 for random init under the same evaluation: +2.9 to +4.2 points
    (res3 gains less over its random init, 33.86). The assertion asks for +1.5 points, below every measurement
    (CPU runs are deterministic per seed and thread count; the test runs seed 0).
    """
    top1 = pretrain_knn_top1(tmp_path, "rotnet.py", "--preset", "cpu", "--print-every", "100",
                             eval_flags=RES4_WITH_PRECISE_BN)
    random_top1 = knn_top1("random", *RES4_WITH_PRECISE_BN)
    assert_beats_random_init("rotnet", top1, random_top1, ROTNET_MARGIN)


JIGSAW_MARGIN = 1.5


@pytest.mark.convergence
def test_jigsaw_beats_random_init_at_res4(tmp_path):
    """A short CPU Jigsaw run must lift weighted-kNN accuracy of res4 features above a random-init trunk's.

    Budget: 6 epochs over cifar10-mini's 4,000 training images, 186 steps of 128 puzzles, each nine 16-px tiles
    cut from a 54-px resize (ResNet-18 with the ImageNet stem), about 3 min single-threaded. Recipe (`--preset cpu`): --preset
    cifar (100 permutations, grayscale p 0.66, cosine), lr 0.025 per 256 puzzles after a half-epoch warmup. The loss
    falls from ln 100 = 4.6 to about 1.9.

    Why res4 with precise BN, for both trunks: the trunk only ever sees 16-px tiles, so its BatchNorm running
    statistics do not fit 32-px images (eval_knn.py --precise-bn 4000 re-estimates them on the training
    images), and its last block specialises in the pretext task (Goyal et al. 2019 find Jigsaw's best
    ResNet-50 features at res4). Pooled features gain less and vary more: +0.4 to +2.4 points over seeds and
    thread counts at 3 epochs, 29.43 / 29.95 at 6 epochs vs random 27.79, all with precise BN.

    Measured when this test was written (kNN k=20, T=0.07, cifar10-mini train as the bank, the 10,000
    CIFAR-10 test images, res4 with precise BN): 33.49, 34.29, 34.46 and 34.38 (seeds 0-3, one thread per
    run as under `make test-convergence`), 33.93 and 34.73 (seeds 0 / 1, two threads), vs random init 31.16 under the
    same evaluation: +2.3 to +3.6 points; re-measured once the tiles were cut per batch on both data paths
    (one thread per run): 33.62 / 35.07 (seeds 0 / 1), +2.5 / +3.9, and with two threads 34.17 / 33.66 (seeds 0 / 1),
    +3.0 / +2.5.
    The assertion asks for +1.5 points, below
    every measurement; the test runs seed 0.
    """
    top1 = pretrain_knn_top1(tmp_path, "jigsaw.py", "--preset", "cpu", "--print-every", "40",
                             eval_flags=RES4_WITH_PRECISE_BN)
    random_top1 = knn_top1("random", *RES4_WITH_PRECISE_BN)
    assert_beats_random_init("jigsaw", top1, random_top1, JIGSAW_MARGIN)

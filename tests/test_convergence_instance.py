"""CPU convergence tests, instance discrimination: a short pretraining run must lift weighted-kNN accuracy
on CIFAR-10 test above a random-init trunk by a stated margin.

Every run pretrains a ResNet-18 (ImageNet stem, 32 px) on cifar10-mini (or a stated fraction of it);
`knn_top1` (conftest) then measures weighted kNN (k=20, T=0.07) on the 10,000 CIFAR-10 test images
(the embedded cifar10-test, the same on every machine) with cifar10-mini's 4,000 training images
as the bank. The seeded random-init trunk's score under the same evaluation (31.77 on the full test
split) is the session fixture `random_knn_top1`; PIRL is scored, with its own random-init baseline, after
re-estimating BatchNorm statistics (its test says why). Each test's docstring gives its budget, how the recipe
was found and the accuracies measured when it was written; the margins sit below every measurement.

SimCLR, MoCo v2, NPID and PIRL (instance discrimination) and ClusterFit, which clusters the session's
trained SimCLR; eval_suite.py must tell that SimCLR trunk from a random-init one on a synthetic suite.
`make test-convergence` runs pytest-xdist with `--dist loadfile`: the convergence runs are split over
two files of similar length (tests/test_convergence_cluster_pretext.py has SwAV, DeepCluster-v2, RotNet
and Jigsaw) and a shorter third (tests/test_convergence_recent.py: MoCo v3, Barlow Twins and VICReg).
"""
import json

import pytest

from tests import suite_data
from tests.helpers import PRECISE_BN, assert_beats_random_init, knn_top1, pretrain_knn_top1, run_script


SIMCLR_MARGIN = 3.0


@pytest.mark.convergence
def test_simclr_beats_random_init(simclr_checkpoint, random_knn_top1):
    """A short CPU SimCLR run must lift weighted-kNN accuracy on CIFAR-10 test well above a random-init trunk.

    Budget: 8 epochs over cifar10-mini's 4,000 training images (120 steps of 256 images x 2 views,
    ResNet-18 with the ImageNet stem at 32 px), about 100 s on 2 idle cores. Measured when this test was
    written (kNN k=20, T=0.07, cifar10-mini train as the bank, the 10,000 CIFAR-10 test images):
    SimCLR 38.85 % vs random init 31.77 % (+7.1 points; +7.2 in a second run with the batched
    augmentations). Re-measured once both data paths were built from the one view recipe (new random
    draws; one thread per run, as under `make test-convergence`): 39.23 / 40.71 (seeds 0 / 1), +7.5 / +8.9;
    with two threads per run, 39.68 / 39.16 (seeds 0 / 1), +7.9 / +7.4. The assertion asks for +3 points,
    well below that, so seeds and machines do not flake.
    """
    # the session fixture trains exactly this recipe (SIMCLR_CONVERGENCE_FLAGS: `--preset cpu`); ClusterFit reuses it
    top1 = knn_top1(simclr_checkpoint)
    assert_beats_random_init("simclr", top1, random_knn_top1, SIMCLR_MARGIN)


MOCO_MARGIN = 0.5


@pytest.mark.convergence
def test_moco_beats_random_init(tmp_path, random_knn_top1):
    """A short CPU MoCo v2 run must lift weighted-kNN accuracy on CIFAR-10 test above a random-init trunk.

    Budget: 16 epochs over cifar10-mini's 4,000 training images (240 steps of 256 images x 2 views,
    ResNet-18 with the ImageNet stem at 32 px), about 145 s on 2 idle cores. Recipe (`--preset cpu`): --preset cifar
    (head 512-512-128, T=0.1, m=0.99, wd 5e-4, cosine) with a queue of 1,024 keys (4 batches; the
    queue must stay below the 4,000 images) and lr 0.06 per 256 images; the default 8 Shuffling-BN
    chunks of 32 for both encoders.

    Two properties of moco.py decided whether this budget learns at all (kNN below random init before): the
    queue starts empty (--queue-init empty) rather than with the official code's K random unit vectors (against
    those the head sent every query to one direction within the first epoch: mean cosine between queries 0.999
    at step 15, 0.998 at step 90, loss flat at ln(K + 1), kNN 27.95 at step 135 of 240, seed 0), and the query
    encoder runs in the same BatchNorm chunks as the key encoder. lr 0.3 (25.6) and m = 0.9 (24.9) were worse.

    Measured when this test was written (kNN k=20, T=0.07, cifar10-mini train as the bank, the 10,000
    CIFAR-10 test images), with bicubic crops: 33.78 (seed 0) and 33.84 (seed 1) vs random init 31.77, i.e.
    +2.0 and +2.1 points (the chunks encoded one after another instead of SplitBatchNorm2d's one pass: 34.50 /
    33.77; 8 epochs: 31.70). The crops are now bilinear, as in main_moco.py; re-measured with bilinear crops
    and both data paths built from the one view recipe (one thread per run, as under `make test-convergence`):
    33.65 / 33.31 (seeds 0 / 1), +1.9 / +1.5; with two threads per run, 34.24 / 32.56 (seeds 0 / 1), +2.5 / +0.8.
    The assertion asks for +0.5 points, below every measurement: MoCo's short run learns the least of the
    contrastive methods here, and its seed-to-seed spread (1.7 points) is the widest.
    """
    top1 = pretrain_knn_top1(tmp_path, "moco.py", "--preset", "cpu", "--print-every", "40")
    assert_beats_random_init("moco", top1, random_knn_top1, MOCO_MARGIN)


NPID_MARGIN = 1.5


@pytest.mark.convergence
def test_npid_beats_random_init(tmp_path, random_knn_top1):
    """A short CPU NPID run must lift weighted-kNN accuracy on CIFAR-10 test above a random-init trunk.

    Budget: 100 epochs over an eighth of cifar10-mini (--data-fraction 0.125: 500 training images, 50 per
    class), 300 steps of 128 images (38,400 32-px views, ResNet-18 with the ImageNet stem), about 100 s on
    2 idle cores. Recipe (`--preset cpu`): --preset cifar (128-d embeddings, memory momentum 0.5, T = 0.07) with VISSL's InfoNCE
    (--loss-type cross_entropy: each image's own memory entry against 256 noise entries of the bank; NCE's Z
    estimate is the paper's default), lr 0.03 per 256 images with a cosine schedule.

    Why a small subset for many epochs: a memory-bank entry is refreshed once per epoch, so with 4,000
    images the positive m_I is 31 steps stale while the noise entries are fresh, and at the CPU budget
    the loss never left chance level. With 500 images the bank is 3 steps old and instance discrimination
    learns (loss ln 257 = 5.55 -> ~3.3). The kNN bank is still all 4,000 training images.

    Measured (kNN k=20, T=0.07, cifar10-mini train as the bank, the 10,000 CIFAR-10 test images): 35.55
    (seed 0, one thread) vs random init 31.77, i.e. +3.8 points (training loss 5.55 -> 2.96). A cross-entropy
    that also counted the batch's other memory entries as negatives gave 35.87 (seed 0) and 35.36 (seed 1);
    with it, the whole set (--data-fraction 0.5 for 28 epochs, 1024 negatives) gave only 33.62 / 32.11.
    Re-measured once both data paths were built from the one view recipe (one thread per run): 34.17 / 34.42
    (seeds 0 / 1), +2.4 / +2.65; with two threads per run, 33.57 / 35.60 (seeds 0 / 1), +1.8 / +3.8. The assertion asks for
    +1.5 points, below every measurement.
    """
    top1 = pretrain_knn_top1(tmp_path, "npid.py", "--preset", "cpu", "--print-every", "50")
    assert_beats_random_init("npid", top1, random_knn_top1, NPID_MARGIN)


CLUSTERFIT_MARGIN = 1.0


@pytest.mark.convergence
def test_clusterfit_beats_random_init(tmp_path, simclr_checkpoint, random_knn_top1):
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
    deterministic on CPU); re-measured once both data paths were built from the one view recipe (one thread
    per run): 34.75 / 34.31 (seeds 0 / 1, +3.0 / +2.5), and with two threads per run 34.17 / 34.45 (seeds 0 / 1,
    +2.4 / +2.7). The
    assertion asks for +1 point, below every measurement. Wall time on the shared 2-core
    machine: 6 min, half of it the session's SimCLR fixture.
    """
    top1 = pretrain_knn_top1(tmp_path, "clusterfit.py", "--preset", "cpu", "--weights", simclr_checkpoint,
                             "--print-every", "50")
    assert_beats_random_init("clusterfit", top1, random_knn_top1, CLUSTERFIT_MARGIN)


PIRL_MARGIN = 3.0


@pytest.mark.convergence
def test_pirl_beats_random_init(tmp_path):
    """A short CPU PIRL run must lift weighted-kNN accuracy on CIFAR-10 test above a random-init trunk, both
    scored with BatchNorm statistics re-estimated on the bank images (eval_knn.py --precise-bn 4000).

    Budget: 100 epochs over a sixteenth of cifar10-mini (--data-fraction 0.0625: 250 training images),
    300 steps of 64 images, each a 32-px view plus 9 shuffled 14-px patches (ResNet-18 with the ImageNet
    stem), about 15 min single-threaded beside another run (880 s measured). Recipe (`--preset cpu`): --preset
    cifar (memory momentum 0.5, T = 0.07, lambda 0.5) with VISSL's InfoNCE over 256 noise entries (--loss-type
    cross_entropy), lr 0.03 per 256 images, cosine, and VISSL's photo_gblur transforms (--gblur). A small subset
    for many epochs keeps the memory bank fresh (NPID's test explains why); the kNN bank is still all 4,000
    training images.

    Why precise BN, for both trunks: nine of every ten images the trunk sees are 14-px patches, and the patch
    forward runs after the image forward in every step, so the checkpoint's BatchNorm running statistics are
    mostly the patches'. With them the score depends on the seed more than on what was learned: 32.87 / 31.01
    (seeds 0 / 1) vs random init 31.77. Re-estimated on the 4,000 bank images (as Jigsaw's test does): 32.68 /
    32.05, against the random-init trunk's 27.79 under the same evaluation (precise BN lowers the random trunk,
    whose running statistics are otherwise those of its initialisation: mean 0, variance 1).

    Why --gblur: VISSL's default photometric transform (posterize, sharpness, a solarize threshold drawn
    from 0-256 and autocontrast, all at p = 0.66, on top of colour jitter) is too destructive at 32 px.
    With it (an eighth of the images, 40 epochs) the run ended at 28.11, and 29.12 with the image term
    alone (--jigsaw-weight 0); the same budget with --gblur gave 32.79 / 27.38 (seeds 0 / 1), and 100 epochs
    33.84 / 32.82 (checkpoint statistics). The paper's NCE loss with Z fixed from the first batch diverged there
    (loss 7 -> 300+, kNN 16-20); the MLP-head variant collapsed (loss flat at ln 384). A higher learning rate
    does not help: at seed 1, lr 0.12 gave 28.67 (29.48 with precise BN), and lr 0.06 on an eighth of the
    images for 50 epochs 31.26 (31.26).

    Measured (kNN k=20, T=0.07, cifar10-mini train as the bank, the 10,000 CIFAR-10 test images, precise BN,
    one thread per run as under `make test-convergence`): 32.68, 32.05 and 32.90 (seeds 0-2; 32.87, 31.01 and
    32.49 with the checkpoint's statistics) vs 27.79, i.e. +4.9, +4.3 and +5.1 points; with two threads per
    run, 32.53 / 31.52 (seeds 0 / 1), +4.7 / +3.7. The assertion asks for +3.0 points, below every measurement;
    the test runs seed 0.
    """
    top1 = pretrain_knn_top1(tmp_path, "pirl.py", "--preset", "cpu", "--print-every", "50", eval_flags=PRECISE_BN)
    random_top1 = knn_top1("random", *PRECISE_BN)
    assert_beats_random_init("pirl", top1, random_top1, PIRL_MARGIN)



SUITE_MARGIN = 4.0


@pytest.mark.convergence
def test_eval_suite_tells_simclr_from_random_init(tmp_path, simclr_checkpoint):
    """eval_suite.py's linear protocol (VTAB-1k's: heads chosen on val, refit on train + val per seed) must score
    the session's SimCLR trunk above a random-init ResNet-18 on a classification task of the synthetic suite
    (tests/suite_data.py: 800 / 200 of cifar10-mini's training images, 1,000 of its test images).

    Measured (two seeds of the linear refit; one thread): SimCLR --preset cpu seed 0 40.20, seed 1 40.75,
    after 4 of its 8 epochs 37.25, after 2 epochs (another run) 32.65; random init 31.80. Counting drawn shapes
    separates them less (47.4 / 51.1 against 43.6), so it is reported, not asserted. The assertion asks for
    +4.0 points on the classification task.
    """
    root = tmp_path / "suite"
    suite_data.write_suite(root, sizes=(800, 200, 1000), tasks=["cifar_classes", "shape_count"])
    scores = {}
    for name, weights in (("simclr", simclr_checkpoint), ("random", "random")):
        work = tmp_path / name
        run_script("eval_suite.py", "--weights", weights, "--arch", "resnet18", "--no-cifar-stem", "--suite",
                   root / "suite.txt", "--work-dir", work, "--seeds", "2", "--workers", "0", "--poll", "0.5")
        run_script("eval_suite.py", "--work-dir", work, "--summary")
        scores[name] = {r["task"]: r["mean"] for r in json.loads((work / "summary.json").read_text())["tasks"]}
    print(f"\neval_suite: SimCLR {scores['simclr']}, random init {scores['random']}")
    assert scores["simclr"]["cifar_classes"] > scores["random"]["cifar_classes"] + SUITE_MARGIN, scores

"""CPU convergence runs: pretrain each method briefly on cifar10-mini, then weighted kNN vs random init.

Every method pretrains a ResNet-18 (ImageNet stem, 32 px) on cifar10-mini's 4,000 training
images with its script's `--preset cpu` (epochs times --epochs-scale), then eval_knn.py (k = 20, T = 0.07) measures top-1
on CIFAR-10's 10,000 test images (the embedded cifar10-test, or --test-data) with the 4,000
training images as the bank. The same
evaluation of a seeded random-init trunk is the baseline (Jigsaw is scored at res4 with
precise BN, PIRL with precise BN, and so are their baselines: EVAL_FLAGS). Prints one JSON object.

    python bench/convergence.py                       # every method at its default budget
    python bench/convergence.py --methods simclr moco --epochs-scale 4 --out bench/results/conv.json
"""
import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# every method runs its script's `--preset cpu`, the recipe its convergence test runs (--preset cifar with the
# ImageNet stem at 32 px on cifar10-mini, and the changes the script's preset states); measurements in the comments
COMMON = ["--preset", "cpu", "--print-every", "50"]
# "now:" figures: seeds 0 / 1, one thread per process, with both data paths built from each script's one view recipe;
# "two threads": OMP_NUM_THREADS=2 (another summation order, so another run)
METHODS = [
    # the simclr recipe: now 39.23 / 40.71; two threads per process: 39.68 / 39.16
    "simclr",
    # the moco recipe of tests/test_convergence_*.py: 33.78 / 33.84 (seeds 0 / 1, bicubic crops); 8 epochs 31.70. The
    # queue starts empty: from random unit vectors (the official code's start) every query went to one direction.
    # Now (bilinear crops, as main_moco.py): 33.65 / 33.31; two threads: 34.24 / 32.56
    "moco",
    # the swav recipe of tests/test_convergence_*.py: 34.49 / 34.86 / 34.64 / 34.29 (seeds 0-3, one thread); 8 epochs gave
    # 34.06 / 33.09 (two threads) and 32.05 in CI; --epsilon 0.05 / 0.03 / 0.02 gave 30.13 / 31.65 / 33.20 at 8 epochs.
    # Now: 34.96 / 33.76; two threads: 34.59 / 33.12
    "swav",
    # the deepcluster_v2 recipe of tests/test_convergence_*.py: 33.89 / 32.63 (seeds 0 / 1, one thread) with the default
    # banks of crops 0 and 1, 33.66 / 33.41 with crop 0's bank alone; the whole set for 7 epochs with 3 x 100 centroids
    # 32.75 / 32.83, 3 x 30 centroids 33.07; --data-fraction 0.125 for 56 epochs 31.93 (crop 0's bank). Now: 32.43 / 33.15;
    # two threads: 33.51 / 32.27
    "deepcluster_v2",
    # the npid recipe of tests/test_convergence_*.py: 35.55 (seed 0, one thread); 35.87 / 35.36 (seeds 0 / 1)
    # with a cross-entropy that also counted the batch's other memory entries as negatives (VISSL's: the noise
    # only). An eighth of the images for many epochs keeps the memory bank fresh (each entry is refreshed once
    # per epoch); with that earlier loss --data-fraction 0.5, 28 epochs, 1024 negatives gave 33.62 / 32.11, and
    # lr 0.06 29.58. Now: 34.17 / 34.42; two threads: 33.57 / 35.60
    "npid",
    # the pirl recipe of tests/test_convergence_*.py: 32.74 / 33.41 / 33.74 / 32.32 (seeds 0-3, one thread) with
    # that same batch-negatives cross-entropy and patch offsets 0-2 px (VISSL's: 0-1). VISSL's
    # default photometric transform (posterize, sharpness, solarize 0-256, autocontrast at p 0.66) keeps PIRL near
    # chance at 32 px: an eighth of the images for 40 epochs 28.11 (29.12 with --jigsaw-weight 0); --gblur there
    # 32.79 / 27.38, 100 epochs 33.84 / 32.82; --loss-type nce (Z fixed) diverged (kNN 16-20), --mlp-head collapsed
    # Now, with VISSL's loss (own entry against the noise only) and patch offsets 0-1: 32.87 / 31.01 with the
    # checkpoint's BatchNorm statistics, which are mostly the 14-px patches' (9 of 10 trunk inputs, forwarded last);
    # scored with precise BN (EVAL_FLAGS): 32.68 / 32.05 / 32.90 (seeds 0-2) vs random init 27.79. At seed 1,
    # lr 0.12: 28.67 / 29.48 precise BN; lr 0.06 on an eighth of the images for 50 epochs: 31.26 / 31.26.
    # Two threads: 32.53 / 31.52 precise BN
    "pirl",
    # the rotnet recipe of tests/test_convergence_*.py: 34.54 / 33.65 (seeds 0 / 1) when first written; 33.16 /
    # 33.20 pooled before it was scored at res4; with two threads 31.92 / 33.22 pooled. At res4 with precise BN
    # (EVAL_FLAGS), random init 31.16: 34.41 / 35.38 (one thread), 34.01 / 34.74 (two threads)
    "rotnet",
    # the jigsaw recipe of tests/test_convergence_*.py, scored at res4 with precise BN (EVAL_FLAGS): 33.49 / 34.29 /
    # 34.46 / 34.38 (seeds 0-3, one thread), 33.93 / 34.73 (seeds 0 / 1, two threads) vs random init 31.16 under the
    # same evaluation. Pooled features gain less and vary more (precise BN, random 27.79): 29.43 / 29.95 at 6 epochs;
    # 3 epochs 28.21-30.18 over seeds and thread counts, as were 13-px tiles in 18-px cells (the paper's gap) 29.30
    # and 18-px tiles of a 72-px resize 27.84. Without precise BN the tiles' BatchNorm statistics hurt res3/res4
    # (31.34 at res4 vs 34.43 for random init); 2 epochs of the preset's own geometry gave 28.06 pooled.
    # Now (tiles cut per batch on both paths): 33.62 / 35.07; two threads 34.17 / 33.66
    "jigsaw",
    # clusters the features of a SimCLR --preset cpu run (trained first), then trains a fresh trunk: 34.96 / 34.36
    # when its test was written; now 34.75 / 34.31 (seeds 0 / 1), two threads 34.17 / 34.45
    "clusterfit",
    # the mocov3 recipe of tests/test_convergence_*.py, scored with precise BN (EVAL_FLAGS) against 27.79 for random
    # init: 30.86 / 29.64 (seeds 0 / 1, one thread); two threads 30.48 / 29.41. With the checkpoint's statistics
    # 31.21 (seed 0) against 31.77, whose initial statistics (mean 0, variance 1) flatter the random trunk
    "mocov3",
    # the barlow_twins recipe of tests/test_convergence_*.py (SimCLR's LARS at lr 2.0), precise BN against 27.79:
    # 33.90 / 36.22 (seeds 0 / 1, one thread); two threads 34.26 / 35.61; with solo-learn's LARS (eta 0.02, clipped, lr 0.3) 19.01 (seed 0, one thread)
    "barlow_twins",
    # the vicreg recipe of tests/test_convergence_*.py (SimCLR's LARS at lr 2.0), precise BN against 27.79:
    # 42.42 / 43.51 (seeds 0 / 1, one thread); two threads 43.34 / 42.48; solo-learn's LARS (eta 0.02, clipped,
    # lr 0.3) diverged
    "vicreg",
    # the byol recipe of tests/test_convergence_*.py (batch 64, SimCLR's LARS at lr 1.0, the predictor at 30x), precise
    # BN against 27.79: 31.38 / 32.47 (seeds 0 / 1, one thread). Seed 0, one thread, late checkpoints (step 434 or
    # 496): the predictor at 10x the rate
    # 30.03 (lr 1.0), 30.10 (lr 0.5), 29.57 (lr 2.0); one rate, lr 2.0 28.67; at batch 256 (120 steps) it stayed
    # below random init. Two threads: 32.72 / 31.38
    "byol",
    # the dino recipe of tests/test_convergence_*.py (batch 64, LARS at lr 2.0, teacher momentum 0.99, BN head to 1024
    # prototypes, teacher temperature 0.02 -> 0.04), precise BN against 27.79: 29.57 / 30.03 (seeds 0 / 1, one
    # thread; a late checkpoint, step 434 or 496, of seed 0 without BatchNorm in the head: 30.58). With 4096
    # prototypes and 0.04 -> 0.07 the loss stayed at ln 4096. Two threads: 30.31 / 28.66. Seeds 2 / 3, one thread:
    # 28.91 / 30.71
    "dino",
    # the simsiam recipe of tests/test_convergence_*.py (batch 64, LARS at lr 2.0, the predictor at 30x its fixed
    # rate), precise BN against 27.79: 32.25 / 31.35 (seeds 0 / 1, one thread). Seed 0, one thread: the cifar
    # recipe's SGD 25.72 (batch 256), 26.65 (batch 64), with lr 0.025 and wd 5e-4 24.75; LARS at one rate 28.77 (lr
    # 1.0), 29.22 (lr 2.0), 25.30 (lr 4.0); the predictor at 10x 31.79 (lr 1.0), 31.35 (lr 2.0); at 30x and lr 1.0
    # 31.73. Two threads: 31.88 / 31.43
    "simsiam",
]
# method -> eval_knn.py flags other than the default (pooled features, the checkpoint's BatchNorm statistics), for
# this method and its random-init baseline alike. Jigsaw's trunk saw only 16-px tiles, whose BatchNorm statistics do
# not fit 32-px images, and its last block is specific to the pretext task (Goyal et al. 2019 probe Jigsaw at res4).
# RotNet's likewise: its trunk saw rotated images and its last block predicts rotations (its pooled margin did not
# hold with two threads). PIRL's trunk sees nine 14-px patches for every 32-px image, so its statistics are
# re-estimated too; so are MoCo v3's, Barlow Twins', VICReg's, BYOL's, DINO's and SimSiam's, whose checkpoints hold
# those of their last strongly augmented views.
EVAL_FLAGS = {"jigsaw": ("--layers", "res4", "--precise-bn", "4000"),
              "rotnet": ("--layers", "res4", "--precise-bn", "4000"), "pirl": ("--precise-bn", "4000"),
              "mocov3": ("--precise-bn", "4000"), "barlow_twins": ("--precise-bn", "4000"),
              "vicreg": ("--precise-bn", "4000"), "byol": ("--precise-bn", "4000"), "dino": ("--precise-bn", "4000"),
              "simsiam": ("--precise-bn", "4000")}


def run(argv):
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {argv[0]} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def knn_top1(weights, test_data, eval_flags=()):
    out = run(["eval_knn.py", "--weights", weights, "--arch", "resnet18", "--no-cifar-stem", "--image-size", "32",
               "--train-data", "cifar10-mini", "--test-data", test_data, "--workers", "2", "--seed", "0", *eval_flags])
    return json.loads(out.strip().splitlines()[-1])["top1"]


def preset_epochs(method):
    """The epochs of `method`'s `--preset cpu`."""
    sys.path.insert(0, str(ROOT))
    return importlib.import_module(method).PRESETS["cpu"]["epochs"]


def torch_threads():
    """The intra-op threads each training and evaluation process gets (OMP_NUM_THREADS, else torch's default)."""
    return int(run(["-c", "import torch; print(torch.get_num_threads())"]).strip())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every budget")
    parser.add_argument("--test-data", default="cifar10-test", help="labelled test images (default: the embedded CIFAR-10 test split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every training run (the random-init baseline "
                        "keeps seed 0, as in the tests)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    test_data = args.test_data
    result = {"command": " ".join(["python", "bench/convergence.py", *sys.argv[1:]]), "test_data": test_data, "seed": args.seed,
              "torch_threads": torch_threads(), "random_init_top1": knn_top1("random", test_data), "methods": {}}
    for method in args.methods:
        epochs = max(1, round(preset_epochs(method) * args.epochs_scale))
        with tempfile.TemporaryDirectory() as out_dir, tempfile.TemporaryDirectory() as teacher_dir:
            flags = []
            if method == "clusterfit":  # its pretrained network N_pre: SimCLR's --preset cpu
                run(["simclr.py", *COMMON, "--seed", str(args.seed), "--output-dir", teacher_dir])
                flags = ["--weights", str(sorted(Path(teacher_dir).glob("checkpoint-*.pth"))[-1])]
            started = time.time()
            run([f"{method}.py", *COMMON, *flags, "--epochs", str(epochs), "--seed", str(args.seed),
                 "--output-dir", out_dir])
            seconds = time.time() - started
            last = sorted(Path(out_dir).glob("checkpoint-*.pth"))[-1]
            eval_flags = EVAL_FLAGS.get(method, ())
            top1 = knn_top1(str(last), test_data, eval_flags)
        random_top1 = knn_top1("random", test_data, eval_flags) if eval_flags else result["random_init_top1"]
        result["methods"][method] = {"epochs": epochs, "train_seconds": round(seconds, 1), "knn_top1": top1,
                                     "margin_vs_random": round(top1 - random_top1, 2)}
        if eval_flags:
            result["methods"][method].update(eval_flags=" ".join(eval_flags), random_init_top1=random_top1)
        print(json.dumps({method: result["methods"][method]}), file=sys.stderr, flush=True)
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

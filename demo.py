"""The main job on the embedded default: SimCLR on cifar10-mini, then weighted kNN vs a random trunk.

Pretrains a ResNet-18 (ImageNet stem, 32 px: the CIFAR stem is ~15x slower on a CPU) with
SimCLR's `--preset cpu` on the 4,000 training images of cifar10-mini, then evaluates the trained trunk and
a random-init one of the same architecture with eval_knn.py (k = 20, T = 0.07) on CIFAR-10's
10,000 test images (the embedded cifar10-test), the 4,000 training images as the bank. Every two
epochs the run's online kNN monitor (--eval-every) prints the top-1 of 1,000 of cifar10-mini's
test images against a bank of 1,000 training images, so the climb is visible as it trains; at the
end it draws the trained trunk's nearest neighbours of 8 test images (<output-dir>/neighbours.png). Runs on
a 2-core CPU in 5 to 25 minutes, depending on the cores' speed; pass --epochs for longer.

    python demo.py [--epochs 8] [--output-dir runs/demo-simclr]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import checkpoint


def run(*argv):
    """Run one of the repo's scripts with this interpreter; stream its output; return its last line."""
    print("$ python " + " ".join(argv), flush=True)
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
    last = ""
    for line in proc.stdout:
        print("  " + line, end="", flush=True)
        last = line.strip() or last
    if proc.wait() != 0:
        sys.exit(f"error: {argv[0]} failed with exit status {proc.returncode}.")
    return last


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--output-dir", default="runs/demo-simclr")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    started = time.time()
    run("simclr.py", "--preset", "cpu", "--epochs", str(args.epochs), "--workers", str(args.workers),
        "--print-every", "15", "--eval-every", "2", "--output-dir", args.output_dir)
    trained_seconds = time.time() - started
    knn = ("--train-data", "cifar10-mini", "--test-data", "cifar10-test", "--arch", "resnet18", "--no-cifar-stem", "--image-size", "32",
           "--workers", str(args.workers))
    grid = str(Path(args.output_dir) / "neighbours.png")
    trained = json.loads(run("eval_knn.py", "--weights", str(checkpoint.latest(args.output_dir)), *knn,
                             "--show-neighbours", grid))
    random_init = json.loads(run("eval_knn.py", "--weights", "random", *knn))
    summary = {"simclr_knn_top1": trained["top1"], "random_init_knn_top1": random_init["top1"],
               "margin": round(trained["top1"] - random_init["top1"], 2), "epochs": args.epochs,
               "pretrain_seconds": round(trained_seconds), "total_seconds": round(time.time() - started)}
    print(f"\nkNN top-1 on the 10,000 CIFAR-10 test images (k=20): SimCLR {trained['top1']:.1f}%  vs  random init "
          f"{random_init['top1']:.1f}%  ({summary['margin']:+.1f} points)")
    print(f"{grid}: 8 test images, each with its 8 nearest training images (green: same class, red: not)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

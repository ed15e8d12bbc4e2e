"""Training img/s of every method script as shipped, ResNet-18 (ImageNet stem) at 32 px on cifar10-mini.

Each script runs its own `--preset cifar` (its views, heads, loss, optimiser, data
loader, logging) with the ImageNet stem at 32 px, for --steps steps of --batch-size
images, and the figure is the img/s its logger records in metrics.jsonl over the steps
after the first (start-up excluded). One image gives several network inputs, which
differ by method (two views, multi-crop, four rotations, nine jigsaw tiles ...):
`inputs_per_image` says which, and `preset` quotes the preset's own description. ClusterFit's
training stage (cross-entropy on pseudo-labels) runs after its extract and cluster
stages on a random-init trunk; only the training stage is timed.

    python bench/scripts_cpu.py --out bench/results/scripts-cpu.json
"""
import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# script -> (extra flags, network inputs per image at --preset cifar)
SCRIPTS = {
    "simclr": ([], "2 views"),
    "moco": (["--queue-size", "1024"], "2 views (query + key encoder)"),  # cifar10-mini has 4,000 images
    "swav": ([], "multi-crop (the preset's --crops)"),
    "deepcluster_v2": ([], "multi-crop (the preset's --crops)"),
    "npid": ([], "1 view"),
    "pirl": ([], "1 view + 9 jigsaw tiles"),
    "rotnet": ([], "4 rotations"),
    "jigsaw": ([], "9 tiles"),
    "clusterfit": (["--weights", "random", "--num-clusters", "100", "--kmeans-iters", "5"], "1 view"),
    "barlow_twins": ([], "2 views"),
    "vicreg": ([], "2 views"),
    "byol": ([], "2 views (online + target network)"),
    "simsiam": ([], "2 views"),
    "mocov3": ([], "2 views (base + momentum encoder)"),
    "dino": ([], "2 crops (student + teacher; no local crops at --preset cifar)"),
}


def last_rate(metrics_file):
    rates = [json.loads(line).get("img_per_s") for line in Path(metrics_file).read_text().splitlines()]
    rates = [r for r in rates if isinstance(r, (int, float)) and r == r]
    return rates[-1] if rates else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=list(SCRIPTS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "batch_size": args.batch_size, "steps": args.steps, "scripts": {}}
    for name in args.scripts:
        flags, inputs = SCRIPTS[name]
        with tempfile.TemporaryDirectory() as out_dir:
            cmd = [sys.executable, f"{name}.py", "--preset", "cifar", "--data", "cifar10-mini", "--arch", "resnet18",
                   "--no-cifar-stem", "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
                   "--workers", str(args.workers), "--print-every", str(args.steps), "--output-dir", out_dir, *flags]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                result["scripts"][name] = {"error": proc.stderr.strip().splitlines()[-1:]}
            else:
                metrics = sorted(Path(out_dir).rglob("metrics.jsonl"))[-1]
                result["scripts"][name] = {"img_per_s": round(last_rate(metrics), 1), "inputs_per_image": inputs,
                                           "preset": importlib.import_module(name).PRESETS["cifar"].get("_doc", "")}
        print(json.dumps({name: result["scripts"][name]}), file=sys.stderr, flush=True)
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

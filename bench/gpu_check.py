"""GPU acceptance: build, test and measure the CUDA kernels and a short SimCLR run, one JSON out.

On a machine with one GPU and no network, from the repository root (`make gpu-check`):

  1. builds common._C for the GPU present (setup.py build_ext --inplace, all cores);
  2. runs the CUDA tests (tests/test_ops.py, tests/test_gpu_aug.py, and eval_suite.py on CUDA in
     tests/test_eval_suite.py; their CUDA cases skip without a GPU);
  3. bench/ops.py --device cuda: the kernels at their target shapes next to the PyTorch references and peers,
     with bench/perf_model.py's lower bounds for that device beside the measured times;
  4. bench/throughput.py --device cuda (simclr.py's step vs lightly's, ResNet-18 at 32 px);
  5. simclr.py --preset cifar on the embedded cifar10-mini for --simclr-epochs, then eval_knn.py against random init;

and writes bench/results/<date>-<device>.json (every step's command, wall time, output) unless --out says
otherwise. Each step has a time limit so that the whole check fits its budget (8 minutes by default); a step
that fails or runs out of time is recorded as such and the check goes on. Exits non-zero if any step failed.

    python bench/gpu_check.py [--out FILE] [--budget-s 480] [--device cuda] [--wheels .whl]

The peers that steps 3 and 4 measure beside the project's code (bench/peers.txt: lightly, fast-pytorch-kmeans)
are used where installed; on a machine without network they come as wheels: `make peer-wheels` on a machine
with network downloads them to .whl/, and this check installs them from there into runs/gpu-check-peers (the
JSON's "peers" says which version each step saw, or why a peer is missing; its rows are then skipped).

--device cpu runs the same steps on the CPU with small shapes (to check the plumbing without a GPU;
with --skip-build it keeps the extension already built).
"""
import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import perf_model  # noqa: E402


def run_step(name, argv, limit_s, env=None, parse_json=True, partial_json=None):
    """Runs argv in the repository root; returns a record with the wall time and the JSON of stdout (or, when the
    step stopped early, what it had written to partial_json)."""
    started = time.time()
    record = {"step": name, "command": " ".join(argv), "limit_s": round(limit_s)}
    try:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=max(1, limit_s),
                              env={**os.environ, **(env or {})})
        record.update(rc=proc.returncode, ok=proc.returncode == 0)
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        record.update(rc=None, ok=False, timed_out=True)
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    record["wall_s"] = round(time.time() - started, 1)
    if parse_json:  # the step's JSON: the last object printed at the end of stdout, on one line or indented
        lines = out.strip().splitlines()
        for i in reversed(range(len(lines))):
            if lines[i].startswith("{"):
                try:
                    record["result"] = json.loads("\n".join(lines[i:]))
                    break
                except json.JSONDecodeError:
                    pass
        if "result" not in record and partial_json and os.path.exists(partial_json):
            with open(partial_json) as f:
                record.update(result=json.load(f), result_partial=True)
    if not record["ok"] or "result" not in record:
        record["output_tail"] = (out[-3000:] + "\n" + err[-3000:]).strip()
    print(f"# {name}: {'ok' if record['ok'] else 'FAILED'} in {record['wall_s']} s", file=sys.stderr, flush=True)
    return record


def verdicts(ops_report, device):
    """Each of bench/perf_model.py's targets against bench/ops.py's measurement: the value, the limit, and met
    (None: not measured)."""
    out = []
    for op, targets in perf_model.TARGETS.items():
        ratios = ops_report.get("ratios", {}).get(f"{op}/{device}", {})
        compiled = ops_report.get("results", {}).get(f"{op}/{device}", {}).get("compiled") or {}
        for what, key, limit in targets:
            value = ratios.get(key) if key.startswith("time_vs") else compiled.get(key)
            out.append({"op": op, "target": what, "limit": round(limit, 4),
                        "measured": None if value is None else round(value, 4),
                        "met": None if value is None else value <= limit})
    return out


def peer_packages():
    """The pinned peers of bench/peers.txt: [(distribution name, version)]."""
    with open(os.path.join(ROOT, "bench", "peers.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    return [tuple(line.split("==")) for line in lines if line]


def install_peers(wheel_dir, target):
    """Makes the benchmarks' peers importable by the steps: a peer already installed is used as it is, the others
    are installed from the wheels in wheel_dir (`make peer-wheels` fills it on a machine with network) into target,
    which goes on the steps' PYTHONPATH. Returns (the steps' extra environment, {peer: what was used})."""
    def norm(name):
        return re.sub(r"[-_.]+", "_", name).lower()
    used, wheels = {}, []
    for name, pinned in peer_packages():
        try:
            used[name] = f"{importlib.metadata.version(name)} (installed)"
            continue
        except importlib.metadata.PackageNotFoundError:
            pass
        found = sorted(glob.glob(os.path.join(wheel_dir, f"{norm(name)}-{pinned}-*.whl")))
        if found:
            wheels.append(found[-1])
            used[name] = f"{pinned} (wheel)"
        else:
            used[name] = (f"missing: not installed and no {norm(name)}-{pinned} wheel in {wheel_dir} "
                          f"(make peer-wheels); its benchmarks record it as skipped")
    if not wheels:
        return {}, used
    shutil.rmtree(target, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", target, *wheels], capture_output=True, text=True)
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        return {}, {name: (f"missing: {why}" if v.endswith("(wheel)") else v) for name, v in used.items()}
    return {"PYTHONPATH": os.pathsep.join(p for p in (target, os.environ.get("PYTHONPATH")) if p)}, used


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole check's time budget")
    parser.add_argument("--simclr-epochs", type=int, default=60)
    parser.add_argument("--out", default=None, help="default: bench/results/<date>-<device>.json")
    parser.add_argument("--skip-build", action="store_true", help="use the common._C already built")
    parser.add_argument("--wheels", default=os.path.join(ROOT, ".whl"),
                        help="where the peers' wheels are for an offline machine (default: .whl, make peer-wheels)")
    args = parser.parse_args()
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device is visible; gpu_check needs one GPU (or --device cpu for a dry run).")
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    slug = device_name.lower().replace("nvidia ", "").replace(" ", "-")
    out_path = args.out or os.path.join(ROOT, "bench", "results", f"{datetime.date.today()}-{slug}.json")
    started = time.time()
    py = sys.executable
    cuda = args.device == "cuda"
    # the share of the budget each step may use (build first: the rest needs it)
    # (ops: one subprocess per op and implementation, 14 in all; simclr: training, then two kNN evaluations that each
    # read and decode 14,000 images)
    shares = [("build", 0.25), ("tests", 0.08), ("ops", 0.32), ("throughput", 0.1), ("simclr", 0.25)]
    limits = {name: share * args.budget_s for name, share in shares}
    env_build = {"MAX_JOBS": str(os.cpu_count() or 4)}
    if cuda:
        major, minor = torch.cuda.get_device_capability(0)
        env_build["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    else:
        env_build["SSL_OPS_NO_CUDA"] = "1"
    peers_env, peers = install_peers(args.wheels, os.path.join(ROOT, "runs", "gpu-check-peers"))
    steps = []
    if not args.skip_build:
        steps.append(run_step("build", [py, "setup.py", "-q", "build_ext", "--inplace"], limits["build"], env_build,
                              parse_json=False))
    test_files = ["tests/test_ops.py", "tests/test_gpu_aug.py", "tests/test_eval_suite.py"] if cuda else \
        ["tests/test_ops.py"]
    steps.append(run_step("tests", [py, "-m", "pytest", "-q", "--maxfail=10", "-p", "no:cacheprovider", *test_files,
                                    *(["-k", "cuda"] if cuda else ["-k", "sinkhorn"])], limits["tests"],
                          parse_json=False))
    ops_json = os.path.join(ROOT, "runs", "gpu-check-ops.json")
    os.makedirs(os.path.dirname(ops_json), exist_ok=True)
    if os.path.exists(ops_json):
        os.remove(ops_json)
    steps.append(run_step("ops", [py, "bench/ops.py", "--device", args.device, *([] if cuda else ["--quick"]),
                                  "--out", ops_json], limits["ops"], peers_env, partial_json=ops_json))
    steps.append(run_step("throughput", [py, "bench/throughput.py", "--device", args.device, "--scripts", "",
                                         "--cases", "resnet18_32", *([] if cuda else ["--steps", "1"])],
                          limits["throughput"], peers_env))
    run_dir = os.path.join(ROOT, "runs", "gpu-check-simclr")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resumed one
    # on the GPU the paper's CIFAR recipe; the CPU dry run takes the 32-px ImageNet-stem recipe for 4 steps
    recipe = ["--preset", "cifar", "--epochs", str(args.simclr_epochs), "--workers", "8"] if cuda else \
        ["--preset", "cpu", "--epochs", "1", "--max-steps", "4", "--workers", "2"]
    stem = "--cifar-stem" if cuda else "--no-cifar-stem"
    simclr = run_step("simclr", [py, "simclr.py", *recipe, "--data", "cifar10-mini", "--output-dir", run_dir],
                      limits["simclr"] * 0.6, parse_json=False)
    steps.append(simclr)
    if simclr["ok"]:
        ckpts = sorted(f for f in os.listdir(run_dir) if f.startswith("checkpoint-"))
        for weights in (os.path.join(run_dir, ckpts[-1]), "random"):
            steps.append(run_step(f"knn ({'simclr' if weights != 'random' else 'random init'})",
                                  [py, "eval_knn.py", "--weights", weights, "--train-data", "cifar10-mini",
                                   "--test-data", "cifar10-test", "--arch", "resnet18", stem,
                                   "--image-size", "32"],
                                  limits["simclr"] * 0.2))
    report = {"what": "GPU acceptance: build, CUDA tests, ops and throughput benchmarks, a short SimCLR run",
              "command": "python " + " ".join(["bench/gpu_check.py", *sys.argv[1:]]),
              "device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "date": str(datetime.date.today()), "budget_s": args.budget_s,
              "wall_s": round(time.time() - started, 1), "ok": all(s["ok"] for s in steps), "peers": peers,
              "steps": steps}
    ops_step = next(s for s in steps if s["step"] == "ops")
    if cuda and "result" in ops_step:
        report["targets"] = verdicts(ops_step["result"], args.device)
    if cuda:
        key = "h200" if "H200" in device_name else "h100"
        report["perf_model"] = perf_model.model(key)
    text = json.dumps(report, indent=1)
    with open(out_path, "w") as f:
        f.write(text + "\n")
    print(json.dumps({"ok": report["ok"], "wall_s": report["wall_s"], "out": os.path.relpath(out_path, ROOT),
                      "steps": {s["step"]: s["ok"] for s in steps},
                      "targets": {f"{t['op']}: {t['target']}": [t["measured"], t["limit"], t["met"]]
                                  for t in report.get("targets", [])}}))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Costs of the reliability machinery (preemption exit, periodic checkpoints, a dead rank), measured on
simclr.py as a user runs it, JSON out.

  sigterm_to_exit       SIGTERM sent mid-run -> process exit, ResNet-18 at 32 px (--preset cifar), batch 256;
                        the median of --repeats runs, split into
                          finish_step       signal -> the step in flight is logged (metrics.jsonl's mtime)
                          write_checkpoint  -> checkpoint-<step>.pth written, fsync'ed and renamed into place
                                            (the output folder's mtime; older checkpoints beyond --keep deleted)
                          exit              -> the process has exited (process-group teardown, interpreter exit)
  checkpoint_overhead   --checkpoint-every N (N in --every) vs none, per arch (ResNet-18 and ResNet-50 at 32 px):
                          measured  (mean step time with N) / (mean step time without) - 1, over --steps steps
                                    (metrics.jsonl's img/s from the end of step 1; the end-of-run save is outside)
                          modelled  one atomic save's seconds / (N x step seconds), the save timed in-process
                                    on the same state (model, LARS momenta, RNG) with its size in MB
  killed_rank_to_exit   torchrun --nproc_per_node=2 (gloo), rank 1 SIGKILLs itself in step 3 (SSL_TEST_FAULT):
                        seconds from the kill to torchrun's exit (no --max-restarts), median of --repeats

    python bench/reliability.py --out bench/results/reliability-cpu.json            # idle cores: tens of minutes
    python bench/reliability.py --quick                                             # smoke run, about a minute

Runs one job at a time; timings include other processes' load on a shared machine.
"""
import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import simclr  # noqa: E402
from common import checkpoint, cli, models, optim  # noqa: E402


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **extra)


def _flags(args, arch, batch_size):
    return ["--preset", "cifar", "--arch", arch, "--data", args.data, "--data-fraction", str(args.data_fraction),
            "--batch-size", str(batch_size), "--workers", str(args.workers), "--device", args.device,
            "--print-every", "1", "--epochs", "1000"]


def _metrics(output_dir):
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def sigterm_to_exit(args, workdir):
    """Signal -> exit of one simclr.py run, split at the end of the step and the checkpoint's rename."""
    runs = []
    for repeat in range(args.repeats):
        out = workdir / f"sigterm-{repeat}"
        cmd = [sys.executable, "simclr.py", *_flags(args, "resnet18", args.batch_size), "--output-dir", str(out)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while len(_metrics(out)) < args.warmup_steps:  # past start-up and the first steps
            if proc.poll() is not None:
                raise RuntimeError(f"simclr.py ended early: {proc.stderr.read()[-2000:]}")
            time.sleep(0.02)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        exited = time.time()
        if proc.returncode != 75:
            raise RuntimeError(f"simclr.py exited with {proc.returncode}, not 75: {proc.stderr.read()[-2000:]}")
        step_logged = (out / "metrics.jsonl").stat().st_mtime
        saved = out.stat().st_mtime  # the folder changed last when the checkpoint was renamed into place
        runs.append({"total": exited - sent, "finish_step": step_logged - sent, "write_checkpoint": saved - step_logged,
                     "exit": exited - saved, "step": _metrics(out)[-1]["step"]})
    step_seconds = [args.batch_size / r["img_per_s"] for r in _metrics(workdir / "sigterm-0")[1:]]
    return {"arch": "resnet18", "image_size": 32, "batch_size": args.batch_size, "repeats": args.repeats,
            "median_seconds": {k: round(statistics.median(r[k] for r in runs), 3)
                               for k in ("total", "finish_step", "write_checkpoint", "exit")},
            "step_seconds": round(step_seconds[-1], 3) if step_seconds else None, "runs": runs}


def save_seconds(arch, args, workdir, repeats=3):
    """One atomic training-checkpoint save of simclr.py's state for `arch` (model, LARS momenta, RNG): s, MB."""
    run_args = cli.parse_args(simclr.Args, simclr.PRESETS, ["--preset", "cifar", "--arch", arch])
    model = simclr.SimCLR(run_args)
    optimizer = optim.LARS(optim.param_groups(model, 1e-6), lr=0.1, momentum=0.9)
    for p in model.parameters():  # momenta exist after the first step
        p.grad = torch.zeros_like(p)
    optimizer.step()
    state = {"method": "simclr", "args": cli.as_dict(run_args), "epoch": 0, "step": 1, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state(),
             "trunk": models.trunk_state_dict(model.trunk)}
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        path = checkpoint.save_training(state, workdir / f"save-{arch}", i + 1, keep=1)
        times.append(time.perf_counter() - start)
    return statistics.median(times), path.stat().st_size / 2**20


def checkpoint_overhead(args, workdir):
    results = {}
    for arch in args.archs:
        seconds, megabytes = save_seconds(arch, args, workdir)
        per_every = {}
        for every in [0, *args.every]:
            out = workdir / f"every-{arch}-{every}"
            cmd = [sys.executable, "simclr.py", *_flags(args, arch, args.overhead_batch_size),
                   "--max-steps", str(args.steps), "--checkpoint-every", str(every), "--keep-checkpoints", "2",
                   "--output-dir", str(out)]
            done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{cmd} failed: {done.stderr[-2000:]}")
            per_every[every] = args.overhead_batch_size / _metrics(out)[-1]["img_per_s"]  # mean s/step after step 1
        base = per_every[0]
        results[arch] = {
            "batch_size": args.overhead_batch_size, "steps": args.steps, "checkpoint_mb": round(megabytes, 1),
            "save_seconds": round(seconds, 3), "step_seconds": round(base, 4),
            "every": {str(n): {"step_seconds": round(per_every[n], 4),
                               "measured_overhead": round(per_every[n] / base - 1, 4),
                               "modelled_overhead": round(seconds / (n * base), 4)} for n in args.every}}
    return results


def killed_rank_to_exit(args, workdir):
    runs = []
    for repeat in range(args.repeats):
        out = workdir / f"killed-{repeat}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={29500 + os.getpid() % 1000 + repeat}", "simclr.py",
               *_flags(args, "resnet18", args.overhead_batch_size), "--device", "cpu", "--max-steps", "20",
               "--output-dir", str(out)]
        done = subprocess.run(cmd, cwd=ROOT, env=_env(SSL_TEST_FAULT="KILL:3:1", SSL_DIST_TIMEOUT_MINUTES="1"),
                              capture_output=True, text=True)
        exited = time.time()
        marker = out / ".test-fault-done"
        if done.returncode == 0 or not marker.exists():
            raise RuntimeError(f"the rank was not killed as planned ({done.returncode}): {done.stderr[-2000:]}")
        runs.append(exited - marker.stat().st_mtime)
    return {"median_seconds": round(statistics.median(runs), 3), "runs": [round(r, 3) for r in runs]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="cifar10-mini")
    parser.add_argument("--data-fraction", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="for the SIGTERM timing")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps logged before SIGTERM is sent")
    parser.add_argument("--overhead-batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=101, help="steps of each --checkpoint-every run")
    parser.add_argument("--every", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny batches and runs, one repeat")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.quick:
        args.data_fraction, args.batch_size, args.warmup_steps, args.overhead_batch_size = 0.05, 16, 2, 8
        args.steps, args.every, args.archs, args.repeats, args.workers = 6, [2, 5], ["resnet18"], 1, 0
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        workdir = Path(tmp)
        result = {"device": args.device, "cpu": platform.processor() or platform.machine(),
                  "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
                  "torch": torch.__version__, "quick": args.quick, "omp_num_threads": _env()["OMP_NUM_THREADS"],
                  "sigterm_to_exit": sigterm_to_exit(args, workdir),
                  "checkpoint_overhead": checkpoint_overhead(args, workdir),
                  "killed_rank_to_exit": killed_rank_to_exit(args, workdir)}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

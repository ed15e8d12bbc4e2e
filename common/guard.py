"""Keeping long runs alive: preemption signals, non-finite losses and gradients, bad data.

`StepGuard` is consulted once per training step by every script:

    guard = StepGuard(output_dir, nan_policy)             # installs SIGTERM / SIGUSR1 handlers
    ...
    mean_loss, preempted = guard.sync(loss)               # one all-reduce: same decision on every rank
    if guard.finite_loss(mean_loss, step, lr, inputs):    # else skips (--nan-policy skip) or raises
        loss.backward()
        if guard.finite_grads(model, step, lr, mean_loss):
            optimizer.step()
    step += 1
    if preempted: save(); guard.exit_preempted()

Preemption (SLURM sends SIGUSR1 before the time limit and SIGTERM at it; torchrun's agent
and Kubernetes send SIGTERM): the handler only sets a flag; the step in flight finishes,
a checkpoint is written atomically and the process exits with EXIT_PREEMPTED, so a
wrapper (or torchrun --max-restarts) re-runs the same command, which resumes.

Fault injection for the tests: SSL_TEST_FAULT="SIGNAL:STEP[:RANK]" (e.g. "TERM:3", "KILL:5:1")
makes rank RANK (default 0) send itself SIGSIGNAL during its STEP-th step, once per
--output-dir (a marker file `.test-fault-done` there keeps the re-run from repeating it).
"""
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from common import dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", distinct from errors (2) and crashes (1)


class NonFiniteError(ValueError):
    """A NaN/Inf loss or gradient under --nan-policy stop."""


class StepGuard:
    def __init__(self, output_dir, nan_policy="stop", max_nan_skips=20, max_bad_fraction=0.01,
                 signals=(signal.SIGTERM, signal.SIGUSR1), precision="fp32"):
        if nan_policy not in ("stop", "skip"):
            raise ValueError(f"--nan-policy must be 'stop' or 'skip', got {nan_policy!r}.")
        self.output_dir, self.nan_policy, self.max_nan_skips = Path(output_dir), nan_policy, max_nan_skips
        self.max_bad_fraction = max_bad_fraction
        self.precision = precision  # "fp32", "bf16" or "fp16": what the advice on a non-finite step says
        self.skipped, self.bad_images, self.seen_images = 0, 0, 0
        self.signal_received, self.signal_time = None, None
        for sig in signals:
            signal.signal(sig, self._on_signal)
        self.steps_here, self.fault = 0, os.environ.get("SSL_TEST_FAULT")

    def _inject_fault(self):
        name, at_step, *rank = self.fault.split(":")
        marker = self.output_dir / ".test-fault-done"
        if self.steps_here == int(at_step) and dist.rank() == int((rank or [0])[0]) and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), getattr(signal, "SIG" + name))

    def _on_signal(self, signum, frame):
        self.signal_received, self.signal_time = signum, time.time()

    def sync(self, loss):
        """(mean loss over ranks, whether any rank was signalled): one all-reduce per step."""
        self.steps_here += 1
        if self.fault:
            self._inject_fault()
        packed = torch.stack([loss.detach().float().reshape(()),
                              torch.tensor(1.0 if self.signal_received else 0.0, device=loss.device)])
        if dist.world_size() > 1:
            torch.distributed.all_reduce(packed)
            packed[0] /= dist.world_size()
        return packed[0], bool(packed[1].item() > 0)

    def exit_preempted(self, logger=None):
        name = signal.Signals(self.signal_received).name if self.signal_received else "a peer's signal"
        message = f"preempted by {name}: checkpoint written, exiting with status {EXIT_PREEMPTED}; " \
                  f"re-run the same command to resume."
        if logger:
            logger.info(message)
        dist.cleanup()
        sys.exit(EXIT_PREEMPTED)

    def count_images(self, n_images, bad_names, logger=None):
        """Account for one batch; stop when unreadable images exceed --max-bad-fraction."""
        self.seen_images += n_images
        self.bad_images += len(bad_names)
        for name in bad_names:
            if logger:
                logger.info(f"skipped unreadable image {name}")
        if self.bad_images and self.bad_images > self.max_bad_fraction * self.seen_images and self.seen_images >= 100:
            raise ValueError(f"{self.bad_images} of {self.seen_images} images could not be decoded, more than "
                             f"--max-bad-fraction {self.max_bad_fraction}; check the data (last: {bad_names[-1:]}).")

    def finite_loss(self, loss, step, lr, inputs=(), terms=None, last_checkpoint=None):
        """False (skip this batch) or raise when the loss is NaN/Inf; True when it is fine."""
        if torch.isfinite(loss).all():
            return True
        return self._non_finite("loss", step, lr, loss, None, inputs, terms, last_checkpoint)

    def finite_grads(self, model, step, lr, loss, inputs=(), last_checkpoint=None, scaler=None):
        """Check the gradient norm before optimizer.step(); with an fp16 GradScaler, overflow is its job."""
        if scaler is not None and scaler.is_enabled():
            return True
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else \
            torch.zeros(())
        if torch.isfinite(norm):
            return True
        return self._non_finite("gradient", step, lr, loss, norm, inputs, None, last_checkpoint)

    def _non_finite(self, what, step, lr, loss, grad_norm, inputs, terms, last_checkpoint):
        record = {"step": step, "what": what, "loss": _num(loss), "lr": lr, "grad_norm": _num(grad_norm),
                  "terms": {k: _num(v) for k, v in (terms or {}).items()},
                  "inputs": [_stats(x) for x in inputs], "rank": dist.rank(), "policy": self.nan_policy}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "nonfinite.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.nan_policy == "skip" and self.skipped < self.max_nan_skips:
            self.skipped += 1
            return False
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        raise NonFiniteError(f"the {what} became non-finite at step {step} (details in "
                             f"{self.output_dir / 'nonfinite.jsonl'}); {where}; lower --lr"
                             + (" or use --precision fp32" if self.precision in ("bf16", "fp16") else "")
                             + (f" ({self.skipped} batches were skipped already)." if self.skipped else "."))


def _num(t):
    if t is None:
        return None
    v = float(t.detach().float().item()) if isinstance(t, torch.Tensor) else float(t)
    return v if math.isfinite(v) else str(v)


def _stats(x):
    x = x.detach().float()
    finite = torch.isfinite(x)
    return {"shape": list(x.shape), "non_finite": int((~finite).sum()), "mean": _num(x[finite].mean()) if finite.any()
            else None, "std": _num(x[finite].std()) if finite.sum() > 1 else None}

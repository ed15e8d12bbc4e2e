"""Logging: one progress line (step, loss, lr, img/s, ETA), metrics.jsonl, TensorBoard if installed."""
import json
import sys
import time
from pathlib import Path


class MetricLogger:
    """Prints a progress line every `print_every` steps and appends every record to metrics.jsonl.

    Only the main process should write: pass `enabled=False` on other ranks.
    """

    def __init__(self, output_dir, total_steps, enabled=True, print_every=10, tensorboard=True):
        self.enabled, self.total_steps, self.print_every = enabled, total_steps, print_every
        self.output_dir = Path(output_dir) if output_dir else None
        self.writer = None
        self._t0, self._step0, self._images = None, None, 0
        if enabled and self.output_dir:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
                except ImportError:  # tensorboard is optional
                    self.writer = None

    def step(self, step, epoch, images, **metrics):
        """Record one training step that processed `images` images (all ranks together)."""
        now = time.perf_counter()
        if self._t0 is None:  # the first step includes start-up costs: time from its end
            self._t0, self._step0, self._images = now, step, 0
            rate = float("nan")
        else:
            self._images += images
            rate = self._images / max(now - self._t0, 1e-9)
        if not self.enabled:
            return
        record = {"step": step, "epoch": epoch, **{k: _plain(v) for k, v in metrics.items()}, "img_per_s": rate,
                  "time": round(time.time(), 3)}
        self.write(record)
        if self.writer:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.writer.add_scalar(f"train/{k}", v, step)
        if step % self.print_every == 0 or step == self.total_steps:
            done = step - self._step0
            eta = (now - self._t0) / done * (self.total_steps - step) if done > 0 else float("nan")
            parts = [f"epoch {epoch}", f"step {step}/{self.total_steps}"]
            parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
            parts += [f"img/s {rate:.0f}" if rate == rate else "img/s -", f"eta {_duration(eta)}"]
            print("  ".join(parts), flush=True)

    def evaluation(self, step, epoch, **metrics):
        """An evaluation during training: a progress line of its own, metrics.jsonl, TensorBoard (eval/...)."""
        if not self.enabled:
            return
        record = {"step": step, "epoch": epoch, **{k: _plain(v) for k, v in metrics.items()}, "time": round(time.time(), 3)}
        self.write(record)
        if self.writer:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"eval/{k}", v, step)
        parts = [f"epoch {epoch}", f"step {step}/{self.total_steps}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()]
        print("  ".join(parts), flush=True)

    def pause(self, seconds):
        """Leave `seconds` (spent on something other than training) out of the img/s and ETA."""
        if self._t0 is not None:
            self._t0 += seconds

    def write(self, record):
        """Append a JSON record to metrics.jsonl (main process only)."""
        if self.enabled and self.output_dir:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def info(self, message):
        if self.enabled:
            print(message, flush=True)

    def close(self):
        if self.writer:
            self.writer.close()


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _duration(seconds):
    if seconds != seconds or seconds == float("inf"):
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)

"""Checkpoints: atomic saves, resume from the latest one, RNG state capture, safe loading.

A training checkpoint is one `.pth` dict (docs/design.md): method, args, epoch, step, model,
optimizer, scaler, rng, method state, and `trunk` under plain torchvision names.
Files are named `checkpoint-<step>.pth` in `--output-dir`; re-running the same
command resumes from the highest step found there.

Every file is read with `torch.load(..., weights_only=True)`: tensors, numbers, strings
and plain containers, plus the few objects that published checkpoints hold (SAFE_GLOBALS:
`argparse.Namespace`, numpy arrays, scalars and dtypes). A file that would have to import
anything else is refused before it can run code, with one sentence naming the object;
`--trust-checkpoint` (every script, see common/cli.py) loads it with full pickle.
"""
import argparse
import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^checkpoint-(\d+)\.pth$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one sentence for the user."""


def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash or a full disk mid-save leaves any previous file at `path` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _RememberWriteError(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is not None:  # torch.save reports a failed write as a RuntimeError
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _RememberWriteError:
    """A file wrapper that keeps the OSError of a failed write (full disk, quota, I/O error)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def prepare_output_dir(output_dir):
    """Create `output_dir` and check that files can be written there, before any work is done."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise CheckpointError(f"--output-dir {path} is not a writable directory ({e.strerror}).") from None
    return path


def checkpoints(output_dir):
    """Sorted (step, path) of the checkpoints in `output_dir`."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), output_dir / name) for name in os.listdir(output_dir) if (m := _NAME.match(name))]
    return sorted(found)


def latest(output_dir):
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def save_training(state, output_dir, step, keep=3):
    """Save `state` as checkpoint-<step>.pth and delete all but the newest `keep` (0 = keep all)."""
    path = Path(output_dir) / f"checkpoint-{step:08d}.pth"
    try:
        save_atomic(state, path)
    except OSError as e:  # a full disk (ENOSPC), a quota or file-size limit (EFBIG), an I/O error
        previous = latest(output_dir)
        kept = f"{previous} is intact" if previous else "no earlier checkpoint was written"
        raise CheckpointError(f"writing {path} failed ({e.strerror or e}); {kept}: free space, then re-run "
                              f"the same command to resume.") from None
    if keep:
        for _, old in checkpoints(output_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def _numpy_globals():
    """The numpy objects that pickled arrays, scalars and dtypes need (numpy 1.x and 2.x names)."""
    core = getattr(np, "_core", None) or np.core
    found = [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles a dtype through its class
    if dtypes is not None:
        found += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith("DType")]
    return found


# what published checkpoints (VISSL, MoCo, SwAV / DeepCluster-v2, DINO, torchvision) hold besides tensors
SAFE_GLOBALS = [argparse.Namespace, *_numpy_globals()]
TRUSTED = False  # set by `--trust-checkpoint` (common/cli.py): load with full pickle, which can run code


def _global_name(obj):
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', obj))}"


def _refusal(path, error):
    """The sentence for a file that weights_only loading refused, naming what it would import."""
    try:  # reads the pickle's opcodes only; nothing is imported or run
        wanted = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        wanted = []
    allowed = {_global_name(g) for g in SAFE_GLOBALS}
    unsafe = [name for name in wanted if name not in allowed]
    if not unsafe:
        match = re.search(r"(?:Unsupported global|unsupported GLOBAL).*?:?\s*GLOBAL ([\w.]+)", str(error))
        unsafe = [match.group(1)] if match else []
    if not unsafe:
        return None
    names = ", ".join(unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
    return (f"{path} would import {names} when loaded, which can run arbitrary code, so it was not loaded; if you "
            f"trust whoever made this file, re-run with --trust-checkpoint.")


def load(path, map_location="cpu", trusted=None):
    """torch.load of a file a user named, with weights_only=True unless trusted (see the module's docstring).

    One clear error for missing, truncated, foreign or unsafe files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if trusted if trusted is not None else TRUSTED:
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or foreign file?): "
                                  f"{type(e).__name__}.") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        message = _refusal(path, e)
        if message:
            raise CheckpointError(message) from None
        error = e
    except Exception as e:
        error = e
    raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or foreign file?): "
                          f"{type(error).__name__}.") from None


def _training_problem(ckpt):
    """The first way `ckpt` is not shaped like one of our training checkpoints, or None."""
    if not isinstance(ckpt.get("step"), int) or isinstance(ckpt.get("step"), bool) or ckpt["step"] < 0:
        return "its step is not a non-negative integer"
    model = ckpt.get("model")
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        return "its model is not a state dict of tensors"
    optimizer = ckpt.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list):
        return "its optimizer state is malformed"
    if not isinstance(ckpt.get("scaler", {}), dict):
        return "its gradient-scaler state is malformed"
    rng = ckpt.get("rng")
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) \
            or rng["torch"].dtype != torch.uint8 or not isinstance(rng.get("python"), tuple):
        return "its random-number-generator state is malformed"
    return None


def load_training(path, method):
    """Load one of our training checkpoints for resuming `method`, refusing anything else."""
    ckpt = load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "method" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint of this project.")
    if ckpt["method"] != method:
        name = ckpt["method"] if isinstance(ckpt["method"], str) and ckpt["method"].isidentifier() \
            else repr(ckpt["method"])[:60]
        raise CheckpointError(f"{path} is a {name} checkpoint; it cannot resume a {method} run "
                              f"(use another --output-dir).")
    problem = _training_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path} cannot be resumed: {problem} (delete it to resume from an earlier "
                              f"checkpoint, or use another --output-dir).")
    return ckpt


def load_model(model, state_dict, path):
    """model.load_state_dict(strict) with one clear error when the checkpoint does not fit."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"{path} does not fit this model (different --arch or head?): {detail}") from None


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])

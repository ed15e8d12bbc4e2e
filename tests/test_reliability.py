"""Reliability of the training scripts: preemption, NaN/Inf guard, corrupt data, dying ranks, bad input."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from common import checkpoint
from common.guard import EXIT_PREEMPTED, NonFiniteError, StepGuard
from tests.helpers import ROOT, free_port, metrics, run_script, script_env

SMALL = ["--arch", "resnet18", "--crops", "2x32", "--hidden-dim", "64", "--embedding-dim", "32", "--blur-p", "0",
         "--workers", "0", "--epochs", "3", "--warmup-epochs", "1", "--lr", "1.0", "--print-every", "1"]


def _popen(argv, env=None):
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=script_env(env))


def _wait_for_steps(output_dir, n, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = output_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("the run did not reach the expected step")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_checkpoints_exits_75_and_resumes_exactly(tmp_path, signum):
    data = ["--data", "cifar10-mini", "--data-fraction", "0.1", "--batch-size", "16", *SMALL, "--max-steps", "14"]
    run_script("simclr.py", *data, "--output-dir", tmp_path / "full")
    proc = _popen(["simclr.py", *data, "--output-dir", tmp_path / "preempted"])
    _wait_for_steps(tmp_path / "preempted", 3, proc)
    sent = time.time()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    seconds_to_exit = time.time() - sent
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "preempted by" in out and "re-run the same command" in out
    logged = [r["step"] for r in metrics(tmp_path / "preempted")]
    assert checkpoint.checkpoints(tmp_path / "preempted")[-1][0] == logged[-1]  # the step in flight was finished
    print(f"signal to exit: {seconds_to_exit:.2f} s (step {logged[-1]})")
    resumed = run_script("simclr.py", *data, "--output-dir", tmp_path / "preempted")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    after = {r["step"]: r["loss"] for r in metrics(tmp_path / "preempted")}
    assert full == after  # every step's loss is bit-identical to the uninterrupted run


def test_preemption_of_the_whole_job_with_loader_workers(tmp_path):
    """SLURM signals every process of a job, the loader's workers too: they ignore SIGTERM, so the main
    process still finishes its step, writes its checkpoint and exits 75 instead of failing on a dead worker."""
    data = ["--data", "cifar10-mini", "--data-fraction", "0.1", "--batch-size", "16", *SMALL, "--workers", "2",
            "--max-steps", "14"]
    proc = subprocess.Popen([sys.executable, "simclr.py", *map(str, data), "--output-dir", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(None),
                            start_new_session=True)
    _wait_for_steps(tmp_path, 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and its workers alike
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "preempted by SIGTERM" in out
    assert checkpoint.checkpoints(tmp_path)[-1][0] == [r["step"] for r in metrics(tmp_path)][-1]


def test_nan_loss_stops_with_pointer_to_last_checkpoint(tmp_path):
    data = ["--data", "cifar10-mini", "--data-fraction", "0.03", "--batch-size", "16", *SMALL]
    proc = run_script("simclr.py", *data, "--lr", "1e30", "--output-dir", tmp_path, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "became non-finite at step" in lines[0] and "nonfinite.jsonl" in lines[0]
    record = json.loads((tmp_path / "nonfinite.jsonl").read_text().splitlines()[0])
    assert record["what"] in ("loss", "gradient") and record["lr"] > 1e20 and len(record["inputs"]) == 2
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_nan_policy_skip_is_bounded(tmp_path):
    data = ["--data", "cifar10-mini", "--data-fraction", "0.03", "--batch-size", "16", *SMALL]
    proc = run_script("simclr.py", *data, "--lr", "1e30", "--nan-policy", "skip", "--max-nan-skips", "3",
                      "--output-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "3 batches were skipped already" in proc.stderr
    assert len((tmp_path / "nonfinite.jsonl").read_text().splitlines()) == 4


def test_non_finite_gradient_with_a_finite_loss_is_caught_before_the_step(tmp_path):
    """The gradient check on its own: a finite loss whose gradient is Inf/NaN never reaches the optimiser."""
    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.zeros(2, 3)
    model.bias.grad = torch.tensor([float("inf"), 0.0])
    loss, inputs = torch.tensor(0.5), (torch.randn(4, 3),)
    guard = StepGuard(tmp_path / "skip", nan_policy="skip", max_nan_skips=1, signals=())
    assert guard.finite_grads(model, 7, 0.1, loss, inputs) is False  # skipped: the caller does not step
    with pytest.raises(NonFiniteError, match=r"gradient became non-finite at step 8 .*checkpoint-00000006\.pth"):
        guard.finite_grads(model, 8, 0.1, loss, inputs, last_checkpoint=tmp_path / "checkpoint-00000006.pth")
    records = [json.loads(line) for line in (tmp_path / "skip" / "nonfinite.jsonl").read_text().splitlines()]
    assert [(r["step"], r["what"], r["loss"], r["grad_norm"]) for r in records] == \
        [(7, "gradient", 0.5, "inf"), (8, "gradient", 0.5, "inf")]
    assert records[0]["inputs"][0]["shape"] == [4, 3] and records[0]["lr"] == 0.1
    model.bias.grad = torch.tensor([float("nan"), 0.0])
    with pytest.raises(NonFiniteError, match="gradient became non-finite at step 9") as fp32:
        StepGuard(tmp_path / "stop", signals=()).finite_grads(model, 9, 0.1, loss)
    assert "lower --lr" in str(fp32.value) and "--precision" not in str(fp32.value)  # already fp32
    with pytest.raises(NonFiniteError, match="lower --lr or use --precision fp32"):
        StepGuard(tmp_path / "bf16", signals=(), precision="bf16").finite_grads(model, 9, 0.1, loss)
    model.bias.grad = torch.ones(2)
    assert StepGuard(tmp_path / "ok", signals=()).finite_grads(model, 10, 0.1, loss) is True


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint_and_the_run_resumes(tmp_path):
    """A full disk in the middle of a checkpoint write, made real with a file-size limit (RLIMIT_FSIZE: the
    write fails with EFBIG where a full disk gives ENOSPC): one sentence, exit 2, the previous checkpoint
    byte-for-byte intact, no temporary file left; the same command without the limit then resumes."""
    import resource
    data = ["--data", "cifar10-mini", "--data-fraction", "0.1", "--batch-size", "16", *SMALL, "--max-steps", "5"]
    out = tmp_path / "run"
    first = run_script("simclr.py", *data, "--output-dir", out, env={"SSL_TEST_FAULT": "TERM:3"}, check=False)
    assert first.returncode == EXIT_PREEMPTED, first.stderr
    (step, previous), = checkpoint.checkpoints(out)
    kept = previous.read_bytes()

    def limit_file_size(size=len(kept) // 2):
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    full_disk = run_script("simclr.py", *data, "--output-dir", out, check=False, preexec_fn=limit_file_size)
    lines = full_disk.stderr.strip().splitlines()
    assert full_disk.returncode == 2 and len(lines) == 1, full_disk.stderr
    assert f"writing {out / 'checkpoint-00000005.pth'} failed (File too large)" in lines[0]
    assert f"{previous} is intact" in lines[0] and "re-run the same command" in lines[0]
    assert checkpoint.checkpoints(out) == [(step, previous)] and previous.read_bytes() == kept
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    resumed = run_script("simclr.py", *data, "--output-dir", out)
    assert f"resumed from {previous}" in resumed.stdout and checkpoint.checkpoints(out)[-1][0] == 5


def _folder_with_bad_images(root, n_good, n_bad):
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
    for i in range(n_good):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.jpg")
    for i in range(n_bad):
        (root / f"c{i % 2}" / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff garbage" if i % 2 else b"")
    return root


def test_corrupt_images_are_skipped_logged_and_bounded(tmp_path):
    few_bad = _folder_with_bad_images(tmp_path / "few", 160, 1)
    ok = run_script("simclr.py", "--data", few_bad, "--batch-size", "16", *SMALL, "--max-steps", "10",
                    "--max-bad-fraction", "0.05", "--output-dir", tmp_path / "out1")
    assert "skipped unreadable image" in ok.stdout and "bad0.jpg" in ok.stdout
    assert metrics(tmp_path / "out1")[-1]["bad_images"] >= 1
    many_bad = _folder_with_bad_images(tmp_path / "many", 120, 40)
    proc = run_script("simclr.py", "--data", many_bad, "--batch-size", "16", *SMALL, "--max-steps", "10",
                      "--max-bad-fraction", "0.05", "--output-dir", tmp_path / "out2", check=False)
    assert proc.returncode == 2 and "--max-bad-fraction 0.05" in proc.stderr


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


@pytest.mark.distributed
def test_a_dying_rank_ends_the_run_promptly_and_the_restart_resumes(tmp_path):
    args = ["simclr.py", "--data", "cifar10-mini", "--data-fraction", "0.1", "--batch-size", "8", *SMALL,
            "--checkpoint-every", "2", "--output-dir", tmp_path]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SSL_DIST_TIMEOUT_MINUTES="1")
    proc = subprocess.Popen(torchrun + [f"--master_port={free_port()}", *args, "--max-steps", "60"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(tmp_path, 5, proc)
    workers = _children(proc.pid)
    assert len(workers) == 2
    killed = time.time()
    os.kill(workers[1], signal.SIGKILL)
    proc.communicate(timeout=180)
    seconds_to_exit = time.time() - killed
    assert proc.returncode != 0
    print(f"rank killed -> torchrun exited in {seconds_to_exit:.1f} s")
    last = checkpoint.checkpoints(tmp_path)[-1][0]
    assert last >= 4
    done = subprocess.run(torchrun + [f"--master_port={free_port()}", *args, "--max-steps", str(last + 2)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and checkpoint.checkpoints(tmp_path)[-1][0] == last + 2


# ----------------------------------------------------------------------------- the table of bad input (tests/bad_inputs.md)

EVAL_BASE = ["--weights", "random", "--arch", "resnet18", "--image-size", "32", "--workers", "0",
             "--train-data", "{images}", "--test-data", "{images}", "--output", "{out}/result.json"]


def table_of_bad_inputs():
    """(script, input, message) for every row of the table in tests/bad_inputs.md."""
    rows = []
    for line in (ROOT / "tests" / "bad_inputs.md").read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].endswith(".py"):
            rows.append(tuple(cells))
    return rows


BAD_INPUTS = table_of_bad_inputs()


def test_the_bad_input_table_covers_every_script():
    scripts = {script for script, _, _ in BAD_INPUTS}
    assert scripts == {"simclr.py", *(f"{m}.py" for m in GUARDED), "clusterfit.py", "eval_linear.py", "eval_knn.py",
                       "eval_svm.py"}
    assert len(BAD_INPUTS) >= 35  # the parser found the table


class Placeholders:
    """The files a row's `{name}` stands for, made on first use and shared by the rows of one test session."""

    def __init__(self, root):
        self.root, self.made = root, {}

    def __getitem__(self, name):
        if name not in self.made:
            self.made[name] = getattr(self, "_" + name.replace("-", "_"))(self.root / name)
        return self.made[name]

    def _empty_dir(self, path):
        path.mkdir()
        return path

    def _text_dir(self, path):
        (path / "cls").mkdir(parents=True)
        (path / "cls" / "notes.txt").write_text("not an image")
        return path

    def _file(self, path):
        path.write_text("a file where a directory should be")
        return path

    def _truncated(self, path):
        path.write_bytes(b"PK\x03\x04 not really a checkpoint")
        return path

    def _truncated_run(self, path):
        path.mkdir()
        (path / "checkpoint-00000001.pth").write_bytes(self["truncated"].read_bytes())
        return path

    def _resnet18(self, path):
        torch.save(torchvision.models.resnet18().state_dict(), path)
        return path

    def _list(self, path):
        torch.save([1, 2, 3], path)
        return path

    def _images(self, path):
        rng = np.random.default_rng(0)
        for c in range(2):
            (path / f"c{c}").mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path / f"c{c}" / f"{i}.jpg")
        return path

    def _unlabelled(self, path):
        path.write_text("".join(f"{p}\n" for p in sorted(self["images"].rglob("*.jpg"))))
        return path

    def _npid_run(self, path):
        run_script("npid.py", *_small_args("npid"), "--max-steps", "1", "--output-dir", path)
        return path

    def _jigsaw_run(self, path):
        run_script("jigsaw.py", *_small_args("jigsaw"), "--max-steps", "1", "--output-dir", path)
        return path


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    return Placeholders(tmp_path_factory.mktemp("bad-input"))


def _files(path):
    """(name, size, mtime) of every file under `path`."""
    if not path.is_dir():
        return []
    return sorted((p.relative_to(path), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("script,given,message", BAD_INPUTS, ids=[f"{s}:{g}" for s, g, _ in BAD_INPUTS])
def test_bad_input_table(tmp_path, placeholders, script, given, message):
    out = tmp_path / "out"
    base = EVAL_BASE if script.startswith("eval_") else [*_small_args(script[:-3]), "--max-steps", "1",
                                                         "--output-dir", "{out}"]
    fill = lambda arg: re.sub(r"\{([a-z0-9-]+)\}", lambda m: str(out if m[1] == "out" else placeholders[m[1]]), arg)
    argv = [fill(a) for a in [*base, *shlex.split(given)]]
    output_dirs = [Path(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "--output-dir"] or [out]
    before = _files(output_dirs[-1])
    proc = run_script(script, *argv, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("error: ") and len(lines) == 1 or \
        lines[0].startswith("usage: ") and lines[-1].startswith(f"{script}: error: "), proc.stderr  # argparse's
    at = 0
    for piece in message.split(" ... "):  # every piece of the excerpt, in order
        at = lines[-1].find(piece, at)
        assert at >= 0, (piece, lines[-1])
    assert _files(output_dirs[-1]) == before, "the failed run left files behind"


# ----------------------------------------------------------------------------- the same guards in every method script

GUARDED = ["moco", "swav", "deepcluster_v2", "npid", "pirl", "rotnet", "jigsaw", "barlow_twins", "vicreg", "byol", "simsiam",
           "mocov3", "dino", "virtex"]


def _small_args(method):
    import importlib

    return importlib.import_module(f"tests.test_{method}").SMALL


@pytest.mark.parametrize("method", GUARDED)
def test_every_script_stops_on_a_non_finite_loss(tmp_path, method):
    proc = run_script(f"{method}.py", *_small_args(method), "--lr", "1e30", "--max-steps", "6", "--workers", "0",
                      "--output-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "became non-finite at step" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "nonfinite.jsonl").exists()


# (max steps, the step during which SIGTERM arrives, extra flags): preempted mid-epoch, with the queue / memory
# bank in use. MoCo and NPID: 7 steps per epoch, the resumed run crosses the epoch boundary (and MoCo's queue of
# 4 batches wraps); SwAV's queue is used from the first step; DeepCluster-v2 after its second k-means (epoch 1
# starts at step 7); RotNet one random rotation per image (drawn from the batch's generator, applied batched).
PREEMPT = {"moco": (8, 3, []), "swav": (5, 3, ["--epoch-queue-starts", "0"]), "deepcluster_v2": (9, 8, []),
           "npid": (8, 3, []), "pirl": (5, 3, []), "rotnet": (5, 3, ["--rotations", "1"]), "jigsaw": (5, 3, []),
           "clusterfit": (5, 3, ["--weights", "{resnet18}"]), "barlow_twins": (5, 3, []), "vicreg": (5, 3, [])}


def _same_state(a, b, where="checkpoint"):
    """Bit-identical nested checkpoint contents (tensors, numbers, strings, RNG states)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("method", list(PREEMPT))
def test_every_script_preempted_by_sigterm_resumes_exactly(tmp_path, placeholders, method):
    """SIGTERM in step k: the step finishes, checkpoint-k is written, exit 75; the same command resumes and its
    losses, and its final checkpoint (weights, optimiser, RNG, queue / memory bank / pseudo-labels), equal an
    uninterrupted run's. With --gpu-aug on (views made batched by common.gpu_aug on the CPU here), so the
    batched path's per-batch generators (seeded by the epoch and the batch's first index) resume exactly too;
    each tests/test_<method>.py resumes the per-image --gpu-aug off path."""
    max_steps, signal_step, extra = PREEMPT[method]
    extra = [str(placeholders["resnet18"]) if a == "{resnet18}" else a for a in extra]
    args = [f"{method}.py", *_small_args(method), *extra, "--max-steps", max_steps, "--workers", "0",
            "--gpu-aug", "on"]
    full, preempted = tmp_path / "full", tmp_path / "preempted"
    full_run = run_script(*args, "--output-dir", full)
    assert "gpu-aug on" in full_run.stdout + full_run.stderr
    if method == "clusterfit":  # the train stage only: reuse the features and clusters of the uninterrupted run
        preempted.mkdir()
        for name in ("features.pth", "clusters.pth"):
            shutil.copy(full / name, preempted / name)
    proc = run_script(*args, "--output-dir", preempted, env={"SSL_TEST_FAULT": f"TERM:{signal_step}"}, check=False)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-2000:]
    assert "preempted by SIGTERM" in proc.stdout
    assert checkpoint.checkpoints(preempted)[-1][0] == metrics(preempted)[-1]["step"] == signal_step
    resumed = run_script(*args, "--output-dir", preempted)
    assert f"at step {signal_step}" in resumed.stdout
    record = lambda r: (r["step"], r["loss"], r["lr"])  # noqa: E731
    assert [record(r) for r in metrics(preempted)] == [record(r) for r in metrics(full)] != []
    (last_full, path_full), (last_resumed, path_resumed) = checkpoint.checkpoints(full)[-1], \
        checkpoint.checkpoints(preempted)[-1]
    assert last_full == last_resumed == max_steps
    state_full, state_resumed = checkpoint.load(path_full), checkpoint.load(path_resumed)
    for state in (state_full, state_resumed):
        state.pop("args")  # holds --output-dir
        # the scripts seed torch only; Python's `random` is drawn from solely inside the per-sample seeded
        # transforms (common.data.ViewDataset), so its state at start, and in a checkpoint, is arbitrary
        state["rng"].pop("python")
    _same_state(state_full, state_resumed)


@pytest.mark.distributed
def test_torchrun_elastic_restart_after_a_killed_rank_resumes_exactly(tmp_path):
    """Rank 1 SIGKILLs itself in step 5 (checkpoints every 2 steps): torchrun --max-restarts=1 restarts both
    workers, they resume from checkpoint 4 and finish with the uninterrupted 2-process run's losses."""
    args = ["simclr.py", "--data", "cifar10-mini", "--data-fraction", "0.03", "--batch-size", "8", *SMALL,
            "--checkpoint-every", "2", "--max-steps", "7"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
                "--master_addr=127.0.0.1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SSL_DIST_TIMEOUT_MINUTES="1")
    runs = {}
    for name, fault in (("full", None), ("killed", "KILL:5:1")):
        run_env = dict(env, SSL_TEST_FAULT=fault) if fault else env
        runs[name] = subprocess.run(torchrun + [f"--master_port={free_port()}", *args, "--output-dir", tmp_path / name],
                                    cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=600)
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    assert (tmp_path / "killed" / ".test-fault-done").exists()  # the fault did happen
    assert "resumed from" in runs["killed"].stdout and "resumed from" not in runs["full"].stdout
    logged = [(r["step"], r["loss"], r["lr"]) for r in metrics(tmp_path / "killed")]
    by_step = dict((step, (step, loss, lr)) for step, loss, lr in logged)
    assert set(logged) == set(by_step.values())  # a step logged before the kill and again after it: same loss
    assert sorted(by_step.values()) == [(r["step"], r["loss"], r["lr"]) for r in metrics(tmp_path / "full")]
    assert checkpoint.checkpoints(tmp_path / "killed")[-1][0] == 7

"""The online kNN monitor (--eval-every, common/knn.py): it reports what eval_knn's protocol gives on the same
images, and it does not change training (same losses, same weights and BatchNorm statistics, bit for bit)."""
import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from common import checkpoint, features
from common.knn import KnnMonitor, balanced_subset, default_held_out
from tests.helpers import run_script

TINY = ["--preset", "cpu", "--data", "cifar10-mini", "--data-fraction", "0.05", "--batch-size", "32", "--epochs", "2",
        "--workers", "1", "--print-every", "1"]
MONITOR = ["--eval-every", "0.34", "--eval-bank", "120", "--eval-size", "90"]  # 6 steps/epoch: every 2 steps


def records(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny SimCLR run with and without the monitor."""
    out = {}
    for name, extra in (("plain", []), ("monitored", MONITOR)):
        d = tmp_path_factory.mktemp(name)
        proc = run_script("simclr.py", *TINY, *extra, "--output-dir", d)
        out[name] = (d, proc.stdout)
    return out


def test_monitor_does_not_change_training(runs):
    plain, monitored = records(runs["plain"][0]), records(runs["monitored"][0])
    losses = [(r["step"], r["loss"]) for r in plain if "loss" in r]
    assert len(losses) == 12
    assert [(r["step"], r["loss"]) for r in monitored if "loss" in r] == losses  # the same floats, bit for bit
    a = torch.load(checkpoint.latest(runs["plain"][0]), map_location="cpu", weights_only=False)
    b = torch.load(checkpoint.latest(runs["monitored"][0]), map_location="cpu", weights_only=False)
    for key, value in a["model"].items():  # weights and BatchNorm running statistics
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_monitor_logs_every_n_epochs_and_at_the_end(runs):
    evals = [r for r in records(runs["monitored"][0]) if "knn_top1" in r]
    assert [r["step"] for r in evals] == [2, 4, 6, 8, 10, 12]
    assert all(0 <= r["knn_top1"] <= 100 and r["knn_top1"] <= r["knn_top5"] for r in evals)
    stdout = runs["monitored"][1]
    assert "online kNN (k=20, T=0.07, 32 px): 120 training images as the bank, 90 of cifar10-mini@test" in stdout
    assert stdout.count("knn_top1") == 6
    assert "knn_top1" not in runs["plain"][1]


def test_monitor_reports_what_the_protocol_gives_on_the_final_checkpoint(runs):
    """Re-scoring the final checkpoint's trunk on the same bank and held-out images gives the logged number."""
    last = [r for r in records(runs["monitored"][0]) if "knn_top1" in r][-1]
    trunk, _ = features.load_trunk(str(checkpoint.latest(runs["monitored"][0])))
    from common import data
    args = Namespace(eval_data="", data="cifar10-mini", eval_bank=120, eval_size=90, seed=0, batch_size=32, workers=1)
    train = data.subset(data.build_dataset("cifar10-mini", "train"), 0.05, 0)
    again = KnnMonitor(args, train, 32, torch.device("cpu"), "fp32")(trunk)
    assert again["knn_top1"] == last["knn_top1"] and again["knn_top5"] == last["knn_top5"]


@pytest.mark.parametrize("size", [32, 45, 72])  # as they are, upscaled, resized by 256/224 then cropped
def test_decoded_images_give_eval_knn_features_bit_for_bit(size, monkeypatch):
    """The monitor keeps the images as uint8 pixels after the first evaluation; its features are still exactly
    the eval transform's (features.extract, as eval_knn.py computes them), and above the size limit it decodes
    them at every evaluation with the same result."""
    from common import data, knn, models
    torch.manual_seed(0)
    trunk = models.build_trunk("resnet18", False).eval()
    args = Namespace(eval_data="", data="cifar10-mini", eval_bank=37, eval_size=23, seed=1, batch_size=16,
                     workers=0)
    train = data.build_dataset("cifar10-mini", "train")
    monitor = KnnMonitor(args, train, size, torch.device("cpu"), "fp32")
    first = monitor(trunk)
    assert set(monitor.decoded) == {"bank", "queries"}
    images, labels, indices = monitor.decoded["bank"]
    assert images.dtype == torch.uint8 and images.shape == (37, 3, size, size) and indices.tolist() == list(range(37))
    for which in ("bank", "queries"):
        got, got_y = monitor._features(trunk, which)
        want, want_y = features.extract(trunk, getattr(monitor, which), ("pooled",), features.eval_transform(size),
                                        batch_size=16, workers=0)
        assert torch.equal(got["pooled"], want["pooled"]) and torch.equal(got_y, want_y)
    n = len(monitor.bank) + len(monitor.queries)
    monkeypatch.setattr(knn, "CACHE_BYTES", 3 * size * size * (n - 1))  # one image short of both sets
    uncached = KnnMonitor(args, train, size, torch.device("cpu"), "fp32")
    assert uncached.decoded is None
    again = uncached(trunk)
    assert (again["knn_top1"], again["knn_top5"]) == (first["knn_top1"], first["knn_top5"])
    assert monitor(trunk)["knn_top1"] == first["knn_top1"]


def test_balanced_subset_is_seeded_and_balanced():
    from common import data
    train = data.build_dataset("cifar10-mini", "train")
    a, b = balanced_subset(train, 100, 0), balanced_subset(train, 100, 0)
    assert a.indices == b.indices and len(a) == 100
    counts = torch.bincount(torch.tensor(data.labels_of(a)), minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11
    assert balanced_subset(train, 10_000, 0) is train


def test_default_held_out(tmp_path):
    assert default_held_out("cifar10-mini") == "cifar10-mini@test"
    (tmp_path / "root" / "train").mkdir(parents=True)
    assert default_held_out(str(tmp_path / "root")) is None
    (tmp_path / "root" / "val").mkdir()
    assert default_held_out(str(tmp_path / "root")) == str(tmp_path / "root" / "val")
    assert default_held_out(str(tmp_path / "root" / "train")) == str(tmp_path / "root" / "val")
    assert default_held_out(str(tmp_path / "list.txt")) is None


def test_monitor_without_held_out_images_says_what_to_pass(tmp_path):
    from PIL import Image
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (40, 40), (i * 10, 0, 0)).save(tmp_path / "imgs" / c / f"{i}.jpg")
    proc = run_script("simclr.py", "--preset", "cpu", "--data", tmp_path / "imgs", "--batch-size", "8",
                      "--epochs", "1", "--workers", "0", "--eval-every", "1", "--output-dir", tmp_path / "out",
                      check=False)
    assert proc.returncode != 0
    assert "--eval-every needs labelled held-out images" in proc.stderr and "--eval-data" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_of_a_monitored_run(runs, tmp_path):
    d = runs["monitored"][0]
    last = [r for r in records(d) if "knn_top1" in r][-1]["knn_top1"]
    run_script("-m", "common.report", d, "--out", tmp_path / "r.md")
    row = [line for line in (tmp_path / "r.md").read_text().splitlines() if line.startswith(f"| {Path(d).name} ")][0]
    assert "| simclr | 2/2 | 12 |" in row and f"| {last:.2f} |" in row
    assert (tmp_path / "r_knn_top1.png").is_file()


def test_monitor_on_two_processes_matches_one(tmp_path):
    """Under torchrun (2 processes, gloo) the images are split between the ranks: the same number as one process
    scoring the same checkpoint."""
    from tests.helpers import run_torchrun
    d = tmp_path / "run"
    run_torchrun(2, "simclr.py", "--preset", "cpu", "--data", "cifar10-mini", "--data-fraction", "0.05",
                 "--batch-size", "16", "--epochs", "1", "--max-steps", "4", "--eval-every", "0.3", "--eval-bank", "100",
                 "--eval-size", "100", "--workers", "0", "--output-dir", d)
    evals = [r for r in records(d) if "knn_top1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    trunk, _ = features.load_trunk(str(checkpoint.latest(d)))
    from common import data
    args = Namespace(eval_data="", data="cifar10-mini", eval_bank=100, eval_size=100, seed=0, batch_size=16, workers=0)
    train = data.subset(data.build_dataset("cifar10-mini", "train"), 0.05, 0)
    again = KnnMonitor(args, train, 32, torch.device("cpu"), "fp32")(trunk)
    assert again["knn_top1"] == evals[-1]["knn_top1"] and again["knn_top5"] == evals[-1]["knn_top5"]

"""clusterfit.py: each stage's output, skipping finished stages, exact resume, distributed k-means, bad input."""
import math
import shutil

import torch
import torchvision

import clusterfit
from common import augment, cli, data, features, ops, optim
from tests.helpers import metrics, run_script, run_torchrun

SMALL = ["--preset", "cifar", "--no-cifar-stem", "--data", "cifar10-mini", "--data-fraction", "0.01",
         "--weights-arch", "resnet18", "--num-clusters", "5", "--kmeans-iters", "10", "--batch-size", "16",
         "--workers", "0", "--epochs", "3", "--warmup-epochs", "1", "--print-every", "1"]


def foreign_weights(tmp_path):
    """A plain torchvision ResNet-18 state dict, as a foreign pretrained network."""
    torch.manual_seed(1)
    path = tmp_path / "torchvision_resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_stages_write_their_outputs_and_skip_when_done(tmp_path):
    weights = foreign_weights(tmp_path)
    out = tmp_path / "run"
    run_script("clusterfit.py", *SMALL, "--weights", weights, "--output-dir", out, "--stage", "extract")
    assert not (out / "clusters.pth").exists()
    saved = torch.load(out / "features.pth", weights_only=False)
    trunk, _ = features.load_trunk(str(weights), "resnet18", False)
    dataset = data.subset(data.build_dataset("cifar10-mini", "train"), 0.01, 0)
    expected, labels = features.extract(trunk, dataset, ["pooled"], features.eval_transform(32), workers=0)
    torch.testing.assert_close(saved["features"], expected["pooled"])
    assert torch.equal(saved["labels"], labels) and saved["features"].shape == (40, 512)

    run_script("clusterfit.py", *SMALL, "--weights", weights, "--output-dir", out, "--stage", "cluster")
    clusters = torch.load(out / "clusters.pth", weights_only=False)
    # the default --kmeans l2norm-euclidean: VISSL's rows / (|row| + 1e-5), then Euclidean k-means
    normalised = saved["features"] / (saved["features"].norm(dim=1, keepdim=True) + 1e-5)
    centroids, assignments = ops.kmeans(normalised, 5, n_iters=10, spherical=False, seed=0)
    assert clusters["kmeans"] == "l2norm-euclidean"
    assert torch.equal(clusters["assignments"], assignments)
    torch.testing.assert_close(clusters["centroids"], centroids)

    run_script("clusterfit.py", *SMALL, "--output-dir", out, "--stage", "train", "--max-steps", "2")
    again = run_script("clusterfit.py", *SMALL, "--weights", weights, "--output-dir", out, "--max-steps", "3")
    assert "features.pth exists, skipping" in again.stdout and "clusters.pth exists, skipping" in again.stdout
    assert "resumed from" in again.stdout
    ckpt = torch.load(out / "checkpoint-00000003.pth", weights_only=False)
    assert ckpt["method"] == "clusterfit" and ckpt["step"] == 3
    assert torch.equal(ckpt["pseudo_labels"], assignments)
    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])


def test_interrupted_training_resumes_exactly(tmp_path):
    weights = foreign_weights(tmp_path)
    run_script("clusterfit.py", *SMALL, "--weights", weights, "--output-dir", tmp_path / "full", "--max-steps", "5")
    (tmp_path / "split").mkdir()
    for name in ("features.pth", "clusters.pth"):
        shutil.copy(tmp_path / "full" / name, tmp_path / "split" / name)
    run_script("clusterfit.py", *SMALL, "--output-dir", tmp_path / "split", "--max-steps", "3")
    resumed = run_script("clusterfit.py", *SMALL, "--output-dir", tmp_path / "split", "--max-steps", "5")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == [1, 2, 3, 4, 5]
    assert full == split  # bit-identical losses, across the epoch boundaries at steps 2 and 4


def test_two_rank_clustering_equals_one_process(tmp_path):
    weights = foreign_weights(tmp_path)
    run_script("clusterfit.py", *SMALL, "--weights", weights, "--output-dir", tmp_path / "one", "--stage", "extract")
    run_script("clusterfit.py", *SMALL, "--output-dir", tmp_path / "one", "--stage", "cluster")
    (tmp_path / "two").mkdir()
    shutil.copy(tmp_path / "one" / "features.pth", tmp_path / "two" / "features.pth")
    run_torchrun(2, "clusterfit.py", *SMALL, "--device", "cpu", "--output-dir", tmp_path / "two", "--stage", "cluster")
    one = torch.load(tmp_path / "one" / "clusters.pth", weights_only=False)
    two = torch.load(tmp_path / "two" / "clusters.pth", weights_only=False)
    assert torch.equal(one["assignments"], two["assignments"])  # rows in dataset order, from both ranks
    torch.testing.assert_close(one["centroids"], two["centroids"], rtol=1e-5, atol=1e-6)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    args = cli.parse_args(clusterfit.Args, clusterfit.PRESETS, ["--preset", "cifar", "--no-cifar-stem",
                                                                "--num-clusters", "10"])
    model = clusterfit.ClusterFitNet(args)
    images = data.ViewDataset(data.build_dataset("cifar10-mini", "train"),
                              augment.PerImage(clusterfit.view_recipe(args)), seed=0)
    batch = data.collate([images[(0, i)] for i in range(0, 4000, 125)])[0][0]  # 32 images, one view
    pseudo_labels = torch.arange(32) % 10
    optimizer = torch.optim.SGD(optim.decay_all_but_norm(model, 1e-4), lr=0.05, momentum=0.9)
    losses = []
    model.train()
    for _ in range(12):
        loss = clusterfit.pseudo_label_loss(model(batch), pseudo_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # starts near log 10 = 2.30


def test_vissl_warmup_ramp_then_steps():
    """VISSL's auto-scaled schedule: a 5-epoch ramp from the 256-image lr to the scaled one (none at 256 images
    or fewer), then x0.1 at epochs 30/60/90/100; an explicit --warmup-start is a fraction of the peak."""
    args = cli.parse_args(clusterfit.Args, None, [])
    epochs = (0, 2.5, 5, 29, 30, 100)
    for peak, want in [(0.1, [0.1, 0.1, 0.1, 0.1, 0.01, 1e-5]), (0.0125, [0.0125, 0.0125, 0.0125, 0.0125, 0.00125,
                                                                          1.25e-6]),
                       (0.4, [0.1, 0.25, 0.4, 0.4, 0.04, 4e-5])]:  # batch 256, 32, 1024
        lr = [clusterfit.learning_rate(round(e * 10), 10, 1050, peak, args) for e in epochs]
        for got, expected in zip(lr, want):
            assert math.isclose(got, expected, rel_tol=1e-12), (peak, lr)
    args = cli.parse_args(clusterfit.Args, None, ["--warmup-start", "0.25"])
    lr = [clusterfit.learning_rate(round(e * 10), 10, 1050, 0.4, args) for e in epochs[:3]]
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(lr, [0.1, 0.25, 0.4])), lr


def test_bad_inputs_get_one_sentence_and_nonzero_exit(tmp_path):
    weights = foreign_weights(tmp_path)
    cases = [
        (["--stage", "extract"], "--weights is required"),
        (["--stage", "train"], "run the cluster stage first"),
        (["--weights", str(weights), "--weights-arch", "resnet50"], "does not load into resnet50"),
        (["--weights", str(weights), "--num-clusters", "41"], "more than the 40 training images"),
    ]
    for i, (extra, message) in enumerate(cases):
        if i == 3:  # the failed stages before this one left no output behind
            assert not (tmp_path / "x" / "features.pth").exists()
        proc = run_script("clusterfit.py", *SMALL, "--output-dir", tmp_path / "x", *extra, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr

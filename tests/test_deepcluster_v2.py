"""deepcluster_v2.py: the loss against the plain formula, clustering of the memory bank, learning on
a fixed batch, 2 ranks = 1 process (distributed k-means and the step), exact resume, bad input."""
import math

import torch
import torchvision

import deepcluster_v2 as dc
from common import augment, cli, data, ops, optim
from tests.helpers import metrics, run_script, run_torchrun

SMALL = ["--data", "cifar10-mini", "--data-fraction", "0.03", "--arch", "resnet18", "--crops", "2x32,2x16",
         "--batch-size", "16", "--hidden-dim", "64", "--embedding-dim", "32", "--num-clusters", "10", "12",
         "--blur-p", "0", "--workers", "0", "--epochs", "3", "--warmup-epochs", "1", "--print-every", "1"]


def tiny_args(*extra):
    return cli.parse_args(dc.Args, dc.PRESETS, ["--arch", "resnet18", "--hidden-dim", "32", "--embedding-dim", "8",
                                                 *extra])


def test_loss_is_the_mean_cross_entropy_of_every_crop_against_its_image_cluster():
    torch.manual_seed(0)
    n, n_crops = 5, 3
    scores = [torch.randn(n_crops * n, k, dtype=torch.float64) for k in (4, 6)]
    targets = torch.tensor([[0, 3, 1, dc.IGNORE, 2], [5, 0, 0, 1, dc.IGNORE]])
    expected = 0.0
    for s, t in zip(scores, targets):
        terms = [torch.logsumexp(s[c * n + i] / 0.1, 0) - s[c * n + i, t[i]] / 0.1
                 for c in range(n_crops) for i in range(n) if t[i] != dc.IGNORE]
        expected += sum(terms) / len(terms)
    torch.testing.assert_close(dc.deepcluster_loss(scores, targets, n_crops, 0.1), expected / 2)
    # a batch of images that no process held last epoch contributes nothing, not NaN
    nothing = dc.deepcluster_loss(scores, torch.full_like(targets, dc.IGNORE), n_crops, 0.1)
    assert nothing.item() == 0.0


def test_cluster_memory_sets_prototypes_to_centroids_and_labels_every_banked_image():
    torch.manual_seed(0)
    model = dc.DeepClusterV2(tiny_args("--num-clusters", "3", "4", "5", "--crops-for-mb", "0", "1"))
    bank = torch.nn.functional.normalize(torch.randn(2, 30, 8), dim=2)
    indices = torch.randperm(40)[:30]
    labels = dc.cluster_memory(model, bank, indices, 40, 10, seed=7)
    assert labels.shape == (3, 40)
    missing = torch.ones(40, dtype=torch.bool)
    missing[indices] = False
    assert (labels[:, missing] == dc.IGNORE).all() and (labels[:, indices] >= 0).all()
    for h, k in enumerate((3, 4, 5)):
        centroids, assignments = ops.kmeans(bank[h % 2], k, 10, spherical=True, init="random", seed=7 + h)
        torch.testing.assert_close(model.prototypes[h].weight, centroids)
        assert torch.equal(labels[h, indices], assignments)
    assert not any(p.requires_grad for p in model.prototypes.parameters())


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    args = tiny_args("--preset", "cifar", "--no-cifar-stem", "--hidden-dim", "128", "--embedding-dim", "32",
                     "--num-clusters", "8", "8", "--crops", "2x32,2x16")
    model = dc.DeepClusterV2(args)
    base = data.build_dataset("cifar10-mini", "train")
    views = data.ViewDataset(base, augment.PerImage(dc.view_recipe(args)), seed=0)
    crops, _, indices, _ = data.collate([views[(0, i)] for i in range(0, 4000, 125)])  # 32 images, 4 crops
    model.train()
    with torch.no_grad():
        bank = model(crops[:1])[0][None]
    labels = dc.cluster_memory(model, bank, indices, 4000, 10, seed=0)
    opt = optim.LARS(optim.param_groups(model, 1e-6, exclude_bias_and_norm=False), lr=1.0, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = dc.deepcluster_loss(model(crops)[1], labels[:, indices], 4, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses


def test_two_ranks_equal_one_process_kmeans_and_step(tmp_path):
    """Distributed k-means over the two halves of the bank = k-means of the whole bank; then the same step."""
    out = tmp_path / "dist.pt"
    run_torchrun(2, "tests/workers/dist_deepcluster_v2_worker.py", out)
    saved = torch.load(out, weights_only=False)
    args = cli.parse_args(dc.Args, None, ["--arch", "resnet18", "--hidden-dim", "64", "--embedding-dim", "16",
                                          "--num-clusters", "5", "7", "--crops", "2x32,1x16"])
    model = dc.DeepClusterV2(args).double()
    model.load_state_dict(saved["initial"])
    labels = dc.cluster_memory(model, saved["bank"], saved["bank_indices"], saved["n_images"], 10, seed=5)
    assert torch.equal(saved["labels"], labels)
    for h, head in enumerate(model.prototypes):
        torch.testing.assert_close(saved["centroids"][h], head.weight, rtol=1e-10, atol=1e-12)
    n, world, crops, idx = saved["n_per_rank"], saved["world_size"], saved["crops"], saved["batch_indices"]
    # per-rank BatchNorm (no SyncBN on CPU): each rank's half through the model, the mean of the two losses
    loss = sum(dc.deepcluster_loss(model([c[r * n:(r + 1) * n] for c in crops])[1], labels[:, idx[r * n:(r + 1) * n]],
                                   len(crops), 0.1) for r in range(world)) / world
    loss.backward()
    torch.testing.assert_close(saved["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-8, atol=1e-11, msg=name)


def test_interrupted_run_resumes_exactly_across_a_clustering(tmp_path):
    run_script("deepcluster_v2.py", *SMALL, "--output-dir", tmp_path / "full", "--max-steps", "16")
    run_script("deepcluster_v2.py", *SMALL, "--output-dir", tmp_path / "split", "--max-steps", "10")
    resumed = run_script("deepcluster_v2.py", *SMALL, "--output-dir", tmp_path / "split", "--max-steps", "16")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == list(range(1, 17))
    assert full == split  # bit-identical, mid-epoch 1 (restored labels) and after epoch 2's k-means (restored bank)
    lrs = {r["step"]: r["lr"] for r in metrics(tmp_path / "full")}  # warmup: np.linspace(start, peak, 7 steps)
    assert lrs[1] < lrs[7] == lrs[8] == max(lrs.values()) and lrs[16] < lrs[8]
    ckpt = torch.load(tmp_path / "split" / "checkpoint-00000016.pth", weights_only=False)
    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])
    assert ckpt["method"] == "deepcluster_v2" and ckpt["bank"].shape == (2, 112, 32)  # crops 0 and 1
    assert ckpt["labels"].shape == (2, 120) and (ckpt["labels"] != dc.IGNORE).sum(dim=1).tolist() == [112, 112]
    torch.testing.assert_close(ckpt["model"]["prototypes.1.weight"].norm(dim=1), torch.ones(12))


def test_bad_inputs_get_one_sentence_and_nonzero_exit(tmp_path):
    # the bad-input table (tests/bad_inputs.md, run by tests/test_reliability.py) has this script's other rows
    cases = [
        (["--num-clusters", "0"], "--num-clusters must be positive"),
    ]
    for extra, message in cases:
        proc = run_script("deepcluster_v2.py", *SMALL, "--output-dir", tmp_path / "x", *extra, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_exclude_bias_and_norm_moves_biases_and_bn_to_a_plain_sgd_group(tmp_path):
    """Default: LARC on every parameter (the swav repository); the flag: SimCLR's groups (plain SGD, no decay)."""
    for flag, plain_params in (([], 0), (["--exclude-bias-and-norm"], 1)):
        run_script("deepcluster_v2.py", *SMALL, "--max-steps", "1", "--output-dir", tmp_path / str(plain_params), *flag)
        state = torch.load(next((tmp_path / str(plain_params)).glob("checkpoint-*.pth")), weights_only=False)
        decayed, plain = state["optimizer"]["param_groups"]
        assert decayed["lars"] and decayed["weight_decay"] > 0
        assert not plain["lars"] and plain["weight_decay"] == 0.0
        assert (len(plain["params"]) > 0) == bool(plain_params), (flag, len(plain["params"]))

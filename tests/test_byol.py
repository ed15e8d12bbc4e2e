"""byol.py: the loss and the target update against the paper's formulas in float64, 2 processes against 1,
learning on a fixed batch, exact resume, bad input."""
import math

import pytest
import torch

import byol
from common import augment, cli, data, optim
from tests.helpers import metrics, run_script, run_torchrun

SMALL = ["--data", "cifar10-mini", "--data-fraction", "0.03", "--arch", "resnet18", "--image-size", "32",
         "--batch-size", "16", "--hidden-dim", "64", "--embedding-dim", "32", "--workers", "0", "--epochs", "2",
         "--warmup-epochs", "1", "--lr", "1.0", "--print-every", "1"]


def naive_byol_loss(p1, p2, z1, z2):
    """Eq. 2 and 4, one image at a time, float64: sum over both directions of
    |q/|q| - z'/|z'||^2 = 2 - 2 cos(q, z'), averaged over the images (BYOL's l2_normalize: |x| floored at 1e-6)."""
    def unit(x):
        return x / torch.sqrt(torch.clamp((x * x).sum(), min=1e-12))

    total = 0.0
    for i in range(len(p1)):
        total = total + ((unit(p1[i]) - unit(z2[i])) ** 2).sum() + ((unit(p2[i]) - unit(z1[i])) ** 2).sum()
    return total / len(p1)


@pytest.mark.parametrize("scale", [1.0, 1e-5, 1e6])
def test_loss_and_gradients_equal_the_paper_formula(scale):
    gen = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = [(torch.randn(7, 5, generator=gen, dtype=torch.float64) * scale).requires_grad_()
                      for _ in range(4)]
    ours = byol.byol_loss([p1, p2], [z1, z2])
    ours_grads = torch.autograd.grad(ours, [p1, p2, z1, z2], allow_unused=True)
    q1, q2 = p1.detach().clone().requires_grad_(), p2.detach().clone().requires_grad_()
    expected = naive_byol_loss(q1, q2, z1.detach(), z2.detach())
    expected_grads = torch.autograd.grad(expected, [q1, q2])
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours_grads[:2], expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 / scale)
    assert ours_grads[2] is None and ours_grads[3] is None  # the target side gets no gradient
    # the loss is 0 when each prediction points where the other view's projection does, 8 when opposite
    torch.testing.assert_close(byol.byol_loss([z2 * 3, z1 * 0.5], [z1, z2]), torch.tensor(0.0, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(byol.byol_loss([-z2, -z1], [z1, z2]), torch.tensor(8.0, dtype=torch.float64))


def test_target_is_the_moving_average_with_the_cosine_rate():
    assert byol.target_tau(0, 1000, 0.996) == 0.996
    assert byol.target_tau(1000, 1000, 0.996) == 1.0
    assert math.isclose(byol.target_tau(500, 1000, 0.996), 1 - 0.004 / 2, rel_tol=1e-15)
    assert math.isclose(byol.target_tau(250, 1000, 0.99), 1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2, rel_tol=1e-15)
    args = cli.parse_args(byol.Args, None, ["--arch", "resnet18", "--hidden-dim", "16", "--embedding-dim", "8"])
    torch.manual_seed(0)
    model = byol.BYOL(args).double()
    # byol_experiment.py initialises the target from its own random key: same shapes, other values
    pairs = list(zip(model.target.parameters(), model.online.parameters()))
    assert all(a.shape == b.shape for a, b in pairs) and all(not torch.equal(a, b) for a, b in pairs if a.dim() > 1)
    assert not any(p.requires_grad for p in model.target.parameters())
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target.parameters()]
    model.update_target(0.9)
    for xi, old, theta in zip(model.target.parameters(), before, model.online.parameters()):
        torch.testing.assert_close(xi, 0.9 * old + 0.1 * theta, rtol=1e-14, atol=1e-14)


def test_predictor_runs_at_its_own_rate():
    """--predictor-lr-scale multiplies the predictor's rate only; every trainable parameter is in exactly one group,
    weights decayed and adapted, biases and BatchNorm parameters neither; the default is the paper's single rate."""
    for scale in (1.0, 30.0):
        args = cli.parse_args(byol.Args, None, ["--arch", "resnet18", "--hidden-dim", "16", "--embedding-dim", "8",
                                                "--predictor-lr-scale", str(scale)])
        model = byol.BYOL(args)
        optimizer = byol.build_optimizer(model, args)
        optim.set_lr(optimizer, 0.1)
        predictor = {id(p) for p in model.predictor.parameters()}
        seen = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                seen.append(id(p))
                assert group["lr"] == pytest.approx(0.1 * scale if id(p) in predictor else 0.1, rel=1e-15)
                assert group["lars"] == (p.ndim > 1)
                assert group["weight_decay"] == (args.weight_decay if p.ndim > 1 else 0.0)
        assert sorted(seen) == sorted(id(p) for p in model.parameters() if p.requires_grad)
        assert predictor <= set(seen) and not {id(p) for p in model.target.parameters()} & set(seen)


def test_asymmetric_views():
    args = cli.parse_args(byol.Args, None, [])
    (n1, v1), (n2, v2) = byol.view_recipe(args)
    assert (n1, n2) == (1, 1) and v1.size == 224 and v1.interpolation == "bicubic" and v1.kernel_size == 23
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    assert v1.jitter == v2.jitter == (0.4, 0.4, 0.2, 0.1) and v1.jitter_p == 0.8 and v1.grayscale_p == 0.2


def test_two_processes_equal_one_on_the_global_batch(tmp_path):
    out = tmp_path / "byol.pt"
    run_torchrun(2, "tests/workers/dist_siamese_worker.py", "byol", out)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    saved = ranks[0]
    args = cli.parse_args(byol.Args, None, ["--arch", "resnet18", "--hidden-dim", "32", "--embedding-dim", "16"])
    model = byol.BYOL(args).double()
    model.load_state_dict(saved["initial"])
    n = saved["n_per_rank"]
    # without SyncBN each rank normalises its own half; the loss is the mean over all images
    losses = [byol.byol_loss(*model([v[r * n:(r + 1) * n] for v in saved["views"]])) for r in range(2)]
    loss = sum(losses) / 2
    loss.backward()
    torch.testing.assert_close(saved["loss"], loss.detach(), rtol=1e-12, atol=1e-14)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    optimizer = byol.build_optimizer(model, args)
    optim.set_lr(optimizer, 0.5)
    optimizer.step()
    model.update_target(0.9)
    for name, p in model.named_parameters():  # online, predictor and target weights after the step
        for rank in ranks:
            torch.testing.assert_close(rank["after"][name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    args = cli.parse_args(byol.Args, byol.PRESETS, ["--preset", "cpu", "--hidden-dim", "128", "--embedding-dim", "32"])
    model = byol.BYOL(args)
    base = data.build_dataset("cifar10-mini", "train")
    views = data.ViewDataset(base, augment.PerImage(byol.view_recipe(args)), seed=0)
    batch = data.collate([views[(0, i)] for i in range(0, 4000, 125)])[0]  # 32 images, 2 views
    optimizer = byol.build_optimizer(model, args)
    optim.set_lr(optimizer, 1.0)
    losses = []
    model.train()
    for step in range(15):
        loss = byol.byol_loss(*model(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_target(byol.target_tau(step, 15, 0.99))
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("gpu_aug", ["off", "on"])  # per-image PIL views / batched views on the device
def test_interrupted_run_resumes_exactly(tmp_path, gpu_aug):
    small = [*SMALL, "--gpu-aug", gpu_aug]
    run_script("byol.py", *small, "--output-dir", tmp_path / "full", "--max-steps", "9")
    run_script("byol.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "4")
    resumed = run_script("byol.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "9")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == list(range(1, 10))
    assert full == split  # bit-identical losses, across the epoch boundary at step 7 (the target resumed too)
    ckpt = torch.load(tmp_path / "split" / "checkpoint-00000009.pth", weights_only=False)
    import torchvision

    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])
    assert ckpt["method"] == "byol" and ckpt["step"] == 9
    assert any(k.startswith("target.") for k in ckpt["model"])

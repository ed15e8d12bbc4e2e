"""barlow_twins.py: the loss against the paper's formula, the original's schedule and parameter groups, learning on a
fixed batch, exact resume, two processes equal to one, bad input."""
import math

import pytest
import torch

import barlow_twins
from common import augment, cli, data
from tests.helpers import metrics, run_script, run_torchrun

SMALL = ["--data", "cifar10-mini", "--data-fraction", "0.03", "--arch", "resnet18", "--image-size", "32",
         "--batch-size", "16", "--projector", "64", "64", "--workers", "0", "--epochs", "2", "--warmup-epochs", "1",
         "--lr", "0.2", "--print-every", "1"]


def naive_barlow_twins(z1, z2, lambd):
    """Eq. 1-2 of the paper, one entry at a time, float64: each dimension standardised over the batch (mean, biased
    variance, eps 1e-5: a BatchNorm without affine parameters), C_ij = sum_b z1_bi z2_bj / N, then
    sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2."""
    n, d = z1.shape

    def standardised(z):
        columns = []
        for j in range(d):
            mean = sum(z[b, j] for b in range(n)) / n
            variance = sum((z[b, j] - mean) ** 2 for b in range(n)) / n
            columns.append([(z[b, j] - mean) / torch.sqrt(variance + 1e-5) for b in range(n)])
        return columns  # columns[j][b]

    a, b_ = standardised(z1), standardised(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[i][b] * b_[j][b] for b in range(n)) / n
            loss = loss + ((1 - c) ** 2 if i == j else lambd * c ** 2)
    return loss


def _cases():
    g = torch.Generator().manual_seed(0)
    n, d = 7, 5
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    other = torch.randn(n, d, generator=g, dtype=torch.float64)
    constant = other.clone()
    constant[:, 2] = 3.0  # a dimension with zero variance: only eps keeps it finite
    return {
        "random": (z, other),
        "nearly-invariant": (z, z + 1e-3 * other),  # C near its fixed point on the diagonal
        "large-and-offset": (1e4 + 1e3 * z, -5e3 + 2e2 * other),
        "tiny": (1e-4 * z, 1e-4 * other),  # variance far below eps
        "constant-dimension": (z, constant),
        "two-images": (z[:2], other[:2]),
    }


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("lambd", [0.0051, 1.0])
def test_loss_and_gradients_equal_the_papers_formula(case, lambd):
    z1, z2 = _cases()[case]
    ours = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    ref = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    loss, on_diag, off_diag = barlow_twins.barlow_twins_loss(*ours, lambd)
    expected = naive_barlow_twins(*ref, lambd)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(on_diag + lambd * off_diag, loss, rtol=1e-12, atol=1e-12)
    loss.backward()
    expected.backward()
    for mine, theirs in zip(ours, ref):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-8, atol=1e-10)


def test_standardisation_is_batchnorm_without_affine_parameters():
    z = torch.randn(9, 6, dtype=torch.float64) * 3 + 1
    bn = torch.nn.BatchNorm1d(6, affine=False).double().train()
    torch.testing.assert_close(barlow_twins.standardise(z, 9), bn(z), rtol=1e-12, atol=1e-12)


def test_projector_and_parameter_groups_are_the_originals():
    args = cli.parse_args(barlow_twins.Args, barlow_twins.PRESETS, ["--arch", "resnet18", "--projector", "32", "16"])
    model = barlow_twins.BarlowTwins(args)
    linear = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias) for m in linear] == [(512, 32, None), (32, 16, None)]
    assert [type(m).__name__ for m in model.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(not b.bn2.weight.detach().any() for b in model.trunk.layer1)  # zero_init_residual (BasicBlock)
    weights, biases = barlow_twins.build_optimizer(model, args).param_groups
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert len(weights["params"]) + len(biases["params"]) == len(list(model.parameters()))
    assert (weights["weight_decay"], weights["lars"], weights["decayed_norm"]) == (1.5e-6, True, True)
    assert (biases["weight_decay"], biases["lars"]) == (0.0, False)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    args = cli.parse_args(barlow_twins.Args, barlow_twins.PRESETS,
                          ["--arch", "resnet18", "--image-size", "32", "--projector", "128", "128"])
    model = barlow_twins.BarlowTwins(args)
    base = data.build_dataset("cifar10-mini", "train")
    views = data.ViewDataset(base, augment.PerImage(barlow_twins.view_recipe(args)), seed=0)
    batch = data.collate([views[(0, i)] for i in range(0, 4000, 125)])[0]  # 32 images, 2 views
    opt = barlow_twins.build_optimizer(model, args)
    for group, lr in zip(opt.param_groups, (0.4, 0.01)):
        group["lr"] = lr
    losses = []
    model.train()
    for _ in range(12):
        loss = barlow_twins.barlow_twins_loss(*model(batch), args.lambd)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def original_lr(step, steps_per_epoch, epochs, batch, base, warmup_epochs=10, final=0.001):
    """facebookresearch/barlowtwins main.py's adjust_learning_rate at 0-based `step`, for one group's `base` lr."""
    max_steps, warmup_steps, scale = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, batch / 256
    if step < warmup_steps:
        return base * scale * step / warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (max_steps - warmup_steps)))
    return base * (scale * q + scale * final * (1 - q))


@pytest.mark.parametrize("gpu_aug", ["off", "on"])  # per-image PIL views / batched views on the device
def test_interrupted_run_resumes_exactly(tmp_path, gpu_aug):
    # 40 images, 2 steps per epoch, 6 in all: the split run stops mid-epoch (step 3)
    small = [*SMALL, "--data-fraction", "0.01", "--epochs", "3", "--gpu-aug", gpu_aug]
    run_script("barlow_twins.py", *small, "--output-dir", tmp_path / "full", "--max-steps", "5")
    run_script("barlow_twins.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "3")
    resumed = run_script("barlow_twins.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "5")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: (r["loss"], r["lr"], r["lr_biases"]) for r in metrics(tmp_path / "full")}
    split = {r["step"]: (r["loss"], r["lr"], r["lr_biases"]) for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == [1, 2, 3, 4, 5]
    assert full == split  # bit-identical losses, across two epoch boundaries
    for step, (_, lr, lr_biases) in full.items():  # the original's schedule, warmup 1 epoch here
        assert lr == pytest.approx(original_lr(step - 1, 2, 3, 16, 0.2, warmup_epochs=1), rel=1e-12, abs=1e-15)
        assert lr_biases == pytest.approx(original_lr(step - 1, 2, 3, 16, 0.0048, warmup_epochs=1), rel=1e-12,
                                          abs=1e-15)
    ckpt = torch.load(tmp_path / "split" / "checkpoint-00000005.pth", weights_only=False)
    import torchvision

    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])
    assert ckpt["method"] == "barlow_twins" and ckpt["step"] == 5


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """torchrun --nproc_per_node=2 (gloo): the loss of one DDP step and its averaged gradients equal one process's
    on the global batch (the trunk's BatchNorm statistics per process, as without SyncBN)."""
    out = tmp_path / "dist.pt"
    run_torchrun(2, "tests/workers/dist_barlow_twins_worker.py", out)
    saved = torch.load(out, weights_only=False)
    args = cli.parse_args(barlow_twins.Args, None, saved["flags"])
    model = barlow_twins.BarlowTwins(args).double()
    model.load_state_dict(saved["initial"])
    n, world, views = saved["n_per_rank"], saved["world_size"], saved["views"]
    halves = [model([v[r * n:(r + 1) * n] for v in views]) for r in range(world)]
    z1, z2 = (torch.cat([h[k] for h in halves]) for k in (0, 1))
    loss = barlow_twins.barlow_twins_loss(z1, z2, args.lambd)[0]
    loss.backward()
    torch.testing.assert_close(saved["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-7, atol=1e-10, msg=name)


def test_bad_inputs_get_one_sentence_and_nonzero_exit(tmp_path):
    # the bad-input table (tests/bad_inputs.md, run by tests/test_reliability.py) has this script's other rows
    cases = [
        (["--batch-size", "1", "--data-fraction", "0.01"], "needs at least two images in the global batch"),
        (["--blur-p", "0.5"], "one probability per view"),
    ]
    for extra, message in cases:
        proc = run_script("barlow_twins.py", *SMALL, "--output-dir", tmp_path / "x", *extra, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr

"""vicreg.py: the loss against the paper's formula, the original's schedule and expander, learning on a fixed batch,
exact resume, two processes equal to one, bad input."""
import math

import pytest
import torch

import vicreg
from common import augment, cli, data
from tests.helpers import metrics, run_script, run_torchrun

SMALL = ["--data", "cifar10-mini", "--data-fraction", "0.03", "--arch", "resnet18", "--image-size", "32",
         "--batch-size", "16", "--mlp", "64", "64", "--workers", "0", "--epochs", "2", "--warmup-epochs", "1",
         "--lr", "0.2", "--print-every", "1"]


def naive_vicreg(x, y, sim_coeff, std_coeff, cov_coeff):
    """Eq. 1-6 of the paper as the original computes them, one entry at a time, float64: the mean squared
    distance over the N x D entries; per branch the covariance matrix over the batch (centred, / (N - 1)), the
    variance term mean_j max(0, 1 - sqrt(C_jj + 1e-4)) and the covariance term sum_{i != j} C_ij^2 / D; the
    variance terms of the two branches averaged, the covariance terms summed."""
    n, d = x.shape
    invariance = sum((x[b, j] - y[b, j]) ** 2 for b in range(n) for j in range(d)) / (n * d)

    def variance_and_covariance(z):
        means = [sum(z[b, j] for b in range(n)) / n for j in range(d)]
        cov = [[sum((z[b, i] - means[i]) * (z[b, j] - means[j]) for b in range(n)) / (n - 1) for j in range(d)]
               for i in range(d)]
        variance = sum(torch.clamp(1 - torch.sqrt(cov[j][j] + 1e-4), min=0) for j in range(d)) / d
        covariance = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return variance, covariance

    (vx, cx), (vy, cy) = variance_and_covariance(x), variance_and_covariance(y)
    terms = dict(invariance=invariance, variance=(vx + vy) / 2, covariance=cx + cy)
    return sim_coeff * terms["invariance"] + std_coeff * terms["variance"] + cov_coeff * terms["covariance"], terms


def _cases():
    g = torch.Generator().manual_seed(0)
    n, d = 7, 5
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    other = torch.randn(n, d, generator=g, dtype=torch.float64)
    constant = other.clone()
    constant[:, 2] = 3.0  # a collapsed dimension: std = sqrt(1e-4)
    mixed = other.clone()
    mixed[:, :2] *= 4  # some dimensions' std above 1 (hinge inactive), others below
    return {
        "random": (z, other),
        "nearly-invariant": (z, z + 1e-3 * other),
        "large-and-offset": (1e3 + 1e2 * z, -5e2 + 50 * other),
        "tiny": (1e-4 * z, 1e-4 * other),  # variance far below eps: the hinge is at its maximum
        "constant-dimension": (z, constant),
        "std-above-one": (3 * z, mixed),
        "two-images": (z[:2], other[:2]),
    }


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("coefficients", [(25.0, 25.0, 1.0), (1.0, 3.0, 0.5)])
def test_loss_and_gradients_equal_the_papers_formula(case, coefficients):
    z1, z2 = _cases()[case]
    ours = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    ref = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
    loss, terms = vicreg.vicreg_loss(*ours, *coefficients)
    expected, expected_terms = naive_vicreg(*ref, *coefficients)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    for name in expected_terms:
        torch.testing.assert_close(terms[name], expected_terms[name], rtol=1e-10, atol=1e-12, msg=name)
    loss.backward()
    expected.backward()
    for mine, theirs in zip(ours, ref):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-8, atol=1e-10)


def test_expander_and_parameter_groups_are_the_originals():
    args = cli.parse_args(vicreg.Args, vicreg.PRESETS, ["--arch", "resnet18", "--mlp", "32", "32", "16"])
    model = vicreg.VICReg(args)
    linear = [m for m in model.expander if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in linear] == \
        [(512, 32, True), (32, 32, True), (32, 16, False)]
    assert [type(m).__name__ for m in model.expander] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert all(not b.bn2.weight.detach().any() for b in model.trunk.layer1)  # zero_init_residual (BasicBlock)
    weights, biases = vicreg.build_optimizer(model, args).param_groups
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert (weights["weight_decay"], weights["lars"], weights["decayed_norm"]) == (1e-6, True, True)
    assert (biases["weight_decay"], biases["lars"]) == (0.0, False)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    args = cli.parse_args(vicreg.Args, vicreg.PRESETS, ["--arch", "resnet18", "--image-size", "32", "--mlp", "128",
                                                        "128"])
    model = vicreg.VICReg(args)
    base = data.build_dataset("cifar10-mini", "train")
    views = data.ViewDataset(base, augment.PerImage(vicreg.view_recipe(args)), seed=0)
    batch = data.collate([views[(0, i)] for i in range(0, 4000, 125)])[0]  # 32 images, 2 views
    opt = vicreg.build_optimizer(model, args)
    for group in opt.param_groups:
        group["lr"] = 0.4
    losses = []
    model.train()
    for _ in range(12):
        loss = vicreg.vicreg_loss(*model(batch), args.sim_coeff, args.std_coeff, args.cov_coeff)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def original_lr(step, steps_per_epoch, epochs, batch, base_lr, warmup_epochs=10):
    """facebookresearch/vicreg main_vicreg.py's adjust_learning_rate at 0-based `step`."""
    max_steps, warmup_steps, peak = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, base_lr * batch / 256
    if step < warmup_steps:
        return peak * step / warmup_steps
    q = 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (max_steps - warmup_steps)))
    return peak * q + peak * 0.001 * (1 - q)


@pytest.mark.parametrize("gpu_aug", ["off", "on"])  # per-image PIL views / batched views on the device
def test_interrupted_run_resumes_exactly(tmp_path, gpu_aug):
    # 40 images, 2 steps per epoch, 6 in all: the split run stops mid-epoch (step 3)
    small = [*SMALL, "--data-fraction", "0.01", "--epochs", "3", "--gpu-aug", gpu_aug]
    run_script("vicreg.py", *small, "--output-dir", tmp_path / "full", "--max-steps", "5")
    run_script("vicreg.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "3")
    resumed = run_script("vicreg.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "5")
    assert "resumed from" in resumed.stdout
    keys = ("loss", "lr", "invariance", "variance", "covariance")
    full = {r["step"]: tuple(r[k] for k in keys) for r in metrics(tmp_path / "full")}
    split = {r["step"]: tuple(r[k] for k in keys) for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == [1, 2, 3, 4, 5]
    assert full == split  # bit-identical losses, across two epoch boundaries
    for step, (loss, lr, invariance, variance, covariance) in full.items():
        assert lr == pytest.approx(original_lr(step - 1, 2, 3, 16, 0.2, warmup_epochs=1), rel=1e-12, abs=1e-15)
        assert loss == pytest.approx(25 * invariance + 25 * variance + covariance, rel=1e-5)
    ckpt = torch.load(tmp_path / "split" / "checkpoint-00000005.pth", weights_only=False)
    import torchvision

    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])
    assert ckpt["method"] == "vicreg" and ckpt["step"] == 5


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """torchrun --nproc_per_node=2 (gloo): the mean of the processes' losses (each with its own invariance term) and
    the averaged gradients of one DDP step equal one process's on the global batch (the trunk's BatchNorm statistics
    per process, as without SyncBN)."""
    out = tmp_path / "dist.pt"
    run_torchrun(2, "tests/workers/dist_vicreg_worker.py", out)
    saved = torch.load(out, weights_only=False)
    args = cli.parse_args(vicreg.Args, None, saved["flags"])
    model = vicreg.VICReg(args).double()
    model.load_state_dict(saved["initial"])
    n, world, views = saved["n_per_rank"], saved["world_size"], saved["views"]
    halves = [model([v[r * n:(r + 1) * n] for v in views]) for r in range(world)]
    z1, z2 = (torch.cat([h[k] for h in halves]) for k in (0, 1))
    loss, terms = vicreg.vicreg_loss(z1, z2, args.sim_coeff, args.std_coeff, args.cov_coeff)
    loss.backward()
    torch.testing.assert_close(saved["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
    for name, value in terms.items():
        torch.testing.assert_close(saved["terms"][name], value.detach(), rtol=1e-10, atol=1e-12, msg=name)
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-7, atol=1e-10, msg=name)


def test_bad_inputs_get_one_sentence_and_nonzero_exit(tmp_path):
    # the bad-input table (tests/bad_inputs.md, run by tests/test_reliability.py) has this script's other rows
    cases = [
        (["--batch-size", "1", "--data-fraction", "0.01"], "needs at least two images in the global batch"),
        (["--mlp", "64", "0"], "--mlp takes positive layer widths"),
    ]
    for extra, message in cases:
        proc = run_script("vicreg.py", *SMALL, "--output-dir", tmp_path / "x", *extra, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr

"""simclr.py: the loss against the paper's formula, learning on a fixed batch, exact resume, bad input.

The multi-crop loss against VISSL's and the recipe switches: tests/test_fidelity_simclr.py.
"""
import math

import pytest
import torch

import simclr
from common import augment, cli, data
from tests.helpers import metrics, run_script

SMALL = ["--data", "cifar10-mini", "--data-fraction", "0.03", "--arch", "resnet18", "--crops", "2x32",
         "--batch-size", "16", "--hidden-dim", "64", "--embedding-dim", "32", "--blur-p", "0", "--workers", "0",
         "--epochs", "2", "--warmup-epochs", "1", "--lr", "1.0", "--print-every", "1"]


def naive_nt_xent(z, temperature):
    """Eq. 1 of the paper, one row at a time, float64: z is [2N, d], rows i and i+N are partners."""
    z = torch.nn.functional.normalize(z.double(), dim=1)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        partner = (i + n2 // 2) % n2
        sims = [(z[i] @ z[j]) / temperature for j in range(n2) if j != i]
        total = total - (z[i] @ z[partner] / temperature - torch.logsumexp(torch.stack(sims), 0))
    return total / n2


def test_nt_xent_equals_the_paper_formula():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(2 * 7, 5, dtype=torch.float64), dim=1)
    for t in (0.1, 0.5, 0.01):
        torch.testing.assert_close(simclr.nt_xent_loss(z, 2, t), naive_nt_xent(z, t), rtol=1e-12, atol=1e-12)


def test_multicrop_loss_averages_every_positive_pairing_against_other_images_only():
    torch.manual_seed(0)
    n, views = 5, 3
    z = torch.nn.functional.normalize(torch.randn(views * n, 4, dtype=torch.float64), dim=1)
    logits = z @ z.t() / 0.2
    expected = 0.0
    for row in range(views * n):
        image = row % n
        partners = [v * n + image for v in range(views) if v * n + image != row]
        others = [col for col in range(views * n) if col % n != image]  # the other images' views
        expected += sum(torch.logsumexp(logits[row, [p, *others]], 0) - logits[row, p] for p in partners)
    torch.testing.assert_close(simclr.nt_xent_loss(z, views, 0.2), expected / (views * n * (views - 1)),
                               rtol=1e-12, atol=1e-12)


def test_parse_crops():
    assert simclr.parse_crops("2x160,4x96") == [(2, 160), (4, 96)]
    with pytest.raises(ValueError, match="--crops"):
        simclr.parse_crops("2by160")


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    args = cli.parse_args(simclr.Args, simclr.PRESETS, ["--arch", "resnet18", "--hidden-dim", "128", "--crops", "2x32"])
    model = simclr.SimCLR(args)
    base = data.build_dataset("cifar10-mini", "train")
    views = data.ViewDataset(base, augment.PerImage(simclr.view_recipe(args)), seed=0)
    batch = data.collate([views[(0, i)] for i in range(0, 4000, 125)])[0]  # 32 images, 2 views
    from common import optim

    opt = optim.LARS(optim.param_groups(model, 1e-6), lr=1.0, momentum=0.9)
    losses = []
    model.train()
    for _ in range(12):
        loss = simclr.nt_xent_loss(model(batch), 2, 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("gpu_aug", ["off", "on"])  # per-image PIL views / batched views on the device
def test_interrupted_run_resumes_exactly(tmp_path, gpu_aug):
    small = [*SMALL, "--gpu-aug", gpu_aug]
    run_script("simclr.py", *small, "--output-dir", tmp_path / "full", "--max-steps", "5")
    run_script("simclr.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "2")
    resumed = run_script("simclr.py", *small, "--output-dir", tmp_path / "split", "--max-steps", "5")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == [1, 2, 3, 4, 5]
    assert full == split  # bit-identical losses, across the epoch boundary at step 3
    ckpt = torch.load(tmp_path / "split" / "checkpoint-00000005.pth", weights_only=False)
    import torchvision

    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])
    assert ckpt["method"] == "simclr" and ckpt["step"] == 5


def test_bad_inputs_get_one_sentence_and_nonzero_exit(tmp_path):
    # the bad-input table (tests/bad_inputs.md, run by tests/test_reliability.py) has this script's other rows
    cases = [
        (["--data", "/no/such/dir"], "does not exist"),
    ]
    for extra, message in cases:
        proc = run_script("simclr.py", *SMALL, "--output-dir", tmp_path / "x", *extra, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    # a checkpoint of another architecture in --output-dir is refused, not loaded half-way
    run_script("simclr.py", *SMALL, "--output-dir", tmp_path / "r18", "--max-steps", "1")
    proc = run_script("simclr.py", *SMALL, "--arch", "resnet34", "--output-dir", tmp_path / "r18", check=False)
    assert proc.returncode == 2 and "does not fit" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

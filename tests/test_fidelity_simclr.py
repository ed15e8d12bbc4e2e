"""simclr.py against the original code: VISSL's (multi-crop) SimCLR InfoNCE loss re-derived in float64,
the two-view loss unchanged, the multi-crop loss on 2 processes equal to 1 process, and the recipe switches
between VISSL's and the paper's code (head BatchNorm, bias/BN exclusion from LARS and decay, warmup start)."""
import math

import numpy as np
import pytest
import torch

import simclr
from common import cli, dist, ops, optim
from tests.helpers import metrics, run_script, run_torchrun


def simclr_vissl_info_nce_f64(z, n_views, temperature, world_size=1):
    """VISSL's (multicrop_)simclr_info_nce_loss in float64, rebuilt from its masks.

    z: the global batch [world_size * n_views * n, d], rank-major, each rank's block view-major (row v*n + i
    is view v of that rank's image i). For every shift d = 1..n_views-1 a positive mask pairs each row with
    the row d views further (cyclically) of the same image; the negative mask is every column of the same
    rank minus all of that image's views. Each (row, shift) term is -log(pos / (pos + neg)) of the exponentiated
    similarities; the loss is their mean, averaged over ranks as DDP does. world_size=1 is the loss on the
    global batch, i.e. with negatives from every rank.
    """
    assert z.dtype == torch.float64  # z is normalised (VISSL normalises before its criterion, SimCLR.forward here)
    local = len(z) // world_size
    n = local // n_views
    total = 0.0
    for rank in range(world_size):
        mine = z[rank * local:(rank + 1) * local]
        similarity = torch.exp(mine @ z.t() / temperature)
        shift_masks = []
        for d in range(n_views):
            block = np.eye(local, k=d * n) + np.eye(local, k=-local + d * n)
            full = np.zeros((local, len(z)))
            full[:, rank * local:(rank + 1) * local] = block
            shift_masks.append(torch.from_numpy(full))
        negative_mask = torch.zeros(local, len(z), dtype=torch.float64)
        negative_mask[:, rank * local:(rank + 1) * local] = 1
        negative_mask -= sum(shift_masks)
        assert negative_mask.min() >= 0  # the shifts hit distinct columns
        neg = (similarity * negative_mask).sum(1)
        terms = []
        for d in range(1, n_views):
            pos = (similarity * shift_masks[d]).sum(1)
            terms.append(-torch.log(pos / (pos + neg)))
        total = total + torch.cat(terms).mean()
    return total / world_size


def simclr_loss_before_multicrop_fix(z, n_views, temperature):
    """nt_xent_loss as it was before the multi-crop fix (the other views of an image counted as negatives)."""
    keys = dist.gather_with_grad(z)
    rows = torch.arange(len(z), device=z.device)
    view, image = rows // (len(z) // n_views), rows % (len(z) // n_views)
    offset = dist.rank() * len(z)
    loss = 0.0
    for shift in range(1, n_views):
        positive = offset + ((view + shift) % n_views) * (len(z) // n_views) + image
        loss = loss + ops.contrastive_loss(z, keys, positive, temperature, self_index=offset + rows)
    return loss / (n_views - 1)


def _unit_rows(rows, dim, seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator, dtype=dtype), dim=1)


def _loss_and_grad(loss_fn, z, *args):
    z = z.clone().requires_grad_(True)
    loss = loss_fn(z, *args)
    loss.backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("n_views", [3, 4, 6])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_simclr_multicrop_loss_equals_vissl_formula(n_views, temperature):
    n, d = 5, 7
    z = _unit_rows(n_views * n, d, seed=n_views)
    ours, our_grad = _loss_and_grad(simclr.nt_xent_loss, z, n_views, temperature)
    theirs, their_grad = _loss_and_grad(simclr_vissl_info_nce_f64, z, n_views, temperature)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-10, atol=1e-12)
    # the fix matters: the former loss (other views of the same image as negatives) is a different function
    before = simclr_loss_before_multicrop_fix(z, n_views, temperature)
    assert abs(before.item() - ours.item()) > 1e-3


def test_simclr_multicrop_loss_on_aligned_views():
    """Views of one image that agree exactly: VISSL's loss sees only the other images as rivals (log(1 + ...)),
    while the former loss also had the n_views - 2 identical views in every denominator (log(n_views - 1 + ...))."""
    n_views, n, temperature = 4, 3, 0.1
    image_directions = torch.eye(n, dtype=torch.float64)  # orthogonal images: negatives have similarity 0
    z = image_directions.repeat(n_views, 1)
    expected = math.log(1 + (n - 1) * n_views * math.exp(-1 / temperature))
    torch.testing.assert_close(simclr.nt_xent_loss(z, n_views, temperature),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    before = math.log(n_views - 1 + (n - 1) * n_views * math.exp(-1 / temperature))
    torch.testing.assert_close(simclr_loss_before_multicrop_fix(z, n_views, temperature),
                               torch.tensor(before, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_simclr_two_view_loss_is_unchanged(dtype):
    n, d = 7, 5
    z = _unit_rows(2 * n, d, seed=3, dtype=dtype)
    for temperature in (0.1, 0.5, 0.07):
        ours, our_grad = _loss_and_grad(simclr.nt_xent_loss, z, 2, temperature)
        before, before_grad = _loss_and_grad(simclr_loss_before_multicrop_fix, z, 2, temperature)
        assert torch.equal(ours, before) and torch.equal(our_grad, before_grad)  # bit-identical
        if dtype == torch.float64:  # and it is VISSL's simclr_info_nce_loss
            theirs, their_grad = _loss_and_grad(simclr_vissl_info_nce_f64, z, 2, temperature)
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(our_grad, their_grad, rtol=1e-10, atol=1e-12)


def test_simclr_multicrop_negatives_do_not_depend_on_world_size():
    """The deliberate difference from VISSL: its multi-crop loss takes negatives from the local rank only, so
    the same global batch gives another loss on 2 GPUs than on 1; ours is VISSL's one-GPU loss on any number."""
    n_views, n_per_rank, world = 6, 5, 2
    z = _unit_rows(world * n_views * n_per_rank, 7, seed=11)  # rank-major, each rank's block view-major
    vissl_two_gpus = simclr_vissl_info_nce_f64(z, n_views, 0.2, world_size=2)
    # one process sees the same global batch view-major: reorder the rank blocks
    global_view_major = z.reshape(world, n_views, n_per_rank, -1).transpose(0, 1).reshape(len(z), -1)
    vissl_one_gpu = simclr_vissl_info_nce_f64(global_view_major, n_views, 0.2, world_size=1)
    ours = simclr.nt_xent_loss(global_view_major, n_views, 0.2)
    torch.testing.assert_close(ours, vissl_one_gpu, rtol=1e-12, atol=1e-12)
    assert abs(vissl_two_gpus.item() - vissl_one_gpu.item()) > 1e-2


def test_simclr_multicrop_single_image_has_zero_loss_and_gradient():
    z = _unit_rows(4, 7, seed=0).requires_grad_(True)  # 4 views of one image: no negatives
    loss = simclr.nt_xent_loss(z, 4, 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("flags", [["--crops", "2x32,2x16"], ["--crops", "2x32,4x16", "--head-bn"]],
                         ids=["4views", "6views-bn-head"])
def test_simclr_multicrop_two_processes_equal_one(tmp_path, flags):
    out = tmp_path / "dist.pt"
    run_torchrun(2, "tests/workers/dist_simclr_worker.py", out, *flags)
    saved = torch.load(out, weights_only=False)
    args = cli.parse_args(simclr.Args, None, saved["flags"])
    model = simclr.SimCLR(args).double()
    model.load_state_dict(saved["initial"])
    n, world, views = saved["n_per_rank"], saved["world_size"], saved["views"]
    assert len(views) == sum(count for count, _ in simclr.parse_crops(args.crops)) > 2
    # each rank's half through the trunk (per-rank BatchNorm statistics), then one loss over the global batch
    halves = [model([v[r * n:(r + 1) * n] for v in views]).reshape(len(views), n, -1) for r in range(world)]
    z = torch.cat(halves, dim=1).reshape(len(views) * n * world, -1)
    loss = simclr.nt_xent_loss(z, len(views), 0.2)
    loss.backward()
    torch.testing.assert_close(saved["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
    assert set(saved["grads"]) == {name for name, p in model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-8, atol=1e-11, msg=name)


# ----------------------------------------------------------------------------- recipe switches

def _args(*flags, preset=None):
    argv = ["--arch", "resnet18", "--hidden-dim", "24", "--embedding-dim", "8", *flags]
    return cli.parse_args(simclr.Args, simclr.PRESETS, ([] if preset is None else ["--preset", preset]) + argv)


def test_simclr_recipe_defaults_follow_vissl_and_cifar_preset_the_paper():
    vissl = _args()
    assert (vissl.lr, vissl.warmup_start_lr, vissl.warmup_epochs, vissl.weight_decay, vissl.temperature) == \
        (0.3, 0.0375, 10.0, 1e-6, 0.1)
    assert optim.scaled_lr(vissl.warmup_start_lr, 4096) == pytest.approx(0.6)  # VISSL: linear 0.6 -> 4.8
    assert not vissl.head_bn and not vissl.exclude_bias_and_norm
    paper = _args(preset="cifar")
    assert paper.head_bn and paper.exclude_bias_and_norm and paper.warmup_start_lr == 0.0
    assert (paper.temperature, paper.jitter_strength, paper.blur_p, paper.batch_size, paper.lr) == \
        (0.5, 0.5, 0.0, 512, 1.0)


def test_simclr_heads_vissl_and_paper():
    torch.manual_seed(0)
    vissl = simclr.SimCLR(_args()).head
    assert [type(m) for m in vissl] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert vissl[0].bias is not None and vissl[2].bias is not None
    paper = simclr.SimCLR(_args("--head-bn")).head
    assert [type(m) for m in paper] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear,
                                        torch.nn.BatchNorm1d]
    assert paper[0].bias is None and paper[3].bias is None
    assert paper[1].bias.requires_grad and not paper[4].bias.requires_grad and paper[4].weight.requires_grad
    # the last BN scales but never shifts: its bias stays 0 through training steps
    model = simclr.SimCLR(_args("--head-bn", "--exclude-bias-and-norm")).train()
    optimizer = simclr.build_optimizer(model, _args("--head-bn", "--exclude-bias-and-norm"))
    optim.set_lr(optimizer, 0.5)
    images = torch.randn(6, 3, 32, 32)
    for _ in range(2):
        loss = simclr.nt_xent_loss(model([images, images.flip(-1)]), 2, 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(model.head[4].bias, torch.zeros(8)) and not torch.equal(model.head[4].weight, torch.ones(8))
    # per image, the last BN's output has mean 0 before normalisation: a shift would be visible here
    with torch.no_grad():
        pre_norm = model.head(model.trunk(torch.randn(10, 3, 32, 32)))
    torch.testing.assert_close(pre_norm.mean(0), torch.zeros(8), rtol=0, atol=1e-5)


def test_simclr_bias_and_norm_exclusion_switch():
    model = simclr.SimCLR(_args("--head-bn"))
    one_d = {id(p) for p in model.parameters() if p.requires_grad and p.ndim == 1}
    assert one_d  # BN weights and biases in the trunk and head
    vissl = simclr.build_optimizer(model, _args())
    assert len(vissl.param_groups) == 1
    (group,) = vissl.param_groups
    assert group["lars"] and group["weight_decay"] == 1e-6
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    paper = simclr.build_optimizer(model, _args("--exclude-bias-and-norm"))
    decayed, plain = paper.param_groups
    assert decayed["lars"] and decayed["weight_decay"] == 1e-6 and all(p.ndim > 1 for p in decayed["params"])
    assert not plain["lars"] and plain["weight_decay"] == 0.0 and {id(p) for p in plain["params"]} == one_d
    # one step on a BN weight: VISSL's LARC scales it by the trust ratio, the paper's code does not
    bn = model.trunk.bn1.weight
    for optimizer, adapted in ((vissl, True), (paper, False)):
        with torch.no_grad():
            bn.fill_(1.0)
        for p in model.parameters():
            p.grad = torch.ones_like(p) if p.requires_grad else None
        optimizer.state.clear()
        optim.set_lr(optimizer, 0.1)
        optimizer.step()
        g = torch.ones_like(bn) + (1e-6 * torch.ones_like(bn) if adapted else 0)
        ratio = 0.001 * math.sqrt(len(bn)) / (math.sqrt(len(bn)) + 1e-6 * math.sqrt(len(bn)) + 1e-8) if adapted else 1
        torch.testing.assert_close(bn.detach(), torch.ones_like(bn) - 0.1 * ratio * g, rtol=1e-6, atol=1e-7)


def test_simclr_warmup_starts_at_warmup_start_lr(tmp_path):
    """The logged lr of the first steps: linear from --warmup-start-lr x B/256 to --lr x B/256."""
    small = ["--data", "cifar10-mini", "--data-fraction", "0.03", "--arch", "resnet18", "--crops", "2x32",
             "--batch-size", "16", "--hidden-dim", "32", "--embedding-dim", "16", "--blur-p", "0", "--workers", "0",
             "--epochs", "2", "--warmup-epochs", "1", "--lr", "1.0", "--print-every", "1", "--max-steps", "2"]
    run_script("simclr.py", *small, "--warmup-start-lr", "0.5", "--output-dir", tmp_path / "a")
    lrs = [r["lr"] for r in metrics(tmp_path / "a")]
    warmup_steps = 120 // 16  # 3% of cifar10-mini's 4,000 images, one epoch of warmup
    start, peak = 0.5 * 16 / 256, 1.0 * 16 / 256
    assert lrs == pytest.approx([start, start + (peak - start) / warmup_steps], rel=1e-12)

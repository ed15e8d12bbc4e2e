"""pirl.py: jigsaw patches, the Eq. 5 loss against the paper's formula, learning, exact resume, 2 ranks, bad input."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

import pirl
from common import augment, cli, data, optim
from tests.helpers import PIRL_SMALL, metrics, naive_nce, run_script, run_torchrun, unit

SMALL = PIRL_SMALL


def parse(*argv):
    return cli.parse_args(pirl.Args, pirl.PRESETS, list(argv))


def test_defaults_are_the_published_recipe():
    args = parse()
    assert (args.num_negatives, args.temperature, args.memory_momentum, args.jigsaw_weight) == (32000, 0.07, 0.5, 0.5)
    assert (args.embedding_dim, args.epochs, args.patch_crop_size, args.patch_size) == (128, 800, 255, 64)
    assert args.loss_type == "nce" and not args.mlp_head and not args.gblur


def test_nce_loss_equals_the_paper_formula_in_float64():
    v, positives, noise = unit(6, 8, seed=0), unit(6, 8, seed=1), unit(20, 8, seed=2)
    z = float(pirl.estimate_z(v, positives, noise, 0.07, 1000))
    got = pirl.nce_loss(v, positives, noise, torch.tensor(z, dtype=torch.float64), 0.07, 1000)
    assert abs(got.item() - naive_nce(v, positives, noise, z, 0.07, 1000)) < 1e-9 * got.item()


def test_pirl_loss_is_the_convex_combination_of_eq5():
    f, g, positives, noise = unit(5, 8, seed=3), unit(5, 8, seed=4), unit(5, 8, seed=5), unit(30, 8, seed=6)
    z = torch.tensor(4321.0, dtype=torch.float64)
    for weight in (0.5, 0.3, 1.0):
        args = parse("--jigsaw-weight", str(weight))
        expected = (weight * naive_nce(g, positives, noise, 4321.0, 0.07, 900)
                    + (1 - weight) * naive_nce(f, positives, noise, 4321.0, 0.07, 900))
        got = pirl.pirl_loss(f, g, positives, noise, z, args, 900).item()
        assert abs(got - expected) < 1e-9 * expected
    args = parse("--loss-type", "cross_entropy", "--temperature", "0.1")
    xent = [sum(torch.logsumexp(torch.cat([positives[i:i + 1], noise]) @ e[i] / 0.1, 0) - positives[i] @ e[i] / 0.1
                for i in range(5)) / 5 for e in (g, f)]
    torch.testing.assert_close(pirl.pirl_loss(f, g, positives, noise, z, args, 900), 0.5 * xent[0] + 0.5 * xent[1])


def test_jigsaw_patches_come_one_from_each_grid_cell_in_shuffled_order():
    """view_recipe's patch group, its geometry alone (the colour ops off, no normalisation), on the per-image path:
    with the patch crop the whole 48-px image, each 14-px patch lies inside one 16-px cell."""
    pixels = np.zeros((48, 48, 3), dtype=np.uint8)
    for cell in range(9):
        pixels[(cell // 3) * 16:(cell // 3 + 1) * 16, (cell % 3) * 16:(cell % 3 + 1) * 16] = 20 * cell + 10
    image = Image.fromarray(pixels)
    args = parse("--patch-crop-size", "48", "--patch-size", "14", "--patch-crop-scale", "1", "1")
    (count, patch_view), = [(count, view) for count, view in pirl.view_recipe(args) if isinstance(view, augment.Patches)]
    geometry = dataclasses.replace(patch_view, jitter_p=0.0, photometric_p=0.0, grayscale_p=0.0, blur_p=0.0,
                                   mean=None, std=None)
    cut = augment.PerImage([(count, geometry)])
    orders = set()
    for seed in range(5):
        torch.manual_seed(seed)
        patches = cut(image)
        assert [tuple(p.shape) for p in patches] == [(3, 14, 14)] * 9
        values = [(p * 255).round().to(torch.uint8).numpy() for p in patches]
        assert all(v.min() == v.max() for v in values)  # each patch lies inside one cell
        order = tuple((int(v.flat[0]) - 10) // 20 for v in values)
        assert sorted(order) == list(range(9))
        orders.add(order)
    assert len(orders) > 1  # the order is shuffled, not fixed


def test_views_and_model_shapes_for_every_variant():
    base = data.build_dataset("cifar10-mini", "train")
    for flags in ([], ["--gblur"], ["--mlp-head"]):
        args = parse("--arch", "resnet18", "--image-size", "32", "--patch-crop-size", "48", "--patch-size", "14", *flags)
        views = data.ViewDataset(base, augment.PerImage(pirl.view_recipe(args)), seed=0)
        (images, *patches), _, _, _ = data.collate([views[(0, i)] for i in range(4)])  # [image, patch 1..9]
        patches = torch.stack(patches, dim=1)
        assert images.shape == (4, 3, 32, 32) and patches.shape == (4, 9, 3, 14, 14)
        model = pirl.PIRL(args).eval()
        f, g = model(images, patches)
        assert f.shape == g.shape == (4, 128)
        torch.testing.assert_close(f.norm(dim=1), torch.ones(4))
        torch.testing.assert_close(g.norm(dim=1), torch.ones(4))
        assert isinstance(model.image_head, torch.nn.Sequential) == ("--mlp-head" in flags)


def test_loss_falls_on_a_fixed_batch():
    """Against a fixed memory bank and fixed noise, SGD on the network alone must lower the PIRL loss."""
    torch.manual_seed(0)
    args = parse("--arch", "resnet18", "--image-size", "32", "--patch-crop-size", "48", "--patch-size", "14")
    model = pirl.PIRL(args)
    views = data.ViewDataset(data.build_dataset("cifar10-mini", "train"), augment.PerImage(pirl.view_recipe(args)),
                             seed=0)
    images, *patches = data.collate([views[(0, i)] for i in range(0, 4000, 250)])[0]  # 16 images, then 9 patches
    patches = torch.stack(patches, dim=1)  # [16, 9, 3, 14, 14]
    memory = pirl.MemoryBank(4000, 128, 0.5, seed=0)
    positives = memory.bank[torch.arange(0, 4000, 250)]
    noise = memory.bank[pirl.noise_indices(4000, 256, 0, 0, 0, "cpu")]
    opt = torch.optim.SGD(optim.param_groups(model, 1e-4), lr=0.5, momentum=0.9)
    model.train()
    with torch.no_grad():
        z = pirl.estimate_z(model(images, patches)[1], positives, noise, 0.07, 4000)
    losses = []
    for _ in range(8):
        loss = pirl.pirl_loss(*model(images, patches), positives, noise, z, args, 4000)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 1.0, losses


def test_interrupted_run_resumes_exactly(tmp_path):
    """Memory bank, Z, noise draws and the patch augmentations come back: bit-identical losses."""
    run_script("pirl.py", *SMALL, "--output-dir", tmp_path / "full", "--max-steps", "7")
    run_script("pirl.py", *SMALL, "--output-dir", tmp_path / "split", "--max-steps", "3")
    resumed = run_script("pirl.py", *SMALL, "--output-dir", tmp_path / "split", "--max-steps", "7")
    assert "resumed from" in resumed.stdout and "Z =" not in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == list(range(1, 8))
    assert full == split  # across the epoch boundary at step 5
    ckpt = torch.load(tmp_path / "split" / "checkpoint-00000007.pth", weights_only=False)
    import torchvision

    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])
    assert ckpt["method"] == "pirl" and ckpt["memory"]["bank"].shape == (80, 128) and float(ckpt["memory"]["z"]) > 0


def test_two_ranks_keep_identical_memory_banks(tmp_path):
    """torchrun --nproc_per_node=2: every rank applies every rank's f(v_I) updates, and shares one Z."""
    run_torchrun(2, "tests/workers/dist_npid_worker.py", tmp_path, "pirl", *SMALL[:12], "--batch-size", "8",
                 "--num-negatives", "64", "--workers", "0", "--max-steps", "1")
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert rank0["world_size"] == 2 and torch.equal(rank0["initial"], rank1["initial"])
    assert torch.equal(rank0["bank"], rank1["bank"])
    assert float(rank0["z"]) > 0 and float(rank0["z"]) == float(rank1["z"])
    assert int((rank0["bank"] != rank0["initial"]).any(dim=1).sum()) == 2 * 8  # both ranks' 8 images


def test_bad_inputs_get_one_sentence_and_nonzero_exit(tmp_path):
    # the bad-input table (tests/bad_inputs.md, run by tests/test_reliability.py) has this script's other rows
    cases = [
        (["--data", "/no/such/dir"], "does not exist"),
        (["--batch-size", "100000"], "larger than this process's share"),
    ]
    for extra, message in cases:
        proc = run_script("pirl.py", *SMALL, "--output-dir", tmp_path / "x", *extra, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    for extra, message in ((["--jigsaw-weight", "1.5"], "--jigsaw-weight"), (["--num-negatives", "0"], "--num-negatives"),
                           (["--memory-momentum", "1"], "--memory-momentum"),
                           (["--patch-size", "85"], "at most 84")):  # a 64-px patch moves in 0..20 of its 85-px cell
        with pytest.raises(ValueError, match=message):
            pirl.check_args(parse(*extra))

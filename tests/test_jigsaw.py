"""jigsaw.py: the Hamming permutation set, the puzzle geometry, learning on a fixed batch, exact resume, bad input."""
import itertools
import math

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import jigsaw
from common import augment, cli, data, optim
from tests.helpers import metrics, run_script

SMALL = ["--preset", "cifar", "--no-cifar-stem", "--data", "cifar10-mini", "--data-fraction", "0.01",
         "--num-permutations", "10", "--tile-dim", "64", "--batch-size", "16", "--workers", "0", "--epochs", "3",
         "--warmup-epochs", "1", "--print-every", "1"]


@pytest.mark.parametrize("rule,stats", [("max-avg", {100: (8.08, 2), 1000: (8.008, 2)}),
                                        ("max-min", {100: (8.026, 6), 1000: (7.909, 5)})])
def test_permutation_set_is_seeded_and_has_the_documented_distances(rule, stats):
    perms = jigsaw.hamming_permutations(1000, seed=0, rule=rule)
    assert perms.shape == (1000, 9)
    assert all(sorted(p) == list(range(9)) for p in perms.tolist())
    assert len({tuple(p) for p in perms.tolist()}) == 1000
    # greedy selection: a longer set extends the shorter one, so the 100-set is this prefix
    assert torch.equal(jigsaw.hamming_permutations(100, seed=0, rule=rule), perms[:100])
    for n, (average, minimum) in stats.items():  # documented in jigsaw.py's docstring (seed 0)
        assert round(jigsaw.mean_hamming_distance(perms[:n]), 3) == average, n
        assert jigsaw.min_hamming_distance(perms[:n]) == minimum, n
    assert not torch.equal(jigsaw.hamming_permutations(100, seed=1, rule=rule), perms[:100])


def test_each_added_permutation_maximises_the_minimum_distance():
    """Brute force on 5 tiles (120 candidates): the greedy max-min rule (--permutation-rule max-min)."""
    perms = jigsaw.hamming_permutations(40, n_tiles=5, seed=3, rule="max-min").tolist()
    every = [tuple(p) for p in itertools.permutations(range(5))]
    hamming = lambda a, b: sum(x != y for x, y in zip(a, b))  # noqa: E731
    for k in range(1, 40):
        chosen = [tuple(p) for p in perms[:k]]
        best = max(min(hamming(c, s) for s in chosen) for c in every if c not in chosen)
        assert min(hamming(tuple(perms[k]), s) for s in chosen) == best, k


def test_min_hamming_distance():
    assert jigsaw.min_hamming_distance(torch.tensor([[0, 1, 2], [1, 2, 0], [0, 2, 1]])) == 2
    assert jigsaw.mean_hamming_distance(torch.tensor([[0, 1, 2], [1, 2, 0], [0, 2, 1]])) == 7 / 3  # (3 + 2 + 2) / 3
    with pytest.raises(ValueError, match="--num-permutations"):
        jigsaw.hamming_permutations(0)


def test_tiles_come_from_the_grid_cells_in_the_permuted_order():
    # crop = resize = image size and tile = cell: no crop or jitter, so each tile is exactly a cell; the image view
    # (view_recipe on the per-image path: flip, normalise), then its puzzle (jigsaw.puzzles on a batch of one)
    args = cli.parse_args(jigsaw.Args, None, ["--resize-size", "30", "--crop-size", "30", "--tile-size", "10",
                                              "--grayscale-p", "0"])
    perms = jigsaw.hamming_permutations(20, seed=0)
    pixels = np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    normalise = torchvision.transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    image = normalise(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    seen_labels, seen_flips = set(), set()
    make_view = augment.PerImage(jigsaw.view_recipe(args))
    for seed in range(12):
        torch.manual_seed(seed)
        view, = make_view(Image.fromarray(pixels))
        tiles, labels = jigsaw.puzzles(view[None], perms, args.tile_size, torch.Generator().manual_seed(seed))
        tiles, label = tiles[0], labels[0]
        assert tiles.shape == (9, 3, 10, 10)
        torch.testing.assert_close(tiles.mean(dim=(2, 3)), torch.zeros(9, 3), rtol=0, atol=1e-5)
        torch.testing.assert_close(tiles.std(dim=(2, 3)), torch.ones(9, 3), rtol=0, atol=1e-3)
        matches = []
        for flipped, source in ((False, image), (True, image.flip(2))):
            cells = [source[:, r * 10:(r + 1) * 10, c * 10:(c + 1) * 10] for r in range(3) for c in range(3)]
            cells = [(t - t.mean(dim=(1, 2), keepdim=True)) / (t.std(dim=(1, 2), keepdim=True) + 1e-5) for t in cells]
            expected = torch.stack([cells[j] for j in perms[int(label)].tolist()])
            if torch.allclose(tiles, expected, atol=1e-4):
                matches.append(flipped)
        assert len(matches) == 1, seed
        seen_labels.add(int(label))
        seen_flips.add(matches[0])
    assert len(seen_labels) > 3 and seen_flips == {False, True}


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    args = cli.parse_args(jigsaw.Args, jigsaw.PRESETS, ["--preset", "cifar", "--no-cifar-stem",
                                                        "--num-permutations", "10", "--tile-dim", "64"])
    perms = jigsaw.hamming_permutations(10)
    model = jigsaw.JigsawNet(args)
    views = data.ViewDataset(data.build_dataset("cifar10-mini", "train"), augment.PerImage(jigsaw.view_recipe(args)),
                             seed=0)
    images, = data.collate([views[(0, i)] for i in range(0, 4000, 125)])[0]  # 32 images, one view
    tiles, labels = jigsaw.puzzles(images, perms, args.tile_size, torch.Generator().manual_seed(0))  # 32 puzzles
    optimizer = torch.optim.SGD(optim.decay_all_but_norm(model, 1e-4), lr=0.05, momentum=0.9)
    losses = []
    model.train()
    for _ in range(12):
        loss = jigsaw.permutation_loss(model(tiles), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # starts near log 10 = 2.30


def test_interrupted_run_resumes_exactly(tmp_path):
    run_script("jigsaw.py", *SMALL, "--output-dir", tmp_path / "full", "--max-steps", "5")
    run_script("jigsaw.py", *SMALL, "--output-dir", tmp_path / "split", "--max-steps", "3")
    resumed = run_script("jigsaw.py", *SMALL, "--output-dir", tmp_path / "split", "--max-steps", "5")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: r["loss"] for r in metrics(tmp_path / "full")}
    split = {r["step"]: r["loss"] for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == [1, 2, 3, 4, 5]
    assert full == split  # bit-identical losses, across the epoch boundaries at steps 2 and 4
    ckpt = torch.load(tmp_path / "split" / "checkpoint-00000005.pth", weights_only=False)
    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])
    assert ckpt["method"] == "jigsaw" and ckpt["step"] == 5
    assert torch.equal(ckpt["permutations"], jigsaw.hamming_permutations(10, seed=0))


def test_bad_inputs_get_one_sentence_and_nonzero_exit(tmp_path):
    # the bad-input table (tests/bad_inputs.md, run by tests/test_reliability.py) has this script's other rows
    cases = [
        (["--data", "/no/such/dir"], "does not exist"),
        (["--num-permutations", "0"], "--num-permutations must be between 1 and 362880"),
    ]
    for extra, message in cases:
        proc = run_script("jigsaw.py", *SMALL, "--output-dir", tmp_path / "x", *extra, check=False)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    # a checkpoint made with another permutation set size is refused
    run_script("jigsaw.py", *SMALL, "--output-dir", tmp_path / "p10", "--max-steps", "1")
    proc = run_script("jigsaw.py", *SMALL, "--num-permutations", "12", "--output-dir", tmp_path / "p10", check=False)
    assert proc.returncode == 2 and "10 permutations" in proc.stderr, proc.stderr


def test_warmup_is_the_one_vissl_runs():
    """VISSL's YAML ramp 0.025 -> 0.1 becomes, after its lr scaling, no ramp at 8 x 32 images and a ramp from the
    256-image lr above that; x0.1 at epochs 30/60/90/100. The cifar preset ramps from a quarter of its peak."""
    args = cli.parse_args(jigsaw.Args, jigsaw.PRESETS, [])
    epochs = (0, 2.5, 5, 29, 30, 100)
    for peak, want in [(0.1, [0.1, 0.1, 0.1, 0.1, 0.01, 1e-5]), (0.4, [0.1, 0.25, 0.4, 0.4, 0.04, 4e-5])]:
        lr = [jigsaw.learning_rate(round(e * 10), 10, 1050, peak, args) for e in epochs]
        assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(lr, want)), (peak, lr)
    cifar = cli.parse_args(jigsaw.Args, jigsaw.PRESETS, ["--preset", "cifar"])
    lr = [jigsaw.learning_rate(round(e * 10), 10, 1000, 0.05, cifar) for e in (0, 2.5, 5)]
    assert all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(lr, [0.0125, 0.03125, 0.05])), lr

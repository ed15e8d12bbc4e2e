"""Jigsaw and RotNet against slow float64 re-derivations: the permutation sets (Noroozi & Favaro's
Algorithm 1 and the max-min variant), both losses (value and gradient), the order in which JigsawNet
reads its tiles, the tile offsets, and RotNet's rotated images and labels on odd sizes."""
import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

import jigsaw
import rotnet
from common import augment, cli, gpu_aug


def _hamming(a, b):
    return sum(x != y for x, y in zip(a, b))


def _greedy_reference(n, n_tiles, seed, rule):
    """The greedy selection written out plainly: every step scores every unchosen candidate against the whole
    chosen set (float64 average, or minimum) and keeps the first best one in lexicographic order."""
    candidates = list(itertools.permutations(range(n_tiles)))  # lexicographic
    chosen = [candidates[int(np.random.default_rng(seed).integers(len(candidates)))]]
    while len(chosen) < n:
        best, best_score = None, -math.inf
        for c in candidates:
            if c in chosen:
                continue
            distances = np.array([_hamming(c, s) for s in chosen], dtype=np.float64)
            score = distances.mean() if rule == "max-avg" else distances.min()
            if score > best_score:  # strictly better: ties keep the earlier candidate
                best, best_score = c, score
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("n_tiles,n,seeds", [(4, 24, (0, 1, 2)), (5, 40, (0, 3))])
@pytest.mark.parametrize("rule", ["max-avg", "max-min"])
def test_jigsaw_permutation_rules_match_a_slow_greedy_selection(n_tiles, n, seeds, rule):
    for seed in seeds:
        got = [tuple(p) for p in jigsaw.hamming_permutations(n, n_tiles=n_tiles, seed=seed, rule=rule).tolist()]
        assert got == _greedy_reference(n, n_tiles, seed, rule), (rule, n_tiles, seed)


def test_jigsaw_the_two_rules_choose_differently():
    # the comparison above could not tell the rules apart if they agreed on these sizes
    avg = jigsaw.hamming_permutations(40, n_tiles=5, seed=3, rule="max-avg")
    low = jigsaw.hamming_permutations(40, n_tiles=5, seed=3, rule="max-min")
    assert not torch.equal(avg, low)


def test_jigsaw_max_avg_first_steps_on_nine_tiles_against_every_candidate():
    """Nine tiles: each of the first steps adds the first (lexicographic) candidate with the largest sum of
    distances to the set so far, checked against all 9! candidates with plain broadcasting."""
    perms = jigsaw.hamming_permutations(12, seed=5).numpy()
    every = np.array(list(itertools.permutations(range(9))), dtype=np.int64)
    index = {tuple(p): i for i, p in enumerate(every.tolist())}
    assert index[tuple(perms[0])] == int(np.random.default_rng(5).integers(len(every)))
    for k in range(1, len(perms)):
        total = (every[:, None, :] != perms[None, :k, :]).sum(axis=(1, 2)).astype(np.float64)
        total[[index[tuple(p)] for p in perms[:k]]] = -1
        assert index[tuple(perms[k])] == int(np.flatnonzero(total == total.max())[0]), k


def _most_even_distance_sum(n, n_tiles):
    """The largest possible sum over ordered pairs of a set of n permutations of their Hamming distances: pairs
    agree at a position when they put the same tile there, which is fewest when every tile sits at every
    position as evenly as possible (floor or ceil of n / n_tiles times)."""
    q, r = divmod(n, n_tiles)
    agreeing_pairs = n_tiles * (r * (q + 1) * q + (n_tiles - r) * q * (q - 1))
    return n * (n - 1) * n_tiles - agreeing_pairs


@pytest.mark.parametrize("seed", [0, 1])
def test_jigsaw_hundred_permutations_distances(seed):
    """The documented statistics at 100 permutations of 9 tiles (jigsaw.py's docstring): max-avg reaches the
    largest average distance any 100 permutations can have, 8.08, with a minimum of 2; max-min keeps every pair
    at least 6 apart at a slightly smaller average."""
    avg = jigsaw.hamming_permutations(100, seed=seed, rule="max-avg").numpy()
    low = jigsaw.hamming_permutations(100, seed=seed, rule="max-min").numpy()
    for perms in (avg, low):
        assert perms.shape == (100, 9) and (np.sort(perms, axis=1) == np.arange(9)).all()
        assert len({tuple(p) for p in perms.tolist()}) == 100
    distances = {name: (p[:, None, :] != p[None, :, :]).sum(-1) for name, p in (("avg", avg), ("low", low))}
    off_diagonal = ~np.eye(100, dtype=bool)
    assert distances["avg"].sum() == _most_even_distance_sum(100, 9) == 79992
    assert distances["avg"][off_diagonal].mean() == pytest.approx(8.08, abs=1e-12)
    assert distances["avg"][off_diagonal].min() == 2
    assert distances["low"][off_diagonal].min() == 6
    assert 8.0 < distances["low"][off_diagonal].mean() < 8.08
    # the helpers jigsaw.py logs agree with the re-derivation
    assert jigsaw.mean_hamming_distance(torch.from_numpy(avg)) == pytest.approx(8.08, abs=1e-12)
    assert jigsaw.min_hamming_distance(torch.from_numpy(low)) == 6


def test_jigsaw_bad_permutation_rule_is_refused():
    with pytest.raises(ValueError, match="--permutation-rule"):
        jigsaw.hamming_permutations(10, rule="max-median")


def _cross_entropy_reference(logits, labels):
    """float64 mean of logsumexp(z) - z_y and its gradient (softmax(z) - onehot(y)) / B, written out."""
    z = logits.detach().double().numpy()
    y = labels.numpy()
    shifted = z - z.max(1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(1)) + z.max(1)
    loss = float(np.mean(log_norm - z[np.arange(len(y)), y]))
    softmax = np.exp(z - log_norm[:, None])
    grad = softmax.copy()
    grad[np.arange(len(y)), y] -= 1.0
    return loss, grad / len(y)


@pytest.mark.parametrize("loss_fn,classes", [(jigsaw.permutation_loss, 13), (rotnet.rotation_loss, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jigsaw_and_rotnet_losses_against_float64(loss_fn, classes, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(7, classes, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    labels = torch.randint(classes, (7,))
    loss = loss_fn(logits, labels)
    loss.backward()
    expected_loss, expected_grad = _cross_entropy_reference(logits, labels)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double(), torch.tensor(expected_loss, dtype=torch.float64), **tol)
    torch.testing.assert_close(logits.grad.double(), torch.from_numpy(expected_grad), **tol)


def test_jigsaw_classifier_reads_the_tiles_in_position_order():
    """JigsawNet in float64: the classifier sees [head(trunk(tile 0)), ..., head(trunk(tile 8))] concatenated by
    position, each tile through the same (siamese) trunk and head."""
    torch.manual_seed(0)
    args = cli.parse_args(jigsaw.Args, None, ["--arch", "resnet18", "--tile-dim", "5", "--num-permutations", "7"])
    model = jigsaw.JigsawNet(args).double().eval()
    tiles = torch.randn(3, 9, 3, 17, 17, dtype=torch.float64)
    with torch.no_grad():
        logits = model(tiles)
        per_tile = [model.tile_head(model.trunk(tiles[:, j])) for j in range(9)]
        expected = torch.cat(per_tile, dim=1) @ model.classifier.weight.T + model.classifier.bias
        swapped = model(tiles[:, [1, 0, 2, 3, 4, 5, 6, 7, 8]])
    assert logits.shape == (3, 7)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(swapped, logits)  # the order matters to the classifier


def test_jigsaw_tile_offsets_cover_every_position_in_the_cell():
    """Tiles of 7 px in 10 px cells start at offsets 0..3 on each axis, all four of them (the authors' data layer
    draws 0..jitter inclusive); each tile is found by matching it against every standardised 7 px window. The image
    view is view_recipe's on the per-image path, its puzzle jigsaw.puzzles on a batch of one."""
    args = cli.parse_args(jigsaw.Args, None, ["--resize-size", "30", "--crop-size", "30", "--tile-size", "7",
                                              "--grayscale-p", "0"])
    perms = jigsaw.hamming_permutations(5, seed=0)
    pixels = np.random.default_rng(1).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    image = torch.from_numpy(pixels).permute(2, 0, 1).double() / 255

    def standardised(t):
        return (t - t.mean(dim=(1, 2), keepdim=True)) / (t.std(dim=(1, 2), keepdim=True) + 1e-5)

    make_view = augment.PerImage(jigsaw.view_recipe(args))
    seen = set()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        view, = make_view(Image.fromarray(pixels))
        tiles, labels = jigsaw.puzzles(view[None], perms, args.tile_size, generator)
        tiles, label = tiles[0], labels[0]
        order = perms[int(label)].tolist()
        for position, tile in enumerate(tiles.double()):
            cell = order[position]  # position shows the tile cut from this cell
            matches = [(flip, dy, dx) for flip in (False, True) for dy in range(4) for dx in range(4)
                       if torch.allclose(tile, standardised((image.flip(2) if flip else image)[
                           :, (cell // 3) * 10 + dy:(cell // 3) * 10 + dy + 7,
                           (cell % 3) * 10 + dx:(cell % 3) * 10 + dx + 7]), atol=1e-3)]
            assert len(matches) == 1, (position, matches)
            seen.add(matches[0][1:])
    assert {dy for dy, _ in seen} == {dx for _, dx in seen} == {0, 1, 2, 3}


def _rotate_reference(image, k):
    """k quarter turns counter-clockwise of a [C, n, n] float64 array, pixel by pixel:
    one turn puts input pixel (row j, column n-1-i) at output pixel (i, j)."""
    out = image.copy()
    n = image.shape[-1]
    for _ in range(k):
        turned = np.empty_like(out)
        for i in range(n):
            for j in range(n):
                turned[:, i, j] = out[:, j, n - 1 - i]
        out = turned
    return out


def test_rotnet_four_rotations_on_odd_sizes():
    images = torch.randn(3, 2, 7, 7, dtype=torch.float64)
    rotated, labels = rotnet.rotate_batch(images, rotations=4)
    assert rotated.shape == (12, 2, 7, 7) and rotated.dtype == torch.float64
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for index, k in enumerate(labels.tolist()):
        expected = _rotate_reference(images[index % 3].numpy(), k)
        np.testing.assert_array_equal(rotated[index].numpy(), expected)


def test_rotnet_one_random_rotation_on_odd_sizes():
    images = torch.randn(41, 3, 5, 5, dtype=torch.float64)
    rotated, labels = rotnet.rotate_batch(images, rotations=1, generator=torch.Generator().manual_seed(3))
    assert set(labels.tolist()) == {0, 1, 2, 3}
    for image, out, k in zip(images, rotated, labels.tolist()):
        np.testing.assert_array_equal(out.numpy(), _rotate_reference(image.numpy(), k))
    # the batched device op alone, on an odd size, against the same reference
    k = torch.tensor([3, 1, 2, 0])
    for image, out, r in zip(images[:4], gpu_aug.apply_rot90(images[:4], k), k.tolist()):
        np.testing.assert_array_equal(out.numpy(), _rotate_reference(image.numpy(), r))


def test_rotnet_label_says_where_the_top_went_whatever_the_flip():
    """train()'s order, the crop and flip of view_recipe (its per-image path) then rotate_batch: a picture brighter at the top (a
    non-square one, cropped, resized to an odd size and flipped at random) shows its bright side at the top, left,
    bottom or right for labels 0, 1, 2, 3 (counter-clockwise turns). Rotating before the flip would put the top on
    the right for half of the 90-degree labels."""
    rows = np.linspace(250, 5, 45)[:, None, None] * np.ones((45, 37, 3))
    picture = Image.fromarray(rows.astype(np.uint8))
    args = cli.parse_args(rotnet.Args, None, ["--crop-size", "9", "--crop-scale", "0.3", "1.0"])
    transform = augment.PerImage(rotnet.view_recipe(args))  # image -> [view]
    torch.manual_seed(0)
    batch = torch.stack([transform(picture)[0] for _ in range(16)])
    rotated, labels = rotnet.rotate_batch(batch, rotations=4)
    brightness = rotated.mean(1)  # [N, 9, 9]
    sides = torch.stack([brightness[:, 0, :].mean(1), brightness[:, :, 0].mean(1),  # top, left
                         brightness[:, -1, :].mean(1), brightness[:, :, -1].mean(1)], 1)  # bottom, right
    assert torch.equal(sides.argmax(1), labels)

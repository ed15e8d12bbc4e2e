"""eval_linear's choice of head and its refit against a float64 re-derivation of the protocol.

The protocol, as written here from the script's docstring and VISSL's / DINO's linear evaluation:
features standardised with the population statistics of the training features (BatchNorm
without affine, eps 1e-5); each (lr, wd) head starts from normal(0, 0.01) weights (drawn with
the seed) and a zero bias and runs SGD with momentum 0.9 on the mean cross-entropy of its rows of
each batch plus wd/2 |W|^2, per-step rate lr x batch/256 x 0.5 (1 + cos(pi step / total)); an
epoch is a seeded permutation of the training rows cut into ceil(n / batch) near-equal batches.
Cross-validation holds a fold's rows out of every batch; the head with the most held-out images
right wins, ties going to the larger weight decay, then the smaller learning rate; the refit
runs the same recipe on all rows.
"""
import math

import numpy as np
import pytest
import torch

import eval_linear
from common import cli, dist


def linear_problem(n, d, n_classes, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=g) * 2
    y = torch.arange(n) % n_classes
    x = centres[y] + noise * torch.randn(n, d, generator=g) + 5.0  # an offset the standardisation removes
    return x.float(), y


def reference_batches(n, batch_size, seed, epoch):
    """ceil(n / batch) near-equal batches of the epoch's seeded permutation (the larger ones first)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    count = max(math.ceil(n / batch_size), 1)
    sizes = [n // count + (i < n % count) for i in range(count)]
    return list(perm.split(sizes))


def reference_sgd(x, y, rows_in, n_classes, lr, wd, epochs, batch_size, seed, momentum=0.9):
    """float64 SGD of one head on the rows with rows_in True (x already standardised); returns (W [D, C], b [C])."""
    x = x.double()
    w = torch.randn(x.shape[1], n_classes, generator=torch.Generator().manual_seed(seed)).double() * 0.01
    b = torch.zeros(n_classes, dtype=torch.float64)
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    steps = max(math.ceil(len(x) / batch_size), 1)
    total, step = epochs * steps, 0
    for epoch in range(epochs):
        for batch in reference_batches(len(x), batch_size, seed, epoch):
            rows = batch[rows_in[batch]]
            wv, bv = w.clone().requires_grad_(), b.clone().requires_grad_()
            if len(rows):
                loss = torch.nn.functional.cross_entropy(x[rows] @ wv + bv, y[rows])
                grad_w, grad_b = torch.autograd.grad(loss, [wv, bv])
            else:
                grad_w, grad_b = torch.zeros_like(w), torch.zeros_like(b)
            buf_w = momentum * buf_w + grad_w + wd * w
            buf_b = momentum * buf_b + grad_b
            rate = lr * batch_size / 256 * 0.5 * (1 + math.cos(math.pi * step / total))
            w, b = w - rate * buf_w, b - rate * buf_b
            step += 1
    return w, b


def standardise(x):
    x = x.double()
    return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)


def reference_folds(y, k, seed):
    """Each class's members in numpy's seeded order, dealt round the folds continuing from the previous class."""
    rng = np.random.default_rng(seed)
    folds, dealt = np.zeros(len(y), dtype=np.int64), 0
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        for j, i in enumerate(members):
            folds[i] = (dealt + j) % k
        dealt += len(members)
    return folds


def test_linear_stratified_folds_partition_every_class_evenly():
    y = np.r_[np.zeros(23), np.ones(10), np.full(4, 2)].astype(np.int64)[np.random.default_rng(1).permutation(37)]
    folds = eval_linear.stratified_folds(y, 5, seed=7).numpy()
    assert np.array_equal(folds, reference_folds(y, 5, 7))
    assert sorted(np.bincount(folds, minlength=5)) in ([7, 7, 7, 8, 8],)  # 37 images: sizes differ by at most one
    for c in range(3):
        per_fold = np.bincount(folds[y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    assert not np.array_equal(folds, eval_linear.stratified_folds(y, 5, seed=8).numpy())


def test_linear_sweep_groups_equal_float64_sgd_on_their_own_rows():
    """Every group of the one-pass sweep (3 folds and one holding nothing out) is plain SGD on its rows."""
    n, d, c, batch, epochs = 53, 7, 3, 16, 4
    x, y = linear_problem(n, d, c, noise=3.0, seed=0)
    folds = torch.from_numpy(reference_folds(y.numpy(), 3, 0))
    held_out = torch.cat([folds[:, None] == torch.arange(3), torch.zeros(n, 1, dtype=torch.bool)], 1)
    args = cli.parse_args(eval_linear.Args, None, ["--epochs", str(epochs), "--batch-size", str(batch)])
    stats = {"f": (x.mean(0), x.var(0, unbiased=False))}
    lrs, wds = (0.3, 3.0), (0.0, 0.05)
    heads = eval_linear.train_heads(eval_linear.cached_batches({"f": x}, y, torch.arange(n), held_out, batch, 5, "cpu"),
                                    {"f": d}, c, args, lrs, wds, math.ceil(n / batch), "cpu", seed=5, groups=4,
                                    stats=stats)
    xs = standardise(x)
    for group in range(4):
        for h, (lr, wd) in enumerate(heads.grid):
            w, b = reference_sgd(xs, y, ~held_out[:, group], c, lr, wd, epochs, batch, seed=5)
            head = heads.export("f", h, group)
            torch.testing.assert_close(head["weight"].double(), w, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(head["bias"].double(), b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(heads.weight["f"][:, 0], heads.weight["f"][:, 3])  # the groups did differ


def reference_cv(x, y, n_classes, lrs, wds, folds_k, epochs, batch, seed):
    """Held-out images right per (lr, wd) over the k folds, float64."""
    xs = standardise(x)
    folds = torch.from_numpy(reference_folds(y.numpy(), folds_k, seed + 1))
    grid = [(lr, wd) for lr in lrs for wd in wds]
    counts = []
    for lr, wd in grid:
        right = 0
        for f in range(folds_k):
            w, b = reference_sgd(xs, y, folds != f, n_classes, lr, wd, epochs, batch, seed)
            rows = folds == f
            right += int(((xs[rows] @ w + b).argmax(1) == y[rows]).sum())
        counts.append(right)
    return grid, counts


def reference_choice(grid, counts):
    """The most held-out images right; ties to the larger wd, then the smaller lr."""
    best = max(counts)
    return min((g for g, n in zip(grid, counts) if n == best), key=lambda g: (-g[1], g[0]))


@pytest.mark.parametrize("noise,expect_strongest", [(2.5, False), (0.05, True)])
def test_linear_cv_choice_and_refit_match_a_float64_reference(tmp_path, noise, expect_strongest):
    """On 61 training images (3 classes, 9-d) the probe picks the (lr, wd) a float64 3-fold CV picks, and
    the head it tests is the float64 SGD of that (lr, wd) on all 61 images with the validated schedule.
    With well-separated classes every reasonable head is perfect on the held-out folds: the tie goes to the
    strongest regularisation."""
    n, d, c, batch, epochs, seed = 61, 9, 3, 16, 3, 2
    x, y = linear_problem(n, d, c, noise, seed=11)
    xt, yt = linear_problem(45, d, c, noise, seed=12)
    lrs, wds = (0.01, 0.3, 3.0), (0.0, 0.02, 0.5)
    args = cli.parse_args(eval_linear.Args, None, [
        "--epochs", str(epochs), "--batch-size", str(batch), "--folds", "3", "--seed", str(seed),
        "--lrs", *map(str, lrs), "--weight-decays", *map(str, wds), "--save-head", str(tmp_path / "head.pth")])
    cache = {"train_features": {"pooled": x}, "train_labels": y, "test_features": {"pooled": xt},
             "test_labels": yt, "meta": {}}
    result = eval_linear.run_probe(args, dist.Runtime(0, 1, 0, torch.device("cpu")), cache)

    grid, counts = reference_cv(x, y, c, lrs, wds, 3, epochs, batch, seed)
    lr, wd = reference_choice(grid, counts)
    assert (result["lr"], result["weight_decay"]) == (lr, wd)
    assert result["val_top1"] == pytest.approx(100 * max(counts) / n, abs=1e-3)
    assert result["folds"] == 3 and result["n_val"] == n and result["n_train"] == n
    if expect_strongest:
        assert wd == max(wds) and len({g for g, k in zip(grid, counts) if k == max(counts)}) > 1
    else:
        assert counts.count(max(counts)) == 1 or wd == max(wds)  # the noisy problem's choice is not a tie to break

    w, b = reference_sgd(standardise(x), y, torch.ones(n, dtype=torch.bool), c, lr, wd, epochs, batch, seed)
    head = torch.load(tmp_path / "head.pth", weights_only=False)
    torch.testing.assert_close(head["weight"].double(), w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head["bias"].double(), b, rtol=1e-4, atol=1e-5)
    xts = (xt.double() - x.double().mean(0)) / torch.sqrt(x.double().var(0, unbiased=False) + 1e-5)
    assert result["top1"] == pytest.approx(100 * ((xts @ w + b).argmax(1) == yt).double().mean().item(), abs=1e-3)


def test_linear_ties_break_toward_stronger_regularisation():
    grid = [(lr, wd) for lr in (0.01, 0.1) for wd in (0.0, 1e-3)]
    assert eval_linear.choose([[5, 5, 5, 5]], grid, ["a"]) == (0, 1)  # wd 1e-3, lr 0.01
    assert eval_linear.choose([[5, 4, 5, 5]], grid, ["a"]) == (0, 3)  # wd 1e-3 at lr 0.1
    assert eval_linear.choose([[6, 4, 5, 5]], grid, ["a"]) == (0, 0)  # a strictly better head wins regardless
    assert eval_linear.choose([[1, 2, 3, 4], [4, 3, 9, 9]], grid, ["a", "b"]) == (1, 3)
    assert eval_linear.choose([[4, 4, 4, 4], [4, 4, 4, 4]], grid, ["a", "b"]) == (0, 1)


def test_linear_large_sets_choose_on_one_split_and_vtab_keeps_800_200():
    y = torch.arange(3000) % 10
    args = cli.parse_args(eval_linear.Args, None, ["--cv-below", "2000"])
    final, held_out, fit, val, _ = eval_linear.split_indices(y, args)
    assert held_out.shape == (3000, 1) and int(held_out.sum()) == 300 and set(final[held_out[:, 0]].tolist()) == \
        set(val.tolist()) and len(fit) == 2700
    args = cli.parse_args(eval_linear.Args, None, [])
    final, held_out, _, _, _ = eval_linear.split_indices(y, args)
    assert held_out.shape == (3000, 5) and torch.equal(held_out.sum(1), torch.ones(3000, dtype=torch.long))
    args = cli.parse_args(eval_linear.Args, None, ["--protocol", "vtab"])
    final, held_out, fit, val, seeds = eval_linear.split_indices(y, args)
    assert len(final) == 1000 and held_out.shape == (1000, 1) and held_out[800:].all() and not held_out[:800].any()
    assert torch.equal(final[:800], fit) and torch.equal(final[800:], val) and seeds == [0, 1, 2, 3, 4]

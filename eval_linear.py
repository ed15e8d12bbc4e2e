"""Linear probe of a frozen trunk: a grid of heads trained in one pass, chosen on held-out training images.

The protocol of VISSL's linear benchmarks (Goyal et al. 2019; `eval_mlp`: BatchNorm -> FC
on the pooled taps) and of SwAV / DINO (RandomResizedCrop + flip, SGD momentum 0.9, cosine,
100 epochs, lr x batch/256), with DINOv2's sweep (Oquab et al. 2023, Sec. 7: many heads,
learning rates x taps, trained at once on one stream of features). Every head of the
grid (learning rates x weight decays x `--layers`) is one slice of a [D, groups x heads, C]
weight, so a step is one GEMM (torch.addmm) for all of them.

Choice and refit. The head is chosen on training images held out of its training, never on
test (peers report the max over epochs on test): on training sets smaller than `--cv-below`
(20,000) by stratified `--folds`-fold cross-validation (5), every fold a group of heads trained
in the same pass with the fold's rows of each batch left out of its loss; on larger sets on
one seeded, class-balanced `--val-fraction` split (10%). The head with the most held-out images
right wins; ties go to the stronger regularisation (the larger weight decay, then the smaller
learning rate). It is then refit on all of train (`--refit`) exactly as it was validated: the
same init, epochs, per-step cosine schedule and steps per epoch (an epoch is the same seeded
permutation of the training rows cut into ceil(N / batch) near-equal batches), with every row
of each batch now in the loss, so the batch grows with the number of training images; the test
accuracy of that one head is reported, and the chosen values are in the JSON. On cached
features the BatchNorm uses the exact statistics of the training features (fixed, as the
limit of its running averages), so the features are standardised as for scikit-learn.

`--logreg` adds DINOv2's `log_regression` protocol on cached features: full-batch L-BFGS
multinomial logistic regression (sklearn's objective C * sum CE + |W|^2 / 2) for all C of a
log-spaced grid at once, C chosen on the validation split, refit on train + val.

Data modes: cached features (`--features`, or extracted once; no augmentation, the fast
default) and `--augment` (on-the-fly augmented crops through the frozen trunk in eval mode).
Protocols: `standard`; `vtab` (VTAB-1k, Zhai et al. 2019: 800 training images fit, 200 more
choose, the chosen setting is retrained on all 1000 with 5 seeds, test mean ± std; the 1000 are
a seeded sample of the training data, or with `--vtab-order given` the first 800 and the next
200 in order, which on a train800val200 list are VTAB-1k's own; VTAB's reference code fine-tunes
the whole network, this is its frozen-trunk linear version); `fraction` (1% / 10% of the
training images with their labels, the same number from every class, seeded: the shape of
SimCLR's ImageNet lists that VISSL's semi-supervised benchmark uses, which fine-tunes the whole
network on those fixed lists where this trains linear heads on a seeded draw).
`--save-head` writes the chosen head; `--eval-only --head FILE` tests it on other data
(pyVTAB's ImageNet -> ImageNet-v2 case).

Deviations from the original code: VISSL trains one head with a fixed lr and wd 5e-4, DINO
and DINOv2 sweep learning rates only and keep the best on their validation (or test) set. Here
the sweep also covers weight decays up to 0.1 (the decay a data set needs grows as it shrinks:
scikit-learn's C * sum CE + |W|^2 / 2 is mean CE + wd/2 |W|^2 with wd = 1 / (C N)), and small
sets choose by cross-validation, because the best of ~90 heads on a 200-image split is mostly
that split's noise (bench/bench_eval.py --accuracy compares the probe with a cross-validated
scikit-learn logistic regression: on CIFAR-10 features of a SimCLR and a random-init ResNet-18, with
2,000 / 1,000 / 50,000 training images, the default is -0.06 to +2.4 points from it). The BatchNorm of cached features uses fixed statistics
instead of per-batch ones. The held-out images' features (never their labels) take part in
those statistics, and with `--augment` in the batch statistics; held-out rows are masked out of
the loss rather than out of the batch, so a fold's heads see about (k-1)/k of each batch.
The cosine schedule is stepped every step (DINO and SwAV step CosineAnnealingLR once per
epoch). Weight decay applies to the weights only, never the bias (VISSL regularises the
bias; DINO's wd is 0, so there it is the same). The BatchNorm standardises each feature
dimension without an affine; VISSL's `eval_mlp` on the `vissl-*` taps is a BatchNorm2d (one
mean, variance and affine per channel over the pooled grid): the heads can represent the
same functions, only the optimisation's path differs.
`--logreg` standardises the features and runs 300 L-BFGS iterations (DINOv2: cuML on the raw
features, 1000 iterations) and holds out a class-balanced 10% (DINOv2: a random 10%).

    python eval_linear.py --weights ckpt.pth --train-data /imagenet/train --test-data /imagenet/val --augment
    python eval_linear.py --weights random --arch resnet18 --train-data cifar10-mini --image-size 32 --save-features f.pth
    python eval_linear.py --features f.pth --protocol vtab
    python eval_linear.py --features f.pth --logreg
"""
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T

from common import checkpoint, cli, data, dist, features

DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


@dataclass
class Args:
    weights: str = field(default="", metadata={"help": "checkpoint (any format) or 'random'; not needed with --features"})
    arch: str = ""
    cifar_stem: bool = None
    state_dict_key: str = ""
    remove_prefix: str = ""
    append_prefix: str = ""
    train_data: str = field(default="", metadata={"help": "SPEC or SPEC@SPLIT; default split train"})
    test_data: str = field(default="", metadata={"help": "default: the test split of --train-data"})
    features: str = field(default="", metadata={"help": "cached features file (from --save-features)"})
    save_features: str = ""
    layers: tuple[str, ...] = ("pooled",)
    protocol: str = field(default="standard", metadata={"choices": ["standard", "vtab", "fraction"]})  # standard: all labels; vtab: VTAB-1k 800/200; fraction: --label-fraction of the labels
    label_fraction: float = 0.01  # --protocol fraction: 0.01 or 0.1, the same number of images from every class
    vtab_order: str = field(default="shuffled", metadata={"choices": ["shuffled", "given"], "help":
                            "--protocol vtab: 'shuffled' fits on the first 800 of a seeded permutation of the "
                            "training images and chooses on the next 200; 'given' on the first 800 and next 200 "
                            "in the data's order: VTAB-1k's own images are a train800val200 list in that order "
                            "(scripts/vtab_from_tfds.py writes them)"})
    vtab_seeds: int = 5  # --protocol vtab: seeds averaged
    folds: int = 5  # k-fold cross-validation chooses the head on training sets smaller than --cv-below
    cv_below: int = 20000  # training sets smaller than this choose the head by --folds cross-validation
    val_fraction: float = 0.1  # else held out of train, per class, to choose the head (and for --logreg)
    refit: bool = True  # retrain the chosen head on all of train before testing
    lrs: tuple[float, ...] = DINOV2_LRS  # for a batch of 256, scaled linearly
    weight_decays: tuple[float, ...] = (0.0, 1e-5, 1e-4, 5e-4, 1e-3, 1e-2, 0.1)  # the grid's weight decays
    batch_norm: bool = True  # VISSL's eval_mlp BN -> FC (BN without affine: the FC absorbs it)
    epochs: int = 100
    batch_size: int = 256
    momentum: float = 0.9
    augment: bool = False  # on-the-fly RandomResizedCrop + flip through the frozen trunk
    logreg: bool = False  # DINOv2's L-BFGS logistic regression sweep over --logreg-cs instead of the SGD grid
    logreg_cs: tuple[float, ...] = tuple(float(c) for c in np.logspace(-6, 5, 45))  # DINOv2's grid
    logreg_iters: int = 300  # L-BFGS iterations per C
    save_head: str = ""  # write the chosen head here (for --eval-only --head)
    eval_only: bool = False  # only score a head saved by --save-head (--head) on the test set
    head: str = field(default="", metadata={"help": "with --eval-only: a head saved by --save-head"})
    image_size: int = field(default=0, metadata={"help": "crop size (0: the checkpoint's crop size, else 224)"})
    resize_size: int = 0
    precise_bn: int = field(default=0, metadata={"help": "re-estimate BatchNorm statistics on this many training "
                                                          "images before extracting (0: the checkpoint's)"})
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    output: str = ""


# ---------------------------------------------------------------- a grid of linear heads, batched
class Heads:
    """H = len(lrs) x len(wds) linear heads per group and layer, side by side: weight [D, G, H, C], bias [G, H, C].

    A group is one training set drawn from the same stream of batches: the rows of a batch that
    a group holds out (its cross-validation fold, or the validation split) do not reach its heads,
    so every fold of a cross-validation trains in the same pass. One GEMM x @ weight.view(D, G*H*C)
    gives the logits of every head ([B, G, H, C]); this layout is the [G*H, D, C] batched weight
    transposed so the batch needs no broadcast copy. BatchNorm without affine before the FC, shared
    by a layer's heads (it does not depend on their parameters): with `stats` {layer: (mean, var)}
    fixed statistics (the exact ones of the training features, the limit of the running averages),
    else batch statistics in training and running averages in evaluation. SGD with momentum,
    per-head lr and weight decay, on each group's mean cross-entropy over its rows of the batch.
    """

    def __init__(self, dims, n_classes, lrs, wds, batch_norm, momentum, device, seed=0, groups=1, stats=None):
        self.grid = [(lr, wd) for lr in lrs for wd in wds]
        self.n_classes, self.groups, h = n_classes, groups, len(self.grid)
        self.lr = torch.tensor([g[0] for g in self.grid], device=device)[:, None]
        self.wd = torch.tensor([g[1] for g in self.grid], device=device)[:, None]
        self.momentum, self.batch_norm, self.fixed = momentum, batch_norm, stats is not None
        g = torch.Generator().manual_seed(seed)  # VISSL/DINO's init: normal(0, 0.01), zero bias
        self.weight = {k: (torch.randn(d, 1, 1, n_classes, generator=g) * 0.01).repeat(1, groups, h, 1).to(device)
                       for k, d in dims.items()}
        self.bias = {k: torch.zeros(groups, h, n_classes, device=device) for k in dims}
        self.buf = {k: (torch.zeros_like(self.weight[k]), torch.zeros_like(self.bias[k])) for k in dims}
        if stats is not None:
            self.mean = {k: stats[k][0].to(device) for k in dims}
            self.var = {k: stats[k][1].to(device) for k in dims}
        else:
            self.mean = {k: torch.zeros(d, device=device) for k, d in dims.items()}
            self.var = {k: torch.ones(d, device=device) for k, d in dims.items()}

    def _normalise(self, layer, x, train):
        if not self.batch_norm:
            return x
        if train and not self.fixed:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            n = len(x)
            self.mean[layer].lerp_(mean, 0.1)  # BatchNorm1d's momentum 0.1, unbiased running variance
            self.var[layer].lerp_(var * n / max(n - 1, 1), 0.1)
        else:
            mean, var = self.mean[layer], self.var[layer]
        return (x - mean) / torch.sqrt(var + 1e-5)

    def _logits(self, layer, x):
        w = self.weight[layer]
        return torch.addmm(self.bias[layer].view(-1), x, w.view(w.shape[0], -1)).view(len(x), *self.bias[layer].shape)

    def logits(self, layer, x):
        """[B, G, H, C] logits of every head (eval mode)."""
        return self._logits(layer, self._normalise(layer, x.float(), False))

    def step(self, batch, labels, member, lr_scale):
        """One SGD step of every head on a batch {layer: [B, D]}; `member` [B, G] says which rows train which group.

        The gradient of each group's mean softmax cross-entropy over its rows, in closed form.
        """
        share = member.float() / member.sum(0).clamp_min(1)  # [B, G]: 1 / (the group's rows in the batch)
        for layer in self.weight:
            x = self._normalise(layer, batch[layer].float(), True)
            grad = self._logits(layer, x).softmax(-1)
            grad[torch.arange(len(labels)), :, :, labels] -= 1
            grad *= share[:, :, None, None]  # d (mean CE of each group) / d logits: [B, G, H, C]
            w, b = self.weight[layer], self.bias[layer]
            grad_w = (x.t() @ grad.view(len(x), -1)).view_as(w).add_(w * self.wd)
            buf_w, buf_b = self.buf[layer]
            buf_w.mul_(self.momentum).add_(grad_w)
            buf_b.mul_(self.momentum).add_(grad.sum(0))
            w.sub_(buf_w * (lr_scale * self.lr))
            b.sub_(buf_b * (lr_scale * self.lr))

    def correct(self, layer, x, labels, chunk=1024):
        """[N, G, H] bool: whether each head classifies each row of (x, labels) right."""
        return torch.cat([self.logits(layer, x[i:i + chunk]).argmax(-1) == labels[i:i + chunk, None, None]
                          for i in range(0, len(x), chunk)]) if len(x) else \
            torch.zeros(0, self.groups, len(self.grid), dtype=torch.bool, device=x.device)

    def export(self, layer, index, group=0):
        return {"layer": layer, "weight": self.weight[layer][:, group, index].cpu(),
                "bias": self.bias[layer][group, index].cpu(), "mean": self.mean[layer].cpu(),
                "var": self.var[layer].cpu(), "batch_norm": self.batch_norm}


def head_top1(head, x, labels):
    """Top-1 (%) of an exported head on raw features x: BatchNorm with its statistics (if any), then the FC."""
    x = x.float()
    if head["batch_norm"]:
        x = (x - head["mean"].to(x.device)) / torch.sqrt(head["var"].to(x.device) + 1e-5)
    predicted = (x @ head["weight"].to(x.device) + head["bias"].to(x.device)).argmax(1)
    return 100 * (predicted == labels).float().mean().item() if len(labels) else 0.0


def epoch_batches(n, batch_size, seed, epoch):
    """This epoch's seeded permutation of range(n) cut into ceil(n / batch_size) near-equal batches.

    Every sample is seen once per epoch and the number of steps depends only on n and the batch size.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.tensor_split(torch.randperm(n, generator=g), max(math.ceil(n / batch_size), 1))


def train_heads(batches, dims, n_classes, args, lrs, wds, steps_per_epoch, device, seed=0, groups=1, stats=None):
    """Train the grid for args.epochs with a per-step cosine schedule.

    `batches(epoch)` yields ({layer: x}, y, member [B, groups] bool). The per-step learning rate is
    lr x args.batch_size / 256 x cosine, whatever the number of rows each group gets in a step.
    """
    heads = Heads(dims, n_classes, lrs, wds, args.batch_norm, args.momentum, device, seed, groups, stats)
    total, step = args.epochs * steps_per_epoch, 0
    for epoch in range(args.epochs):
        for x, y, member in batches(epoch):
            scale = args.batch_size / 256 * 0.5 * (1 + math.cos(math.pi * step / total))
            heads.step(x, y, member, scale)
            step += 1
    return heads


def cached_batches(feats, labels, indices, held_out, batch_size, seed, device):
    """Batches of cached features of train rows `indices`; `held_out` [len(indices), G] bool masks them per group."""
    member = ~held_out.to(device)

    def batches(epoch):
        for chunk in epoch_batches(len(indices), batch_size, seed, epoch):
            idx = indices[chunk].to(device)
            yield {k: v[idx] for k, v in feats.items()}, labels[idx], member[chunk.to(device)]
    return batches


def augmented_batches(trunk, dataset, indices, held_out, layers, image_size, args, device):
    """Batches of frozen-trunk features of fresh RandomResizedCrop + flip crops of the train rows `indices`."""
    transform = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(features.MEAN, features.STD)])
    views = data.ViewDataset(torch.utils.data.Subset(dataset, indices.tolist()), transform, seed=args.seed)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    member = ~held_out.to(device)

    def batches(epoch):
        keys = [[(epoch, int(i)) for i in chunk] for chunk in epoch_batches(len(views), args.batch_size,
                                                                             args.seed, epoch)]
        loader = torch.utils.data.DataLoader(views, batch_sampler=keys, num_workers=args.workers,
                                             collate_fn=data.collate, pin_memory=device.type == "cuda")
        for images, y, index, _ in loader:
            with torch.no_grad(), dist.autocast(device, precision):
                out = features.taps(trunk, images.to(device, non_blocking=True), layers)
            yield {k: v.float() for k, v in out.items()}, y.to(device, non_blocking=True), member[index.to(device)]
    return batches


# ---------------------------------------------------------------- DINOv2's L-BFGS logistic regression
def logistic_regression(x, y, n_classes, cs, iters=300):
    """(weight [K, D, C], bias [K, C]) minimising C_k * sum_i CE_i + |W_k|^2 / 2 (sklearn's objective) for all C_k.

    The K problems are independent, so one L-BFGS on the sum of their objectives (each divided
    by C_k * N for conditioning) reaches every minimiser at once.
    """
    k, d = len(cs), x.shape[1]
    c = torch.as_tensor(cs, dtype=x.dtype, device=x.device)
    weight = torch.zeros(d, k * n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(k * n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=iters, history_size=20, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")
    targets = y[:, None].expand(len(y), k)

    def closure():
        optimizer.zero_grad()
        logits = torch.addmm(bias, x, weight).view(len(x), k, n_classes)
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(0)  # [K]
        loss = (ce + (weight.view(d, k, n_classes) ** 2).sum((0, 2)) / (2 * c * len(x))).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach().view(d, k, n_classes).permute(1, 0, 2), bias.detach().view(k, 1, n_classes)


def logreg_protocol(x_fit, y_fit, x_val, y_val, x_test, y_test, n_classes, cs, iters):
    """Choose C on val, refit on fit + val, test: DINOv2's log_regression."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6  # standardise (sklearn users do; helps L-BFGS)
    norm = lambda t: (t - mean) / std  # noqa: E731
    w, b = logistic_regression(norm(x_fit), y_fit, n_classes, cs, iters)
    val_acc = 100 * (torch.baddbmm(b, norm(x_val).expand(len(cs), *x_val.shape), w).argmax(-1) == y_val).float().mean(1)
    best = int(val_acc.argmax())
    x_all, y_all = torch.cat([x_fit, x_val]), torch.cat([y_fit, y_val])
    mean, std = x_all.mean(0), x_all.std(0) + 1e-6
    w, b = logistic_regression(norm(x_all), y_all, n_classes, [cs[best]], iters)
    test_acc = 100 * (torch.baddbmm(b, norm(x_test)[None], w).argmax(-1) == y_test).float().mean().item()
    return {"top1": test_acc, "C": cs[best], "val_top1": val_acc[best].item()}


# ---------------------------------------------------------------- protocols
def stratified_folds(labels, k, seed):
    """The fold (0..k-1) of every sample: each class's members, in a seeded order, dealt round the k folds."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    folds, dealt = np.zeros(len(labels), dtype=np.int64), 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        folds[members] = (dealt + np.arange(len(members))) % k  # the next class starts where this one stopped
        dealt += len(members)
    return torch.from_numpy(folds)


def label_subset(labels, fraction, seed):
    """round(fraction x N) training rows, the same number from every class (one more from seeded classes
    for the remainder), as SimCLR's 1% / 10% ImageNet lists hold 12-13 / 128-129 images of each class; a
    class with fewer images than its share gives all it has. Sorted row indices."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--label-fraction must be in (0, 1], got {fraction}.")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    total = max(len(classes), round(fraction * len(labels)))
    share = np.full(len(classes), total // len(classes))
    share[rng.permutation(len(classes))[:total % len(classes)]] += 1
    keep = []
    for label, n in zip(classes, share):
        members = np.flatnonzero(labels == label)
        keep.append(rng.choice(members, size=min(n, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def split_indices(labels, args):
    """The train rows of --protocol and how the head is chosen on them.

    Returns (final, held_out, fit, val, seeds): `final` the training images the chosen head is
    refit on, `held_out` [len(final), G] bool the rows each of the G sweep groups holds out
    (k folds, or the one validation split), `fit`/`val` one seeded split (--logreg chooses on it),
    and the seeds to report over.
    """
    n = len(labels)
    if args.protocol == "vtab":
        if n < 1000:
            raise ValueError(f"--protocol vtab needs at least 1000 training images (VTAB-1k), got {n}.")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)) \
            if args.vtab_order == "shuffled" else torch.arange(n)
        held_out = (torch.arange(1000) >= 800)[:, None]
        return order[:1000], held_out, order[:800], order[800:1000], list(range(args.vtab_seeds))
    pool = torch.arange(n)
    if args.protocol == "fraction":
        pool = torch.from_numpy(label_subset(labels.numpy(), args.label_fraction, args.seed))
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}.")
    if args.folds < 2:
        raise ValueError(f"--folds must be at least 2, got {args.folds}.")
    val = pool[torch.from_numpy(data.fraction_indices(labels[pool].numpy(), args.val_fraction, args.seed + 1))]
    is_val = torch.isin(pool, val)
    if len(pool) < args.cv_below:
        folds = stratified_folds(labels[pool].numpy(), args.folds, args.seed + 1)
        held_out = folds[:, None] == torch.arange(args.folds)
    else:
        held_out = is_val[:, None]
    return pool, held_out, pool[~is_val], val, [args.seed]


def choose(counts, grid, layers):
    """(layer index, head index) of the most held-out images classified right; ties go to the stronger
    regularisation: the larger weight decay, then the smaller learning rate, then the earlier layer.

    `counts` [layers, H]: integers, so equal scores are exact ties.
    """
    by_strength = sorted(range(len(grid)), key=lambda h: (-grid[h][1], grid[h][0]))
    return max(((layer, h) for h in by_strength for layer in range(len(layers))),
               key=lambda lh: counts[lh[0]][lh[1]])  # max keeps the first of equal keys


def run_probe(args, runtime, cache, trunk=None, datasets=None):
    """The linear protocol: sweep (every fold at once), choose on the held-out images, refit on all of train, test."""
    device = runtime.device
    train_labels_raw, test_labels_raw = cache["train_labels"], cache["test_labels"]
    classes = torch.unique(train_labels_raw)
    n_classes = len(classes)
    train_labels = torch.searchsorted(classes, train_labels_raw).to(device)
    test_labels = torch.searchsorted(classes, test_labels_raw).clamp_max(n_classes - 1).to(device)
    test_labels[~torch.isin(test_labels_raw.to(device), classes.to(device))] = -1  # classes unseen in train
    train_feats = {k: cache["train_features"][k].to(device) for k in args.layers}
    test_feats = {k: cache["test_features"][k].to(device) for k in args.layers}
    dims = {k: v.shape[1] for k, v in train_feats.items()}
    final, held_out, fit, val, seeds = split_indices(train_labels_raw, args)
    rows = final.to(device)
    steps = max(math.ceil(len(final) / args.batch_size), 1)  # the sweep's and every refit's steps per epoch
    stats = None
    if not args.augment:  # cached features: BatchNorm with the exact statistics of the training features
        stats = {k: (v[rows].mean(0), v[rows].var(0, unbiased=False)) for k, v in train_feats.items()}

    def batches_for(mask, seed):
        if args.augment:
            return augmented_batches(trunk, datasets[0], final, mask, args.layers, cache["meta"]["image_size"],
                                     dataclasses.replace(args, seed=seed), device)
        return cached_batches(train_feats, train_labels, final, mask, args.batch_size, seed, device)

    heads = train_heads(batches_for(held_out, args.seed), dims, n_classes, args, args.lrs, args.weight_decays,
                        steps, device, args.seed, held_out.shape[1], stats)
    mask = held_out.to(device)[:, :, None]
    counts = torch.stack([(heads.correct(k, train_feats[k][rows], train_labels[rows]) & mask).sum((0, 1))
                          for k in args.layers]).tolist()  # [layers, H]: held-out images right, all groups
    best_layer, best_head = choose(counts, heads.grid, args.layers)
    layer = args.layers[best_layer]
    lr, wd = heads.grid[best_head]
    n_val = int(held_out.sum())
    chosen = {"layer": layer, "lr": lr, "weight_decay": wd,
              "val_top1": round(100 * counts[best_layer][best_head] / max(n_val, 1), 3),
              "heads": len(heads.grid) * len(args.layers), "folds": held_out.shape[1]}
    refit = args.refit or args.protocol == "vtab"
    results, saved = [], None
    everything = torch.zeros(len(final), 1, dtype=torch.bool)  # the refit holds nothing out
    for seed in seeds:
        if refit:  # the validated recipe on all of train: same init, schedule, steps; all rows of each batch
            head = train_heads(batches_for(everything, seed), {layer: dims[layer]}, n_classes, args, [lr], [wd],
                               steps, device, seed, 1, stats).export(layer, 0)
        else:  # the first group's head: trained without its held-out images
            head = heads.export(layer, best_head, 0)
        results.append(head_top1(head, test_feats[layer], test_labels))
        saved = saved or head
    summary = {"top1": round(float(np.mean(results)), 3), "protocol": args.protocol, **chosen, "refit": refit}
    if len(results) > 1:
        summary.update(top1_std=round(float(np.std(results, ddof=1)), 3), top1_runs=[round(r, 3) for r in results])
    per_layer = [100 * max(c) / max(n_val, 1) for c in counts]
    summary["val_top1_per_layer"] = {k: round(v, 3) for k, v in zip(args.layers, per_layer)}
    summary.update(n_fit=len(final) - n_val // held_out.shape[1], n_val=n_val, n_train=len(final),
                   n_test=len(test_labels))
    if args.logreg:
        x = train_feats[layer]
        fit_d, val_d = fit.to(device), val.to(device)
        summary["logreg"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in logreg_protocol(
            x[fit_d], train_labels[fit_d], x[val_d], train_labels[val_d], test_feats[layer],
            test_labels, n_classes, args.logreg_cs, args.logreg_iters).items()}
    if args.save_head and runtime.is_main:
        checkpoint.save_atomic({**saved, "classes": classes.cpu(), "chosen": chosen,
                                "meta": cache["meta"]}, args.save_head)
    return summary


def load_head(path):
    """A head written by --save-head, with every part checked: layer, weight [D, C], bias [C], classes [C],
    batch_norm, and with it mean and var [D] (finite, var >= 0); anything else is one sentence."""
    head = checkpoint.load(path)
    if not isinstance(head, dict) or not isinstance(head.get("layer"), str) or \
            not isinstance(head.get("batch_norm"), bool):
        raise checkpoint.CheckpointError(f"{path} is not a head saved by eval_linear.py --save-head.")

    def part(key, shape, floating=True):
        value = head.get(key)
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_quantized or \
                value.is_complex() or value.is_floating_point() != floating or value.dtype == torch.bool or \
                value.dim() != len(shape) or any(n is not None and n != m for n, m in zip(shape, value.shape)) or \
                0 in value.shape or (floating and not bool(torch.isfinite(value).all())):
            size = "x".join(str(n or "?") for n in shape)
            raise checkpoint.CheckpointError(f"{path} is damaged: its '{key}' is not a finite {size} "
                                             f"{'floating-point' if floating else 'integer'} tensor.")
        return value

    d, c = part("weight", (None, None)).shape
    head = dict(head, weight=head["weight"].float(), bias=part("bias", (c,)).float(),
                classes=part("classes", (c,), floating=False).long())
    if head["batch_norm"]:
        head.update(mean=part("mean", (d,)).float(), var=part("var", (d,)).float())
        if bool((head["var"] < 0).any()):
            raise checkpoint.CheckpointError(f"{path} is damaged: its BatchNorm variance is negative.")
    return head


def eval_only(args, cache, device):
    """Test a head saved by --save-head on the test features (another dataset, same classes)."""
    head = load_head(args.head)
    layer = head["layer"]
    if layer not in cache["test_features"]:
        raise ValueError(f"the head was trained on layer {layer!r}, which the features do not hold.")
    x = cache["test_features"][layer].to(device).float()
    if x.shape[1] != head["weight"].shape[0]:
        raise ValueError(f"the head expects {head['weight'].shape[0]}-d features, got {x.shape[1]}-d.")
    if head["batch_norm"]:
        x = (x - head["mean"].to(device)) / torch.sqrt(head["var"].to(device) + 1e-5)
    predicted = head["classes"].to(device)[(x @ head["weight"].to(device) + head["bias"].to(device)).argmax(1)]
    top1 = 100 * (predicted == cache["test_labels"].to(device)).float().mean().item()
    return {"top1": round(top1, 3), "layer": layer, "head": args.head, "n_test": len(x)}


def main(argv=None):
    args = cli.parse_args(Args, None, argv, description=__doc__.split("\n")[0])
    cli.check_output_file(args.output)
    if args.augment and args.features:
        raise ValueError("--augment needs images (--weights and --train-data), not --features.")
    if args.eval_only and not args.head:
        raise ValueError("--eval-only needs --head (a file written by --save-head).")
    if not args.lrs or not args.weight_decays or args.epochs < 1:
        raise ValueError("--lrs and --weight-decays must be non-empty and --epochs positive.")
    runtime = dist.setup(args.device)
    started = time.time()
    try:
        if args.eval_only:
            args.layers = (load_head(args.head)["layer"],)
        trunk = datasets = None
        if args.augment:  # features of centre crops for val/test; training crops come from the images
            datasets = (data.build_split(args.train_data, "train"),
                        data.build_split(args.test_data or args.train_data, "test"))
        cache = features.compute_or_load(args, runtime, *(datasets or ()))
        if args.augment:
            torch.manual_seed(args.seed)
            trunk, info = features.load_trunk(args.weights, args.arch or None, args.cifar_stem,
                                              args.state_dict_key or None, args.remove_prefix or None,
                                              args.append_prefix or None)
            if args.precise_bn:  # the same statistics as the cached val/test features
                transform = features.eval_transform(args.image_size or info.get("train_crop_size", 224),
                                                    args.resize_size or None)
                features.precise_bn(trunk, datasets[0], transform, args.precise_bn, args.batch_size, args.workers,
                                    runtime.device, args.precision, args.seed)
            trunk = trunk.to(runtime.device).eval().requires_grad_(False)
        if not runtime.is_main:
            return None
        if cache["train_labels"].dim() != 1:
            raise ValueError("eval_linear.py needs single-label data; use eval_svm.py for N x C multi-label targets.")
        summary = eval_only(args, cache, runtime.device) if args.eval_only else run_probe(args, runtime, cache, trunk,
                                                                                           datasets)
        summary.update(weights=cache["meta"].get("weights"), seconds=round(time.time() - started, 1))
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(summary) + "\n")
        print(json.dumps(summary), flush=True)
        return summary
    finally:
        dist.cleanup()


if __name__ == "__main__":
    cli.run(main)

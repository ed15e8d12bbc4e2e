"""Linear probe of a frozen trunk: a grid of heads trained in one pass, chosen on a validation split.

The protocol of VISSL's linear benchmarks (Goyal et al. 2019; `eval_mlp`: BatchNorm -> FC
on the pooled taps) and of SwAV / DINO (RandomResizedCrop + flip, SGD momentum 0.9, cosine,
100 epochs, lr x batch/256), with DINOv2's sweep (Oquab et al. 2023, Sec. 7: many heads,
learning rates x taps, trained at once on one stream of features). Every head of the
grid (learning rates x weight decays x `--layers`) is one slice of a [D, heads, C] weight,
so a step is one GEMM (torch.addmm) for all of them. The head is chosen on a
seeded validation split carved from train (never on test: peers report the max over
epochs on test), then refit on all of train with the chosen values (`--refit`), and the
test accuracy of that one head is reported; the chosen values are in the JSON.

`--logreg` adds DINOv2's `log_regression` protocol on cached features: full-batch L-BFGS
multinomial logistic regression (sklearn's objective C * sum CE + |W|^2 / 2) for all C of a
log-spaced grid at once, C chosen on the validation split, refit on train + val.

Data modes: cached features (`--features`, or extracted once; no augmentation, the fast
default) and `--augment` (on-the-fly augmented crops through the frozen trunk in eval mode).
Protocols: `standard`; `vtab` (VTAB-1k, Zhai et al. 2019: the first 800 training images fit,
the next 200 choose, the chosen setting is retrained on all 1000 with 5 seeds, test mean ±
std); `fraction` (1% / 10% of the labels per class, seeded, as VISSL's semi-supervised splits).
`--save-head` writes the chosen head; `--eval-only --head FILE` tests it on other data
(pyVTAB's ImageNet -> ImageNet-v2 case).

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
    protocol: str = field(default="standard", metadata={"choices": ["standard", "vtab", "fraction"]})
    label_fraction: float = 0.01  # --protocol fraction: 0.01 or 0.1 as VISSL's semi-supervised splits
    vtab_order: str = field(default="shuffled", metadata={"choices": ["shuffled", "given"], "help":
                            "VTAB's train800/val200 are the first images of TFDS's shuffled train split; "
                            "'shuffled' takes a seeded permutation first, 'given' the file order"})
    vtab_seeds: int = 5
    val_fraction: float = 0.1  # held out of train, per class, to choose the head
    refit: bool = True  # retrain the chosen head on all of train before testing
    lrs: tuple[float, ...] = DINOV2_LRS  # for a batch of 256, scaled linearly
    weight_decays: tuple[float, ...] = (0.0, 1e-5, 1e-4, 5e-4)
    batch_norm: bool = True  # VISSL's eval_mlp BN -> FC (BN without affine: the FC absorbs it)
    epochs: int = 100
    batch_size: int = 256
    momentum: float = 0.9
    augment: bool = False  # on-the-fly RandomResizedCrop + flip through the frozen trunk
    logreg: bool = False
    logreg_cs: tuple[float, ...] = tuple(float(c) for c in np.logspace(-6, 5, 45))  # DINOv2's grid
    logreg_iters: int = 300
    save_head: str = ""
    eval_only: bool = False
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
    """H = len(lrs) x len(wds) linear heads on each layer, stored side by side: weight [D, H, C], bias [H, C].

    One GEMM x @ weight.view(D, H*C) gives the logits of every head ([B, H, C]); this layout is
    the [H, D, C] batched weight transposed so the batch needs no broadcast copy. Optional
    BatchNorm without affine before the FC (shared by a layer's heads: it does not depend on
    their parameters). SGD with momentum, per-head lr and weight decay.
    """

    def __init__(self, dims, n_classes, lrs, wds, batch_norm, momentum, device, seed=0):
        self.grid = [(lr, wd) for lr in lrs for wd in wds]
        self.n_classes, h = n_classes, len(self.grid)
        self.lr = torch.tensor([g[0] for g in self.grid], device=device)[:, None]
        self.wd = torch.tensor([g[1] for g in self.grid], device=device)[:, None]
        self.momentum, self.batch_norm = momentum, batch_norm
        g = torch.Generator().manual_seed(seed)  # VISSL/DINO's init: normal(0, 0.01), zero bias
        self.weight = {k: (torch.randn(d, 1, n_classes, generator=g) * 0.01).repeat(1, h, 1).to(device)
                       for k, d in dims.items()}
        self.bias = {k: torch.zeros(h, n_classes, device=device) for k in dims}
        self.buf = {k: (torch.zeros_like(self.weight[k]), torch.zeros_like(self.bias[k])) for k in dims}
        self.mean = {k: torch.zeros(d, device=device) for k, d in dims.items()}
        self.var = {k: torch.ones(d, device=device) for k, d in dims.items()}

    def _normalise(self, layer, x, train):
        if not self.batch_norm:
            return x
        if train:
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
        """[B, H, C] logits of every head (eval mode)."""
        return self._logits(layer, self._normalise(layer, x.float(), False))

    def step(self, batch, labels, lr_scale):
        """One SGD step of every head on a batch {layer: [B, D]}; the gradients of softmax CE in closed form."""
        for layer in self.weight:
            x = self._normalise(layer, batch[layer].float(), True)
            grad = self._logits(layer, x).softmax(-1)
            grad[torch.arange(len(labels)), :, labels] -= 1
            grad /= len(labels)  # d mean CE / d logits: [B, H, C]
            w, b = self.weight[layer], self.bias[layer]
            grad_w = (x.t() @ grad.view(len(x), -1)).view_as(w).add_(w * self.wd)
            buf_w, buf_b = self.buf[layer]
            buf_w.mul_(self.momentum).add_(grad_w)
            buf_b.mul_(self.momentum).add_(grad.sum(0))
            w.sub_(buf_w * (lr_scale * self.lr))
            b.sub_(buf_b * (lr_scale * self.lr))

    def accuracy(self, layer, x, labels, chunk=4096):
        """Top-1 (%) of every head on (x, labels): [H]."""
        correct = torch.zeros(len(self.grid), device=x.device)
        for i in range(0, len(x), chunk):
            correct += (self.logits(layer, x[i:i + chunk]).argmax(-1) == labels[i:i + chunk, None]).sum(0)
        return 100 * correct / max(len(x), 1)

    def export(self, layer, index):
        return {"layer": layer, "weight": self.weight[layer][:, index].cpu(), "bias": self.bias[layer][index].cpu(),
                "mean": self.mean[layer].cpu(), "var": self.var[layer].cpu(), "batch_norm": self.batch_norm}


def train_heads(batches, dims, n_classes, args, lrs, wds, steps_per_epoch, device, seed=0):
    """Train the grid for args.epochs with a per-step cosine schedule; `batches(epoch)` yields ({layer: x}, y)."""
    heads = Heads(dims, n_classes, lrs, wds, args.batch_norm, args.momentum, device, seed)
    total, step = args.epochs * steps_per_epoch, 0
    for epoch in range(args.epochs):
        for x, y in batches(epoch):
            scale = args.batch_size / 256 * 0.5 * (1 + math.cos(math.pi * step / total))
            heads.step(x, y, scale)
            step += 1
    return heads


def cached_batches(feats, labels, indices, batch_size, seed, device):
    """Shuffled mini-batches of cached features (drop_last unless the set is smaller than a batch)."""
    def batches(epoch):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = indices[torch.randperm(len(indices), generator=g)]
        for i in range(0, max(len(order) - batch_size + 1, 1), batch_size):
            idx = order[i:i + batch_size].to(device)
            yield {k: v[idx] for k, v in feats.items()}, labels[idx]
    return batches


def augmented_batches(trunk, dataset, indices, layers, image_size, args, device):
    """Mini-batches of frozen-trunk features of freshly augmented crops (RandomResizedCrop + flip)."""
    transform = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(features.MEAN, features.STD)])
    views = data.ViewDataset(torch.utils.data.Subset(dataset, indices.tolist()), transform, seed=args.seed)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")

    def batches(epoch):
        sampler = data.EpochSampler(len(views), seed=args.seed)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(views, batch_size=args.batch_size, sampler=sampler,
                                             num_workers=args.workers, collate_fn=data.collate, drop_last=True,
                                             pin_memory=device.type == "cuda")
        for images, y, _, _ in loader:
            with torch.no_grad(), dist.autocast(device, precision):
                out = features.taps(trunk, images.to(device, non_blocking=True), layers)
            yield {k: v.float() for k, v in out.items()}, y.to(device, non_blocking=True)
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
def split_indices(labels, args):
    """(fit, val, final-train) index tensors of train and the seeds to report over, for --protocol."""
    n = len(labels)
    if args.protocol == "vtab":
        if n < 1000:
            raise ValueError(f"--protocol vtab needs at least 1000 training images (VTAB-1k), got {n}.")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)) \
            if args.vtab_order == "shuffled" else torch.arange(n)
        return order[:800], order[800:1000], order[:1000], list(range(args.vtab_seeds))
    pool = torch.arange(n)
    if args.protocol == "fraction":
        pool = torch.from_numpy(data.fraction_indices(labels.numpy(), args.label_fraction, args.seed))
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}.")
    val = pool[torch.from_numpy(data.fraction_indices(labels[pool].numpy(), args.val_fraction, args.seed + 1))]
    fit = pool[~torch.isin(pool, val)]
    return fit, val, pool, [args.seed]


def run_probe(args, runtime, cache, trunk=None, datasets=None):
    """The linear protocol: sweep on fit, choose on val, (refit on all of train,) test; returns the summary."""
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
    fit, val, final, seeds = split_indices(train_labels_raw, args)
    steps = lambda idx: max(len(idx) // args.batch_size, 1)  # noqa: E731

    def batches_for(idx, seed):
        if args.augment:
            return augmented_batches(trunk, datasets[0], idx, args.layers, cache["meta"]["image_size"],
                                     dataclasses.replace(args, seed=seed), device)
        return cached_batches(train_feats, train_labels, idx, args.batch_size, seed, device)

    heads = train_heads(batches_for(fit, args.seed), dims, n_classes, args, args.lrs, args.weight_decays,
                        steps(fit), device, args.seed)
    val_idx = val.to(device)
    val_acc = {k: heads.accuracy(k, train_feats[k][val_idx], train_labels[val_idx]) for k in args.layers}
    scores = torch.stack([val_acc[k] for k in args.layers])  # [layers, H]
    best_layer, best_head = divmod(int(scores.flatten().argmax()), len(heads.grid))
    layer = args.layers[best_layer]
    lr, wd = heads.grid[best_head]
    chosen = {"layer": layer, "lr": lr, "weight_decay": wd, "val_top1": round(scores.max().item(), 3),
              "heads": len(heads.grid) * len(args.layers)}
    results = []
    for seed in seeds:
        if args.refit or args.protocol == "vtab":
            refit = train_heads(batches_for(final, seed), {layer: dims[layer]}, n_classes, args, [lr], [wd],
                                steps(final), device, seed)
            final_head = refit.export(layer, 0)
            acc = refit.accuracy(layer, test_feats[layer], test_labels)[0].item()
        else:
            final_head = heads.export(layer, best_head)
            acc = heads.accuracy(layer, test_feats[layer], test_labels)[best_head].item()
        results.append(acc)
    summary = {"top1": round(float(np.mean(results)), 3), "protocol": args.protocol, **chosen,
               "refit": args.refit or args.protocol == "vtab"}
    if len(results) > 1:
        summary.update(top1_std=round(float(np.std(results, ddof=1)), 3), top1_runs=[round(r, 3) for r in results])
    summary["val_top1_per_layer"] = {k: round(v.max().item(), 3) for k, v in val_acc.items()}
    summary.update(n_fit=len(fit), n_val=len(val), n_train=len(final), n_test=len(test_labels))
    if args.logreg:
        x = train_feats[layer]
        summary["logreg"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in logreg_protocol(
            x[fit.to(device)], train_labels[fit.to(device)], x[val_idx], train_labels[val_idx], test_feats[layer],
            test_labels, n_classes, args.logreg_cs, args.logreg_iters).items()}
    if args.save_head and runtime.is_main:
        checkpoint.save_atomic({**final_head, "classes": classes.cpu(), "chosen": chosen,
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

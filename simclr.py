"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations.

Chen, Kornblith, Norouzi, Hinton, ICML 2020 (https://arxiv.org/abs/2002.05709).

Two random views of every image pass through a ResNet trunk and an MLP projection
head; the NT-Xent loss (Eq. 1) makes each view pick out its partner among all
2N - 1 other views of the global batch. Defaults follow VISSL's simclr_8node_resnet
(ResNet-50, head 2048-2048-128 without BatchNorm, temperature 0.1, LARS on every
parameter, 0.3 x batch/256, wd 1e-6 on every parameter, 10 warmup epochs from 1/8 of
the peak lr, then cosine to 0, SyncBN); `--crops 2x160,4x96` is VISSL's multi-crop
variant (crop scales (0.08, 1) and (0.05, 0.14)). `--preset cifar` is the paper's own
CIFAR-10 recipe, with its code's choices: `--head-bn`, `--exclude-bias-and-norm`,
warmup from 0.

Deviations from the original code:
- Multi-crop negatives come from every rank. VISSL's multicrop_simclr_info_nce_loss
  contrasts each positive pair only with the crops of the images on its own GPU, so
  its loss (and the recipe) changes with the number of GPUs; here the loss on any
  number of processes equals the loss of one process on the global batch. Positives
  (every ordered pair of views of an image) and the averaging are VISSL's.
- Crops are resized bicubically, as in the paper's code (VISSL: bilinear).
- Blur (p 0.5, sigma in [0.1, 2]) uses a kernel of 10% of the view's side, as in the
  paper's code; VISSL blurs with PIL, untruncated. The two agree closely for 160- and
  224-px views; 96-px multi-crop views are blurred with a 9-px kernel, which cuts off
  the widest sigmas.
- VISSL's warmup starts at the lr of one 8-GPU node's batch and is dropped on a
  single node; here it starts at --warmup-start-lr x batch/256 on any machine, which
  equals VISSL's 0.6 for its 4096-image recipe.
- After the warmup the cosine runs from the peak to 0 over the remaining steps, as in
  the paper's code; VISSL's composite scheduler evaluates it at the run's overall
  progress, so its lr is already 4.68 (of 4.8) when the warmup ends and 2.4 at mid-run.
- Colour jitter is torchvision's (contrast towards the grayscale mean, saturation a blend with
  grayscale; the paper's TF code: each channel's own mean, and HSV), images are normalised
  with ImageNet's statistics (the paper's code does not normalise), and the crop is
  torchvision's RandomResizedCrop (the TF sampler keeps at least 10% of the image).
- `--preset cifar` follows the paper's code except in two places that VISSL shares with
  every LARS run here: the loss is the mean over the 2N views (the paper's code adds
  the two directions' means, twice that: the parameters left out of LARS take half its
  step), and LARS is Apex's LARC (the lr applied after the momentum; the paper's code
  keeps it inside the momentum buffer, which differs while the warmup raises the lr).

    torchrun --nproc_per_node=8 simclr.py --data /datasets/imagenet/train --epochs 100
    python simclr.py --preset cifar --data cifar10 --epochs 800
    python simclr.py --preset cpu   # the CPU recipe of its convergence test

The views are stated once (`view_recipe`); common/augment.py builds both data paths from them: per image
with PIL in the data workers, or, on CUDA (`--gpu-aug`, common/gpu_aug.py), batched on the GPU after
decode-only workers (bilinear crops without antialias; the per-image path's crop is bicubic).
Speed (common/speed.py): channels_last, bf16 autocast, `--compile`.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from common import augment, cli, dist, models, ops, optim
from common.cli import parse_crops
from common.run import Run, RunArgs, launch


@dataclass
class Args(RunArgs):
    arch: str = "resnet50"
    cifar_stem: bool = False
    epochs: int = 100
    batch_size: int = 64  # per process: VISSL uses 64 x 64 GPUs = 4096
    lr: float = 0.3  # for a global batch of 256, scaled linearly (4096 -> 4.8)
    final_lr: float = 0.0
    warmup_epochs: float = 10.0
    warmup_start_lr: float = 0.0375  # linear warmup from here, also per 256 images (VISSL: 0.6 -> 4.8 at 4096)
    weight_decay: float = 1e-6
    exclude_bias_and_norm: bool = field(default=False, metadata={
        "help": "biases and BatchNorm parameters get neither weight decay nor LARS adaptation (the paper's code); "
                "off: every parameter gets both (VISSL)"})
    momentum: float = 0.9
    temperature: float = 0.1
    hidden_dim: int = 2048
    embedding_dim: int = 128
    head_bn: bool = field(default=False, metadata={
        "help": "the paper's head: BatchNorm after both linear layers, the last one without shift; "
                "off: Linear-ReLU-Linear with biases (VISSL)"})
    crops: str = field(default="2x224", metadata={"help": "views as NxSIZE groups, e.g. 2x160,4x96 (multi-crop)"})
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    small_crop_scale: tuple[float, ...] = (0.05, 0.14)  # for crop groups after the first
    jitter_strength: float = 1.0  # colour jitter (0.8s, 0.8s, 0.8s, 0.2s) ...
    jitter_p: float = 0.8  # ... applied with probability 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    sync_bn: bool = True
    output_dir: str = "runs/simclr"

PRESETS = {
    "cifar": dict(_doc="the paper's CIFAR-10 recipe (App. B.9 and its code): ResNet-18 with the CIFAR stem, 32 px, "
                       "no blur, jitter 0.5, batch 512, T=0.5, warmup from 0, BN head, no decay or LARS on "
                       "biases and BN",
                  arch="resnet18", cifar_stem=True, crops="2x32", batch_size=512, lr=1.0, temperature=0.5,
                  hidden_dim=512, jitter_strength=0.5, blur_p=0.0, epochs=800, warmup_epochs=10, workers=4,
                  warmup_start_lr=0.0, head_bn=True, exclude_bias_and_norm=True, output_dir="runs/simclr-cifar"),
}

# the recipe the CPU convergence test, demo.py and bench/convergence.py run: `--preset cpu` alone
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test and demo.py: --preset cifar with the "
                            "ImageNet stem at 32 px on the embedded cifar10-mini, 8 epochs, batch 256, lr 2.0, T=0.2"),
                      data="cifar10-mini", cifar_stem=False, workers=2, epochs=8, warmup_epochs=1.0, batch_size=256,
                      lr=2.0, temperature=0.2, output_dir="runs/simclr-cpu")


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """SimCLR's views (paper App. A), stated once for both data paths (common/augment.py): crop, flip, colour
    distortion of strength s, grayscale, optional blur (kernel 10% of the image side, sigma in [0.1, 2.0]).
    The first crop group at --crop-scale, later ones at --small-crop-scale."""
    s = args.jitter_strength
    return [(count, augment.View(size, scale=tuple(args.crop_scale if group == 0 else args.small_crop_scale),
                                 interpolation="bicubic", jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
                                 jitter_p=args.jitter_p, grayscale_p=args.grayscale_p, blur_p=args.blur_p,
                                 blur_kernel_size=2 * (size // 20) + 1))
            for group, (count, size) in enumerate(parse_crops(args.crops))]


# ----------------------------------------------------------------------------- model

def projection_head(dims, batch_norm):
    """g(.): VISSL's Linear-ReLU-Linear with biases, or with `batch_norm` the paper's code's
    Linear-BN-ReLU-Linear-BN without biases, whose last BN scales but does not shift."""
    if not batch_norm:
        return models.mlp(dims, batch_norm=False)
    head = models.mlp(dims, batch_norm=True, last_bn=True)
    head[-1].bias.requires_grad_(False)  # stays 0: the paper's center=False
    return head


class SimCLR(nn.Module):
    """ResNet trunk + MLP projection head g(.) (paper Sec. 2.1); returns L2-normalised z."""

    def __init__(self, args):
        super().__init__()
        self.trunk = models.build_trunk(args.arch, args.cifar_stem)
        self.head = projection_head([self.trunk.feature_dim, args.hidden_dim, args.embedding_dim], args.head_bn)

    def forward(self, views):
        """views: list of [n, 3, H, W] batches; same-size views share one trunk pass (SwAV's trick), and the head
        (its BatchNorm, with --head-bn) sees every view at once, as VISSL's multi-resolution forward."""
        features, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-1] == views[start].shape[-1]:
                end += 1
            features.append(self.trunk(torch.cat(views[start:end])))
            start = end
        z = self.head(torch.cat(features))
        return nn.functional.normalize(z if z.dtype == torch.float64 else z.float(), dim=1)


# ----------------------------------------------------------------------------- loss

def nt_xent_loss(z, n_views, temperature):
    """NT-Xent (Eq. 1) over the global batch; with more than two views, VISSL's multi-crop form.

    z: [n_views * n, d], view-major (row v*n + i is view v of image i), normalised.
    Keys are every rank's z (gradients flow back to their owners).

    Two views: each view picks out its partner among the other 2N - 1 views of the
    global batch (its own column is left out).

    More views (VISSL's multicrop_simclr_info_nce_loss): every ordered pair of views of
    one image is a positive, n_views * (n_views - 1) terms per image, large and small
    crops alike. Each term is -log(e^s_pos / (e^s_pos + sum of e^s_neg)) where the
    negatives are the views of the OTHER images only: the image's remaining views are
    neither positive nor negative in that term. The loss is the plain mean of all terms.
    Unlike VISSL, the negatives come from every rank, so the loss does not change with
    the number of processes.
    """
    keys = dist.gather_with_grad(z)
    n = len(z) // n_views
    rows = torch.arange(len(z), device=z.device)
    offset = dist.rank() * len(z)
    if n_views == 2:
        positive = offset + (rows + n) % len(z)
        return ops.contrastive_loss(z, keys, positive, temperature, self_index=offset + rows)
    if len(keys) == n_views:  # a single image in the global batch has no negatives: nothing to contrast
        return (z * 0).sum()
    view, image = rows // n, rows % n
    logits = z @ keys.t() / temperature  # [n_views * n, world * n_views * n]
    same_image = offset + torch.arange(n_views, device=z.device) * n + image[:, None]  # [rows, n_views]
    negatives = torch.logsumexp(logits.scatter(1, same_image, -math.inf), dim=1)
    shifts = torch.arange(1, n_views, device=z.device)
    positives = logits.gather(1, same_image.gather(1, (view[:, None] + shifts) % n_views))  # the other views
    # -log(e^p / (e^p + e^negatives)) = log(1 + e^(negatives - p))
    return nn.functional.softplus(negatives[:, None] - positives).mean()


# ----------------------------------------------------------------------------- training

def build_optimizer(model, args):
    """LARS (LARC, trust coefficient 0.001, no clipping) with momentum; see --exclude-bias-and-norm."""
    groups = optim.param_groups(model, args.weight_decay, exclude_bias_and_norm=args.exclude_bias_and_norm)
    return optim.LARS([g for g in groups if g["params"]], lr=0.0, momentum=args.momentum)


def train(args, runtime):
    n_views = sum(count for count, _ in parse_crops(args.crops))
    if n_views < 2:
        raise ValueError(f"SimCLR needs at least two views per image, --crops {args.crops} gives {n_views}.")
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("simclr", args, runtime)
    loader = run.loader(None, view_recipe(args))
    model, core = run.wrap(SimCLR(args), sync_bn=args.sync_bn)
    optimizer, scaler = build_optimizer(core, args), run.grad_scaler()
    run.resume(core, optimizer, scaler)

    # ---- the method: edit here
    peak_lr = optim.scaled_lr(args.lr, run.global_batch)
    start_lr = optim.scaled_lr(args.warmup_start_lr, run.global_batch)
    warmup_steps = round(args.warmup_epochs * run.steps_per_epoch)
    run.start(f"peak lr {peak_lr:.4g}, ops backend {ops.backend(run.device)}")
    model.train()
    for epoch in run.epochs():
        for views, indices in run.batches(loader):
            lr = optim.warmup_cosine(run.step, run.total_steps, warmup_steps, peak_lr, args.final_lr, start_lr)
            optim.set_lr(optimizer, lr)
            with run.autocast():
                z = model(views)
            loss = nt_xent_loss(z, n_views, args.temperature)
            mean_loss = run.sync(loss)
            optimizer.zero_grad(set_to_none=True)
            if run.finite_loss(mean_loss, lr, views):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.finite_grads(core, mean_loss, lr, scaler, views):
                    scaler.step(optimizer)
                scaler.update()
            run.log(loss=mean_loss.item(), lr=lr)
    return run.finish()


def main(argv=None):
    return launch(train, Args, PRESETS, __doc__, argv)


if __name__ == "__main__":
    cli.run(main)

"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction.

Zbontar, Jing, Misra, LeCun, Deny, ICML 2021 (https://arxiv.org/abs/2103.03230).

Two distorted views of every image pass through the same ResNet trunk and projector. Each embedding
dimension is standardised over the batch (a BatchNorm without affine parameters), and the loss pushes the
cross-correlation matrix C of the two views' standardised embeddings towards the identity (Eq. 1-2):

    C_ij = sum_b z1_bi z2_bj / N,    L = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2,

the diagonal term making the embedding invariant to the distortions, the off-diagonal term decorrelating
its dimensions (redundancy reduction). No negatives, no predictor, no momentum encoder.

Defaults follow the paper's 1000-epoch ImageNet recipe and the official code (facebookresearch/barlowtwins,
main.py): ResNet-50 whose residual blocks start their last BatchNorm at zero, projector 8192-8192-8192
(Linear-BN-ReLU twice, then Linear, no biases), lambda 0.0051, batch 2048, LARS (eta 0.001, momentum 0.9)
with the decay added before the trust ratio, biases and BatchNorm parameters excluded from weight decay and
adaptation and given their own lr: 0.2 (weights) and 0.0048 (biases) x batch/256, weight decay 1.5e-6 (the
paper; the code's default is 1e-6), 10 warmup epochs from 0, then cosine to 0.001 x the peak, SyncBN. Views:
BYOL's asymmetric pair, bicubic crop 0.08-1 at 224, flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8,
grayscale 0.2, Gaussian blur (sigma in [0.1, 2]) with p 1.0 / 0.1 and solarisation with p 0.0 / 0.2 on
view 1 / view 2.

Deviations from the original code:
- The gradient is that of the loss on the global batch, on any number of processes. The original sums the
  processes' cross-correlation matrices with torch.distributed.all_reduce, which autograd does not see: each
  GPU back-propagates through its own images only, and DDP's averaging then gives the gradient of
  L / (number of GPUs) (on 2 processes exactly half the gradient). Here the sum, and the standardisation's
  moments, go through a differentiable all-reduce (common.dist.all_reduce_with_grad). With LARS the scale of
  the gradient matters only relative to the weight decay and for the biases and BatchNorm parameters, which
  are not adapted: `--scale-loss` 1/W (0.0625 for 16 GPUs) gives the original's updates on W GPUs. The
  loss value is the same.
- The standardisation is computed in the loss, over the global batch, without BatchNorm's running
  statistics (the original's SyncBatchNorm keeps them but never uses them). The loss is computed in
  float32 (the original: under fp16 autocast).
- Blur: a Gaussian kernel of 10% of the view's side (23 px at 224, more than 5 sigma); the original blurs
  with PIL's ImageFilter.GaussianBlur, which approximates the Gaussian with box filters.
- An epoch is floor(N / batch) steps: the last, smaller batch is dropped, where the original's loader keeps
  it. On ImageNet at 2048 that is 625 steps an epoch against 626, and the warmup and cosine are 0.16%
  shorter (6,250 and 625,000 steps against 6,260 and 626,000 over 1000 epochs).

    torchrun --nproc_per_node=8 barlow_twins.py --data /datasets/imagenet/train --batch-size 256   # 2048 in all
    python barlow_twins.py --preset cifar --data cifar10
    python barlow_twins.py --preset cpu   # a 2-core CPU recipe on the embedded cifar10-mini

The views are stated once (`view_recipe`); common/augment.py builds both data paths from it: per image
with PIL in the data workers, or, on CUDA (`--gpu-aug`), batched on the GPU after decode-only workers
(common/gpu_aug.py; bilinear crops without antialias). Speed (common/speed.py): channels_last,
bf16 autocast, `--compile`.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from common import augment, cli, dist, models, optim
from common.run import Run, RunArgs, launch


@dataclass
class Args(RunArgs):
    arch: str = "resnet50"
    cifar_stem: bool = False
    zero_init_residual: bool = field(default=True, metadata={
        "help": "start each residual block's last BatchNorm scale at 0 (the original's torchvision ResNet-50)"})
    epochs: int = 1000
    batch_size: int = 128  # per process: 2048 in all, the paper's batch (e.g. 128 x 16 GPUs)
    lr: float = 0.2  # the weights' lr for a global batch of 256, scaled linearly (2048 -> 1.6)
    lr_biases: float = 0.0048  # the biases' and BatchNorm parameters' lr, also per 256 images
    final_lr_fraction: float = 0.001  # the cosine ends at this fraction of the peak lrs
    warmup_epochs: float = 10.0
    weight_decay: float = 1.5e-6  # on weights only: biases and BatchNorm parameters get neither decay nor LARS
    momentum: float = 0.9
    trust_coefficient: float = 0.001  # LARS's eta
    lars: str = field(default="original", metadata={
        "choices": ["original", "apex"],
        "help": "original: trust ratio eta |w| / |g + wd w| (the authors' LARS); apex: eta |w| / (|g| + wd |w|), "
                "clipped at the lr with --lars-clip (Apex's LARC, solo-learn's)"})
    lars_clip: bool = False  # Apex's clip mode: the adapted rate is min(lr * ratio, lr) (--lars apex only)
    lambd: float = 0.0051  # weight of the off-diagonal (redundancy reduction) term
    scale_loss: float = 1.0  # the loss times this (solo-learn's scale_loss; 1/W: the original's gradient on W GPUs)
    projector: tuple[int, ...] = (8192, 8192, 8192)  # widths of the projector's linear layers
    image_size: int = 224
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    jitter: tuple[float, ...] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # probability of the colour jitter
    grayscale_p: float = 0.2
    blur_p: tuple[float, ...] = (1.0, 0.1)  # probability of the Gaussian blur, per view
    solarize_p: tuple[float, ...] = (0.0, 0.2)  # probability of solarisation, per view
    sync_bn: bool = True
    output_dir: str = "runs/barlow_twins"


PRESETS = {
    "cifar": dict(_doc="solo-learn's CIFAR-10 recipe (scripts/pretrain/cifar/barlow.yaml, 92.10 linear after 1000 "
                       "epochs): ResNet-18 with the CIFAR stem at 32 px, projector 2048-2048-2048, batch 256, "
                       "LARS lr 0.3 for every parameter with Apex's clipped trust ratio eta 0.02, wd 1e-4, loss "
                       "x 0.1, 10 warmup epochs then cosine to 0, no blur, solarisation 0 / 0.2",
                  arch="resnet18", cifar_stem=True, zero_init_residual=False, image_size=32, batch_size=256, lr=0.3,
                  lr_biases=0.3, final_lr_fraction=0.0, weight_decay=1e-4, lars="apex", lars_clip=True,
                  trust_coefficient=0.02, scale_loss=0.1, projector=(2048, 2048, 2048), blur_p=(0.0, 0.0),
                  workers=4, output_dir="runs/barlow_twins-cifar"),
}
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test: --preset cifar with the ImageNet stem "
                            "at 32 px on the embedded cifar10-mini, 8 epochs with 1 of warmup, batch 256, and "
                            "SimCLR's LARS (trust coefficient 0.001, unclipped) at lr 2.0 for weights and biases: "
                            "the cifar recipe's eta 0.02 clipped at lr 0.3 moves each layer by up to 2 % of its "
                            "norm per step, and its 120 steps ended below the random-init trunk"),
                      data="cifar10-mini", cifar_stem=False, workers=2, epochs=8, warmup_epochs=1.0,
                      trust_coefficient=0.001, lars_clip=False, lr=2.0, lr_biases=2.0,
                      output_dir="runs/barlow_twins-cpu")


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """The two asymmetric views (BYOL's, as the original's Transform), stated once for both data paths
    (common/augment.py): the same crop, flip, jitter and grayscale, blur p 1.0 / 0.1 and solarisation p 0.0 / 0.2
    for view 1 / view 2. Bicubic crops; the blur's kernel is 10% of the side (23 px at 224), sigma in [0.1, 2]."""
    augment.check_per_view(2, blur_p=args.blur_p, solarize_p=args.solarize_p)
    size = args.image_size
    return [(1, augment.View(size, scale=tuple(args.crop_scale), interpolation="bicubic", jitter=tuple(args.jitter),
                             jitter_p=args.jitter_p, grayscale_p=args.grayscale_p, blur_p=blur,
                             blur_kernel_size=2 * (size // 20) + 1, solarize_p=solarize))
            for blur, solarize in zip(args.blur_p, args.solarize_p)]


# ----------------------------------------------------------------------------- model

def projector(dims):
    """The original's projector: Linear-BN-ReLU blocks between `dims`, the last one a Linear; no biases."""
    layers = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


class BarlowTwins(nn.Module):
    """ResNet trunk + projector; returns the embeddings [z1, z2] of the two views."""

    def __init__(self, args):
        super().__init__()
        if not args.projector or min(args.projector) < 1:
            raise ValueError(f"--projector takes positive layer widths, got {args.projector}.")
        self.trunk = models.build_trunk(args.arch, args.cifar_stem, zero_init_residual=args.zero_init_residual)
        self.projector = projector([self.trunk.feature_dim, *args.projector])

    def forward(self, views):
        """Each view through the network on its own, as in the original (BatchNorm statistics per view)."""
        return [self.projector(self.trunk(v)) for v in views]


# ----------------------------------------------------------------------------- loss

def standardise(z, n, eps=1e-5):
    """BatchNorm1d(affine=False) in training mode over the global batch of `n` rows (every process's rows):
    (z - mean) / sqrt(biased variance + eps) per dimension."""
    mean = dist.all_reduce_with_grad(z.sum(dim=0)) / n
    centred = z - mean
    variance = dist.all_reduce_with_grad(centred.pow(2).sum(dim=0)) / n
    return centred / torch.sqrt(variance + eps)


def cross_correlation(z1, z2):
    """C [D, D] of the two views' standardised embeddings over the global batch: z1, z2 are this process's
    [n, D] rows; the sum over processes keeps its gradient (every process gets the same C)."""
    n = len(z1) * dist.world_size()
    return dist.all_reduce_with_grad(standardise(z1, n).t() @ standardise(z2, n)) / n


def barlow_twins_loss(z1, z2, lambd):
    """(loss, on-diagonal term, off-diagonal term): sum_i (1 - C_ii)^2 + lambd sum_{i != j} C_ij^2 (Eq. 1),
    the same on every process: the loss of the global batch. Float32 even under autocast."""
    z1, z2 = [z if z.dtype == torch.float64 else z.float() for z in (z1, z2)]
    c = cross_correlation(z1, z2)
    diagonal = torch.diagonal(c)
    on_diag = (1 - diagonal).pow(2).sum()
    off_diag = (c - torch.diag_embed(diagonal)).pow(2).sum()  # the diagonal is exactly 0 there
    return on_diag + lambd * off_diag, on_diag, off_diag


# ----------------------------------------------------------------------------- training

def build_optimizer(model, args):
    """LARS with two groups, as the original: weights (decayed, adapted, lr --lr) and biases + BatchNorm
    parameters (1-D: neither, lr --lr-biases)."""
    weights, biases = optim.param_groups(model, args.weight_decay, exclude_bias_and_norm=True)
    return optim.LARS([weights, biases], lr=0.0, momentum=args.momentum, trust_coefficient=args.trust_coefficient,
                      clip=args.lars_clip, decayed_norm=args.lars == "original")


def train(args, runtime):
    if args.lars_clip and args.lars != "apex":
        raise ValueError("--lars-clip is Apex's clip mode: use it with --lars apex.")
    if args.batch_size * runtime.world_size < 2:
        raise ValueError("Barlow Twins standardises each dimension over the batch: it needs at least two images "
                         f"in the global batch, got --batch-size {args.batch_size} x {runtime.world_size} "
                         "process(es).")
    views_recipe = view_recipe(args)
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("barlow_twins", args, runtime)
    loader = run.loader(None, views_recipe)
    model, core = run.wrap(BarlowTwins(args), sync_bn=args.sync_bn)
    optimizer, scaler = build_optimizer(core, args), run.grad_scaler()
    run.resume(core, optimizer, scaler)

    # ---- the method: edit here
    batch_scale = run.global_batch / 256  # the original's linear scaling, both lrs
    warmup_steps = round(args.warmup_epochs * run.steps_per_epoch)
    run.start(f"peak lrs {args.lr * batch_scale:.4g} (weights) / {args.lr_biases * batch_scale:.4g} (biases), "
              f"lambda {args.lambd}")
    model.train()
    for epoch in run.epochs():
        for views, indices in run.batches(loader):
            # warmup from 0, then cosine from the peak to final_lr_fraction x the peak (the original's schedule)
            factor = batch_scale * optim.warmup_cosine(run.step, run.total_steps, warmup_steps, 1.0,
                                                       args.final_lr_fraction)
            weights, biases = optimizer.param_groups
            weights["lr"], biases["lr"] = factor * args.lr, factor * args.lr_biases
            with run.autocast():
                z1, z2 = model(views)
            loss, on_diag, off_diag = barlow_twins_loss(z1, z2, args.lambd)
            loss = args.scale_loss * loss
            mean_loss = run.sync(loss)  # the same on every process
            optimizer.zero_grad(set_to_none=True)
            terms = dict(zip(("on_diag", "off_diag"), torch.stack([on_diag, off_diag]).detach().tolist()))
            if run.finite_loss(mean_loss, weights["lr"], views, terms):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.finite_grads(core, mean_loss, weights["lr"], scaler, views):
                    scaler.step(optimizer)
                scaler.update()
            run.log(loss=mean_loss.item(), lr=weights["lr"], lr_biases=biases["lr"], **terms)
    return run.finish()


def main(argv=None):
    return launch(train, Args, PRESETS, __doc__, argv)


if __name__ == "__main__":
    cli.run(main)

"""VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning.

Bardes, Ponce, LeCun, ICLR 2022 (https://arxiv.org/abs/2105.04906).

Two views of every image pass through the same ResNet trunk and expander; the loss on the two batches of
embeddings Z, Z' [N, D] (Eq. 6) is

    lambda s(Z, Z') + mu [v(Z) + v(Z')] / 2 + nu [c(Z) + c(Z')],

with the invariance s = mean squared distance between the two views' embeddings (Eq. 5), the variance
v(Z) = mean_j relu(1 - sqrt(Var(z_j) + 1e-4)) keeping each dimension's standard deviation over the batch
at 1 or above (Eq. 1), and the covariance c(Z) = sum_{i != j} C(Z)_ij^2 / D decorrelating the dimensions
(Eq. 3-4; C the covariance matrix over the batch, normalised by N - 1, as the variance). No negatives, no
predictor, no momentum encoder, and no normalisation of the embeddings.

Defaults follow the paper's 1000-epoch ImageNet recipe and the official code (facebookresearch/vicreg,
main_vicreg.py): ResNet-50 whose residual blocks start their last BatchNorm at zero, expander 8192-8192-8192
(Linear-BN-ReLU twice, then a Linear without bias), lambda = mu = 25, nu = 1, batch 2048, LARS (eta 0.001,
momentum 0.9) with the decay added before the trust ratio, biases and BatchNorm parameters excluded from
weight decay (1e-6) and adaptation, lr 0.2 x batch/256, 10 warmup epochs from 0 then cosine to 0.001 x the
peak, SyncBN. Views: bicubic crop 0.08-1 at 224, flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8,
grayscale 0.2, Gaussian blur (sigma in [0.1, 2]) with p 1.0 / 0.1 and solarisation with p 0.0 / 0.2 on
view 1 / view 2 (the original's augmentations.py).

Across processes, as in the original: the variance and covariance terms see the embeddings of every
process (gathered with their gradient, the original's FullGatherLayer), while the invariance term is each
process's own mean squared error. The processes' batches are equal, so the mean of the per-process losses
(what is logged) is the loss of one process on the global batch, and DDP's gradient averaging gives exactly
its gradient (tested with 2 processes).

Deviations from the original code:
- The loss is computed in float32 (the original: under fp16 autocast).
- Blur: a Gaussian kernel of 10% of the view's side (23 px at 224, more than 5 sigma); the original blurs
  with PIL's ImageFilter.GaussianBlur, which approximates the Gaussian with box filters.
- An epoch is floor(N / batch) steps: the last, smaller batch is dropped, where the original's loader keeps
  it. On ImageNet at 2048 that is 625 steps an epoch against 626, and the warmup and cosine are 0.16%
  shorter (6,250 and 625,000 steps against 6,260 and 626,000 over 1000 epochs).
- The covariance is normalised by the batch actually seen minus 1; the original divides by --batch-size - 1,
  the same except for the original's smaller last batch of an epoch, which this loader drops.

    torchrun --nproc_per_node=8 vicreg.py --data /datasets/imagenet/train --batch-size 256   # 2048 in all
    python vicreg.py --preset cifar --data cifar10
    python vicreg.py --preset cpu   # a 2-core CPU recipe on the embedded cifar10-mini

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
        "help": "start each residual block's last BatchNorm scale at 0 (the original's ResNet-50)"})
    epochs: int = 1000
    batch_size: int = 128  # per process: 2048 in all, the paper's batch (e.g. 128 x 16 GPUs)
    lr: float = 0.2  # for a global batch of 256, scaled linearly (2048 -> 1.6)
    final_lr_fraction: float = 0.001  # the cosine ends at this fraction of the peak lr
    warmup_epochs: float = 10.0
    weight_decay: float = 1e-6  # on weights only: biases and BatchNorm parameters get neither decay nor LARS
    momentum: float = 0.9
    trust_coefficient: float = 0.001  # LARS's eta
    lars: str = field(default="original", metadata={
        "choices": ["original", "apex"],
        "help": "original: trust ratio eta |w| / |g + wd w| (the authors' LARS); apex: eta |w| / (|g| + wd |w|), "
                "clipped at the lr with --lars-clip (Apex's LARC, solo-learn's)"})
    lars_clip: bool = False  # Apex's clip mode: the adapted rate is min(lr * ratio, lr) (--lars apex only)
    sim_coeff: float = 25.0  # lambda, the invariance term's weight
    std_coeff: float = 25.0  # mu, the variance term's weight (the term averages the two branches)
    cov_coeff: float = 1.0  # nu, the covariance term's weight (the term sums the two branches)
    mlp: tuple[int, ...] = (8192, 8192, 8192)  # widths of the expander's linear layers
    image_size: int = 224
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    jitter: tuple[float, ...] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # probability of the colour jitter
    grayscale_p: float = 0.2
    blur_p: tuple[float, ...] = (1.0, 0.1)  # probability of the Gaussian blur, per view
    solarize_p: tuple[float, ...] = (0.0, 0.2)  # probability of solarisation, per view
    sync_bn: bool = True
    output_dir: str = "runs/vicreg"


PRESETS = {
    "cifar": dict(_doc="solo-learn's CIFAR-10 recipe (scripts/pretrain/cifar/vicreg.yaml, 92.07 linear after 1000 "
                       "epochs): ResNet-18 with the CIFAR stem at 32 px, expander 2048-2048-2048, batch 256, LARS "
                       "lr 0.3 with Apex's clipped trust ratio eta 0.02, wd 1e-4, 10 warmup epochs then cosine to "
                       "0, crop scale 0.2-1, no blur, solarisation 0.1 on both views; mu 50 here is solo-learn's "
                       "25, whose variance term sums the two branches instead of averaging them",
                  arch="resnet18", cifar_stem=True, zero_init_residual=False, image_size=32, batch_size=256, lr=0.3,
                  final_lr_fraction=0.0, weight_decay=1e-4, lars="apex", lars_clip=True, trust_coefficient=0.02,
                  std_coeff=50.0, mlp=(2048, 2048, 2048), crop_scale=(0.2, 1.0), blur_p=(0.0, 0.0),
                  solarize_p=(0.1, 0.1), workers=4, output_dir="runs/vicreg-cifar"),
}
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test: --preset cifar with the ImageNet stem "
                            "at 32 px on the embedded cifar10-mini, 8 epochs with 1 of warmup, batch 256, and "
                            "SimCLR's LARS (trust coefficient 0.001, unclipped) at lr 2.0: the cifar recipe's eta "
                            "0.02 clipped at lr 0.3 moves each layer by up to 2 % of its norm per step, and its "
                            "120 steps diverged"),
                      data="cifar10-mini", cifar_stem=False, workers=2, epochs=8, warmup_epochs=1.0,
                      trust_coefficient=0.001, lars_clip=False, lr=2.0, output_dir="runs/vicreg-cpu")


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """The two views of the original's augmentations.py (BYOL's asymmetric pair), stated once for both data
    paths (common/augment.py): the same crop, flip, jitter and grayscale, blur p 1.0 / 0.1 and solarisation
    p 0.0 / 0.2 for view 1 / view 2. Bicubic crops; the blur's kernel is 10% of the side (23 px at 224), sigma
    in [0.1, 2]."""
    augment.check_per_view(2, blur_p=args.blur_p, solarize_p=args.solarize_p)
    size = args.image_size
    return [(1, augment.View(size, scale=tuple(args.crop_scale), interpolation="bicubic", jitter=tuple(args.jitter),
                             jitter_p=args.jitter_p, grayscale_p=args.grayscale_p, blur_p=blur,
                             blur_kernel_size=2 * (size // 20) + 1, solarize_p=solarize))
            for blur, solarize in zip(args.blur_p, args.solarize_p)]


# ----------------------------------------------------------------------------- model

def expander(dims):
    """The original's expander: Linear-BN-ReLU blocks between `dims`, the last one a Linear without bias."""
    layers = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


class VICReg(nn.Module):
    """ResNet trunk + expander; returns the embeddings [z1, z2] of the two views."""

    def __init__(self, args):
        super().__init__()
        if not args.mlp or min(args.mlp) < 1:
            raise ValueError(f"--mlp takes positive layer widths, got {args.mlp}.")
        self.trunk = models.build_trunk(args.arch, args.cifar_stem, zero_init_residual=args.zero_init_residual)
        self.expander = expander([self.trunk.feature_dim, *args.mlp])

    def forward(self, views):
        """Each view through the network on its own, as in the original (BatchNorm statistics per view)."""
        return [self.expander(self.trunk(v)) for v in views]


# ----------------------------------------------------------------------------- loss

def variance_term(z, eps=1e-4):
    """v(Z) = mean over dimensions of relu(1 - sqrt(Var(z_j) + eps)), the variance unbiased (Eq. 1)."""
    return torch.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance_term(z):
    """c(Z) = sum of the squared off-diagonal entries of the covariance matrix (normalised by N - 1), / D."""
    n, d = z.shape
    z = z - z.mean(dim=0)
    cov = z.t() @ z / (n - 1)
    return (cov - torch.diag_embed(torch.diagonal(cov))).pow(2).sum() / d


def vicreg_loss(z1, z2, sim_coeff, std_coeff, cov_coeff):
    """(loss, its three terms): z1, z2 are this process's [n, D] embeddings of the two views.

    The invariance term is this process's mean squared error; the variance and covariance terms are computed
    on every process's embeddings (gathered with their gradient). With equal batches on every process, the
    mean of the processes' losses is the loss of the global batch. Float32 even under autocast."""
    z1, z2 = [z if z.dtype == torch.float64 else z.float() for z in (z1, z2)]
    invariance = nn.functional.mse_loss(z1, z2)
    z1, z2 = dist.gather_with_grad(z1), dist.gather_with_grad(z2)
    variance = (variance_term(z1) + variance_term(z2)) / 2
    covariance = covariance_term(z1) + covariance_term(z2)
    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return loss, dict(invariance=invariance, variance=variance, covariance=covariance)


# ----------------------------------------------------------------------------- training

def build_optimizer(model, args):
    """LARS; biases and BatchNorm parameters (1-D) without weight decay or adaptation (the original's
    exclude_bias_and_norm), all at the same lr."""
    groups = optim.param_groups(model, args.weight_decay, exclude_bias_and_norm=True)
    return optim.LARS([g for g in groups if g["params"]], lr=0.0, momentum=args.momentum,
                      trust_coefficient=args.trust_coefficient, clip=args.lars_clip,
                      decayed_norm=args.lars == "original")


def train(args, runtime):
    if args.lars_clip and args.lars != "apex":
        raise ValueError("--lars-clip is Apex's clip mode: use it with --lars apex.")
    if args.batch_size * runtime.world_size < 2:
        raise ValueError("VICReg's variance and covariance are taken over the batch: it needs at least two images "
                         f"in the global batch, got --batch-size {args.batch_size} x {runtime.world_size} "
                         "process(es).")
    views_recipe = view_recipe(args)
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("vicreg", args, runtime)
    loader = run.loader(None, views_recipe)
    model, core = run.wrap(VICReg(args), sync_bn=args.sync_bn)
    optimizer, scaler = build_optimizer(core, args), run.grad_scaler()
    run.resume(core, optimizer, scaler)

    # ---- the method: edit here
    peak_lr = optim.scaled_lr(args.lr, run.global_batch)
    warmup_steps = round(args.warmup_epochs * run.steps_per_epoch)
    run.start(f"peak lr {peak_lr:.4g}, coefficients {args.sim_coeff} / {args.std_coeff} / {args.cov_coeff}")
    model.train()
    for epoch in run.epochs():
        for views, indices in run.batches(loader):
            # warmup from 0, then cosine from the peak to final_lr_fraction x the peak (the original's schedule)
            lr = optim.warmup_cosine(run.step, run.total_steps, warmup_steps, peak_lr, args.final_lr_fraction * peak_lr)
            optim.set_lr(optimizer, lr)
            with run.autocast():
                z1, z2 = model(views)
            loss, terms = vicreg_loss(z1, z2, args.sim_coeff, args.std_coeff, args.cov_coeff)
            mean_loss = run.sync(loss)
            # the terms of the global batch (the variance and covariance already are), for the log
            terms = dict(zip(terms, dist.all_reduce_mean(torch.stack(list(terms.values())).detach()).tolist()))
            optimizer.zero_grad(set_to_none=True)
            if run.finite_loss(mean_loss, lr, views, terms):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.finite_grads(core, mean_loss, lr, scaler, views):
                    scaler.step(optimizer)
                scaler.update()
            run.log(loss=mean_loss.item(), lr=lr, **terms)
    return run.finish()


def main(argv=None):
    return launch(train, Args, PRESETS, __doc__, argv)


if __name__ == "__main__":
    cli.run(main)

"""BYOL: Bootstrap Your Own Latent, a new approach to self-supervised learning.

Grill, Strub, Altché, Tallec, Richemond, Buchatskaya, Doersch, Pires, Guo, Azar, Piot, Kavukcuoglu, Munos,
Valko, NeurIPS 2020 (https://arxiv.org/abs/2006.07733).

An online network (trunk, projector g, predictor q) learns to predict, from one view of an image, the
projection that a target network gives for another view (Sec. 3.1). The target network has the online
network's architecture without the predictor; its weights are an exponential moving average of the online
weights, xi <- tau xi + (1 - tau) theta, with tau raised from tau_base to 1 along a cosine (Sec. 3.2). The loss
is the normalised mean squared error 2 - 2 cos(q(z1), sg(z2')) (Eq. 2), symmetrised over the two views (Eq. 4).
No negatives are used.

Defaults follow the paper's 1000-epoch ImageNet recipe (App. B, C and the official byol_experiment.py):
ResNet-50 whose bottleneck blocks start their last BatchNorm at zero (the Haiku ResNet BYOL uses), projector
and predictor Linear-BN-ReLU-Linear 4096-256, tau_base 0.996, LARS (trust 1e-3, momentum 0.9) with the
decay added before the trust ratio as in BYOL's own LARS, biases and BatchNorm parameters excluded from both
weight decay (1.5e-6) and adaptation, lr 0.2 x batch/256 (batch 4096), 10 warmup epochs from 0 then cosine to
0, cross-replica (Sync) BatchNorm. Views (App. B, Table 6): bicubic crop 0.08-1 at 224, flip, colour jitter
(0.4, 0.4, 0.2, 0.1) in random order with p 0.8, grayscale 0.2, Gaussian blur (kernel 23 = 10% of 224, sigma in
[0.1, 2]) with p 1.0 on the first view and 0.1 on the second, solarisation with p 0 / 0.2.

Deviations from the original code:
- No online linear classifier: BYOL trains a stop-gradient linear classifier on the labels beside the
  self-supervised loss to report accuracy; here `--eval-every` gives an online kNN instead, and the loss
  is the self-supervised one alone.
- The hidden linear layers before a BatchNorm have no bias (the BatchNorm's shift makes one redundant; BYOL's
  MLP carries one, which it neither decays nor adapts, so the function and the updates are the same).
- The two views are encoded one after the other through each network, as in the original (BatchNorm
  statistics per view); the target's BatchNorm statistics are its own, from its forward passes.
- bf16 autocast on GPU; a step with a non-finite loss or gradient is skipped and moves the target nowhere.
- Colour jitter is torchvision's: brightness a factor in [0.6, 1.4], contrast towards the grayscale mean,
  saturation a blend with grayscale; BYOL's TF code adds a brightness offset in [-0.4, 0.4], pulls contrast
  towards each channel's mean and scales saturation in HSV (docs/fidelity.md). Blur pads by reflection (BYOL's:
  zeros).
- An epoch is floor(N / batch) steps (the last, smaller batch is dropped, as in every script here), so the
  schedules run epochs x floor(N / B) steps; the original counts epochs x N // B (on ImageNet at 4096 and
  1000 epochs 312,000 against 312,784 steps, warmup 3,120 against 3,127: 0.25% shorter).

    torchrun --nproc_per_node=8 byol.py --data /datasets/imagenet/train --epochs 1000
    python byol.py --preset cifar --data cifar10
    python byol.py --preset cpu   # a 2-core CPU recipe on the embedded cifar10-mini

The views are stated once (`view_recipe`); common/augment.py builds both data paths from it: per image
with PIL in the data workers, or, on CUDA (`--gpu-aug`), batched on the GPU after decode-only workers
(common/gpu_aug.py; bilinear crops without antialias). Speed (common/speed.py): channels_last,
bf16 autocast, `--compile`.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from common import augment, cli, models, ops, optim
from common.run import Run, RunArgs, launch


@dataclass
class Args(RunArgs):
    arch: str = "resnet50"
    cifar_stem: bool = False
    zero_init_residual: bool = field(default=True, metadata={
        "help": "start each residual block's last BatchNorm scale at 0 (the Haiku ResNet-50 BYOL trains)"})
    epochs: int = 1000
    batch_size: int = 128  # per process: 128 x 32 = 4096, the paper's batch
    lr: float = 0.2  # for a global batch of 256, scaled linearly (4096 -> 3.2)
    final_lr: float = 0.0
    warmup_epochs: float = 10.0
    weight_decay: float = 1.5e-6  # on weights only: biases and BatchNorm parameters get neither decay nor LARS
    momentum: float = 0.9
    trust_coefficient: float = 0.001  # LARS's eta
    lars: str = field(default="byol", metadata={
        "choices": ["byol", "apex"],
        "help": "byol: trust ratio eta |w| / |g + wd w| (BYOL's LARS); apex: eta |w| / (|g| + wd |w|), clipped "
                "at the lr with --lars-clip (Apex's LARC, solo-learn's)"})
    lars_clip: bool = False  # Apex's clip mode: the adapted rate is min(lr * ratio, lr) (--lars apex only)
    predictor_lr_scale: float = field(default=1.0, metadata={
        "help": "the predictor's learning rate as a multiple of the scheduled one (1: the paper's single rate)"})
    base_tau: float = 0.996  # the target's EMA rate at step 0, raised to 1 along a cosine
    hidden_dim: int = 4096  # projector and predictor hidden width
    embedding_dim: int = 256  # projection (and prediction) size
    image_size: int = 224
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    jitter: tuple[float, ...] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # probability of applying the colour jitter
    grayscale_p: float = 0.2
    blur_p: tuple[float, ...] = (1.0, 0.1)  # per view
    solarize_p: tuple[float, ...] = (0.0, 0.2)  # per view
    sync_bn: bool = True
    output_dir: str = "runs/byol"


PRESETS = {
    "cifar": dict(_doc="solo-learn's CIFAR-10 recipe (scripts/pretrain/cifar/byol.yaml, 92.58 linear after 1000 "
                       "epochs): ResNet-18 with the CIFAR stem at 32 px, batch 256, LARS lr 1.0 with Apex's "
                       "clipped trust ratio eta 0.02, wd 1e-5, tau 0.99 -> 1, no blur, solarisation 0 / 0.2",
                  arch="resnet18", cifar_stem=True, zero_init_residual=False, image_size=32, batch_size=256, lr=1.0,
                  weight_decay=1e-5, lars="apex", lars_clip=True, trust_coefficient=0.02, base_tau=0.99,
                  blur_p=(0.0, 0.0), workers=4, output_dir="runs/byol-cifar"),
}
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test: --preset cifar with the ImageNet stem "
                            "at 32 px on the embedded cifar10-mini, 8 epochs with 1 of warmup, hidden width 1024, "
                            "batch 64 (496 steps), SimCLR's LARS (BYOL's trust ratio, eta 0.001, unclipped) at lr "
                            "1.0 and the predictor at 30 times that rate: at batch 256 and the cifar recipe's LARS "
                            "the trunk scored below random init, and a faster predictor shortens the early phase "
                            "in which the trunk's features lose their diversity"),
                      data="cifar10-mini", cifar_stem=False, workers=2, epochs=8, warmup_epochs=1.0, hidden_dim=1024,
                      batch_size=64, lars="byol", trust_coefficient=0.001, lars_clip=False, lr=1.0,
                      predictor_lr_scale=30.0, output_dir="runs/byol-cpu")


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """BYOL's two asymmetric views (App. B, Table 6), stated once for both data paths (common/augment.py): the
    same crop, flip, jitter and grayscale, blur p 1.0 / 0.1 and solarisation p 0.0 / 0.2 for view 1 / view 2.
    Bicubic crops; the blur's kernel is 10% of the side (23 px at 224), sigma in [0.1, 2]."""
    augment.check_per_view(2, blur_p=args.blur_p, solarize_p=args.solarize_p)
    size = args.image_size
    return [(1, augment.View(size, scale=tuple(args.crop_scale), interpolation="bicubic", jitter=tuple(args.jitter),
                             jitter_p=args.jitter_p, grayscale_p=args.grayscale_p, blur_p=blur,
                             blur_kernel_size=2 * (size // 20) + 1, solarize_p=solarize))
            for blur, solarize in zip(args.blur_p, args.solarize_p)]


# ----------------------------------------------------------------------------- model

class Encoder(nn.Module):
    """Trunk f and projector g (Linear-BN-ReLU-Linear): the online network without its predictor, and the
    target network's shape."""

    def __init__(self, args):
        super().__init__()
        self.trunk = models.build_trunk(args.arch, args.cifar_stem, zero_init_residual=args.zero_init_residual)
        self.projector = models.mlp([self.trunk.feature_dim, args.hidden_dim, args.embedding_dim])

    def forward(self, images):
        return self.projector(self.trunk(images))


class BYOL(nn.Module):
    """Online network (encoder + predictor q) and target network (an EMA copy of the encoder, no gradient)."""

    def __init__(self, args):
        super().__init__()
        self.online = Encoder(args)
        self.predictor = models.mlp([args.embedding_dim, args.hidden_dim, args.embedding_dim])
        self.target = Encoder(args)  # xi has its own random start, as byol_experiment.py draws it from its own key
        for p in self.target.parameters():
            p.requires_grad = False

    @property
    def trunk(self):
        return self.online.trunk

    def forward(self, views):
        """Predictions q(z) of the online network and projections z' of the target network, one list entry
        per view; each view goes through each network on its own (BatchNorm statistics per view)."""
        predictions = [self.predictor(self.online(v)) for v in views]
        with torch.no_grad():
            projections = [self.target(v) for v in views]
        return predictions, projections

    @torch.no_grad()
    def update_target(self, tau):
        """xi <- tau xi + (1 - tau) theta (Sec. 3.2), parameters only; BatchNorm statistics stay the target's."""
        for p_target, p_online in zip(self.target.parameters(), self.online.parameters()):
            p_target.mul_(tau).add_(p_online.detach(), alpha=1 - tau)


def target_tau(step, total_steps, base_tau):
    """tau = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 at step k of K (Sec. 3.2)."""
    return 1 - (1 - base_tau) * (math.cos(math.pi * step / max(1, total_steps)) + 1) / 2


# ----------------------------------------------------------------------------- loss

def l2_normalize(x, eps=1e-12):
    """x / sqrt(max(|x|^2, eps)) along the last axis (BYOL's l2_normalize)."""
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=-1, keepdim=True), min=eps))


def regression_loss(prediction, projection):
    """2 - 2 <q / |q|, z' / |z'|> per row (Eq. 2), the target without gradient."""
    return 2 - 2 * (l2_normalize(prediction) * l2_normalize(projection.detach())).sum(dim=-1)


def byol_loss(predictions, projections):
    """The symmetrised loss (Eq. 4): each view's prediction regresses the other view's target projection,
    summed over the two directions, averaged over the images (over all processes: their gradients are
    averaged). Float32 even under autocast."""
    (p1, p2), (z1, z2) = [[x if x.dtype == torch.float64 else x.float() for x in pair]
                          for pair in (predictions, projections)]
    return (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()


# ----------------------------------------------------------------------------- training

def build_optimizer(model, args):
    """LARS over the online network and predictor; biases and BatchNorm parameters without decay or adaptation.
    The predictor's groups run at --predictor-lr-scale times the scheduled rate (optim.set_lr)."""
    groups = optim.param_groups(model.online, args.weight_decay, exclude_bias_and_norm=True)
    groups += [dict(group, lr_scale=args.predictor_lr_scale)
               for group in optim.param_groups(model.predictor, args.weight_decay, exclude_bias_and_norm=True)]
    return optim.LARS([g for g in groups if g["params"]], lr=0.0, momentum=args.momentum,
                      trust_coefficient=args.trust_coefficient, clip=args.lars_clip,
                      decayed_norm=args.lars == "byol")


def train(args, runtime):
    if not 0 <= args.base_tau <= 1:
        raise ValueError(f"--base-tau must be in [0, 1], got {args.base_tau}.")
    if args.batch_size < 2:
        raise ValueError(f"BYOL's projector and predictor normalise over the batch (BatchNorm): --batch-size must be "
                         f"at least 2, got {args.batch_size}.")
    if not args.predictor_lr_scale > 0:
        raise ValueError(f"--predictor-lr-scale must be positive, got {args.predictor_lr_scale}.")
    if args.lars_clip and args.lars != "apex":
        raise ValueError("--lars-clip is Apex's clip mode: use it with --lars apex.")
    views_recipe = view_recipe(args)
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("byol", args, runtime)
    loader = run.loader(None, views_recipe)
    model, core = run.wrap(BYOL(args), sync_bn=args.sync_bn)
    optimizer, scaler = build_optimizer(core, args), run.grad_scaler()
    run.resume(core, optimizer, scaler)  # the model's state includes the target network

    # ---- the method: edit here
    peak_lr = optim.scaled_lr(args.lr, run.global_batch)
    warmup_steps = round(args.warmup_epochs * run.steps_per_epoch)
    run.start(f"peak lr {peak_lr:.4g}, tau {args.base_tau} -> 1, ops backend {ops.backend(run.device)}")
    model.train()
    for epoch in run.epochs():
        for views, indices in run.batches(loader):
            lr = optim.warmup_cosine(run.step, run.total_steps, warmup_steps, peak_lr, args.final_lr)
            optim.set_lr(optimizer, lr)
            with run.autocast():
                predictions, projections = model(views)
            loss = byol_loss(predictions, projections)
            mean_loss = run.sync(loss)
            optimizer.zero_grad(set_to_none=True)
            if run.finite_loss(mean_loss, lr, views):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.finite_grads(core, mean_loss, lr, scaler, views):
                    scaler.step(optimizer)
                    core.update_target(target_tau(run.step, run.total_steps, args.base_tau))  # after the step
                scaler.update()
            run.log(loss=mean_loss.item(), lr=lr)
    return run.finish()


def main(argv=None):
    return launch(train, Args, PRESETS, __doc__, argv)


if __name__ == "__main__":
    cli.run(main)

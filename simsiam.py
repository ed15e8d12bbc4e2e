"""SimSiam: Exploring Simple Siamese Representation Learning.

Chen, He, CVPR 2021 (https://arxiv.org/abs/2011.10566).

Two views of an image go through one encoder f (trunk + projection MLP); a prediction MLP h maps one view's
output to match the other's, and the other side is held fixed by a stop-gradient (Sec. 3, Algorithm 1):

    D(p, z) = -cos(p, stopgrad(z)),    L = D(p1, z2) / 2 + D(p2, z1) / 2

No negatives, no momentum encoder, no large batch: the stop-gradient is what prevents collapse (Sec. 4.1).

Defaults follow the official main_simsiam.py and its README's 100-epoch recipe: ResNet-50 with each residual
block's last BatchNorm starting at zero, projection MLP of three layers (Linear-BN-ReLU twice at the trunk's
width, then Linear to 2048 and a BatchNorm without affine parameters), prediction MLP 2048-512-2048 (Linear-BN-
ReLU-Linear), SGD with momentum 0.9 and weight decay 1e-4 on every parameter, lr 0.05 x batch/256 (batch 512)
decayed along a cosine once per epoch, the predictor's lr fixed at the initial value (--fix-pred-lr), SyncBN.
Views: crop 0.2-1 at 224, colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, blur p 0.5 with sigma in
[0.1, 2], flip; both views alike.

Deviations from the original code:
- The projector's last Linear has no bias; the original keeps one frozen at its random initial value, which the
  following affine-free BatchNorm subtracts again, so the function and the updates are the same.
- The blur is torchvision's GaussianBlur with a kernel of 10% of the view's side (the original: PIL's
  GaussianBlur(radius=sigma), untruncated).
- bf16 autocast on GPU; a step with a non-finite loss or gradient is skipped.

    torchrun --nproc_per_node=8 simsiam.py --data /datasets/imagenet/train --epochs 100
    python simsiam.py --preset cifar --data cifar10
    python simsiam.py --preset cpu   # a 2-core CPU recipe on the embedded cifar10-mini

The views are stated once (`view_recipe`); common/augment.py builds both data paths from it: per image
with PIL in the data workers, or, on CUDA (`--gpu-aug`), batched on the GPU after decode-only workers
(common/gpu_aug.py; bilinear crops without antialias). Speed (common/speed.py): channels_last,
bf16 autocast, `--compile`.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, cli, models, ops, optim
from common.run import Run, RunArgs, launch


@dataclass
class Args(RunArgs):
    arch: str = "resnet50"
    cifar_stem: bool = False
    zero_init_residual: bool = field(default=True, metadata={
        "help": "start each residual block's last BatchNorm scale at 0 (the original code)"})
    epochs: int = 100
    batch_size: int = 64  # per process: 64 x 8 = 512, the paper's batch
    lr: float = 0.05  # for a global batch of 256, scaled linearly (512 -> 0.1)
    warmup_epochs: float = 0.0  # linear warmup from 0 (the original: none)
    lr_every: str = field(default="epoch", metadata={
        "choices": ["epoch", "step"], "help": "update the cosine schedule once per epoch (the original) or per step"})
    fix_pred_lr: bool = field(default=True, metadata={
        "help": "the predictor keeps the initial lr throughout (the paper's recipe, Sec. 4.4)"})
    predictor_lr_scale: float = field(default=1.0, metadata={
        "help": "the predictor's rate is this multiple of the encoder's (fixed or scheduled); 1: the paper's"})
    weight_decay: float = 1e-4  # on every parameter (with --optimizer lars: on weights only)
    momentum: float = 0.9
    optimizer: str = field(default="sgd", metadata={
        "choices": ["sgd", "lars"], "help": "SGD with momentum (the paper's, at every batch size); or LARS, which it "
                                            "expects to help large batches (Sec. 4.2): SimCLR's trust ratio, "
                                            "unclipped, biases and BatchNorm parameters neither decayed nor adapted"})
    trust_coefficient: float = 0.001  # LARS's eta (--optimizer lars)
    hidden_dim: int = field(default=0, metadata={"help": "projection MLP width (0: the trunk's feature width, "
                                                         "as the original)"})
    embedding_dim: int = 2048  # the projection's output (the original's --dim)
    predictor_hidden_dim: int = 512  # the prediction MLP's bottleneck (the original's --pred-dim)
    image_size: int = 224
    crop_scale: tuple[float, ...] = (0.2, 1.0)
    jitter: tuple[float, ...] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # probability of applying the colour jitter
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    sync_bn: bool = True
    output_dir: str = "runs/simsiam"


PRESETS = {
    "cifar": dict(_doc="solo-learn's CIFAR-10 recipe (scripts/pretrain/cifar/simsiam.yaml, 90.51 linear after 1000 "
                       "epochs): ResNet-18 with the CIFAR stem at 32 px, projector 2048-2048-2048, batch 256, SGD "
                       "lr 0.5, wd 1e-5, 10 warmup epochs then cosine per step, crop 0.08-1",
                  arch="resnet18", cifar_stem=True, zero_init_residual=False, image_size=32, batch_size=256, lr=0.5,
                  weight_decay=1e-5, hidden_dim=2048, warmup_epochs=10, lr_every="step", crop_scale=(0.08, 1.0),
                  epochs=1000, workers=4, output_dir="runs/simsiam-cifar"),
}
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test: --preset cifar with the ImageNet stem "
                            "at 32 px on the embedded cifar10-mini, 8 epochs with 1 of warmup, projector 1024 wide, "
                            "batch 64 (496 steps), LARS (SimCLR's trust ratio, eta 0.001, unclipped) at lr 2.0 and "
                            "the predictor at 30 times its fixed rate: with the cifar recipe's SGD the trunk scored "
                            "below random init at batch 256 and 64, and with LARS at one rate barely above it"),
                      data="cifar10-mini", cifar_stem=False, workers=2, epochs=8, warmup_epochs=1.0, hidden_dim=1024,
                      embedding_dim=1024, predictor_hidden_dim=256, batch_size=64, optimizer="lars", lr=2.0,
                      predictor_lr_scale=30.0, output_dir="runs/simsiam-cpu")


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """SimSiam's two views (main_simsiam.py, SimCLR's without the strengthened jitter), stated once for both data
    paths (common/augment.py). Bilinear crops as the original; its flip, drawn last there, commutes with the rest."""
    size = args.image_size
    return [(2, augment.View(size, scale=tuple(args.crop_scale), jitter=tuple(args.jitter), jitter_p=args.jitter_p,
                             grayscale_p=args.grayscale_p, blur_p=args.blur_p, blur_kernel_size=2 * (size // 20) + 1))]


# ----------------------------------------------------------------------------- model

def projection_mlp(in_dim, hidden_dim, out_dim):
    """f's 3-layer projection MLP: Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN, the last BN without affine
    parameters (Sec. 3, "Baseline settings")."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False))


class SimSiam(nn.Module):
    """Encoder f = trunk + projection MLP, predictor h = Linear-BN-ReLU-Linear bottleneck (no BN on its output)."""

    def __init__(self, args):
        super().__init__()
        self.trunk = models.build_trunk(args.arch, args.cifar_stem, zero_init_residual=args.zero_init_residual)
        width = args.hidden_dim or self.trunk.feature_dim
        self.projector = projection_mlp(self.trunk.feature_dim, width, args.embedding_dim)
        self.predictor = models.mlp([args.embedding_dim, args.predictor_hidden_dim, args.embedding_dim])

    def forward(self, views):
        """(p1, p2), (z1, z2) for the two views, each encoded on its own (BatchNorm statistics per view)."""
        z = [self.projector(self.trunk(v)) for v in views]
        return [self.predictor(x) for x in z], z


# ----------------------------------------------------------------------------- loss

def simsiam_loss(predictions, projections):
    """L = D(p1, z2) / 2 + D(p2, z1) / 2 with D(p, z) = -cos(p, stopgrad(z)) averaged over the images
    (Eq. 1-2; torch's cosine similarity, as the original). Float32 even under autocast."""
    (p1, p2), (z1, z2) = [[x if x.dtype == torch.float64 else x.float() for x in pair]
                          for pair in (predictions, projections)]
    d1 = F.cosine_similarity(p1, z2.detach(), dim=1).mean()
    d2 = F.cosine_similarity(p2, z1.detach(), dim=1).mean()
    return -(d1 + d2) / 2


# ----------------------------------------------------------------------------- training

def build_optimizer(model, args):
    """The encoder (trunk + projector) and the predictor in groups of their own: the predictor's lr may stay fixed
    and runs at --predictor-lr-scale times the encoder's. SGD decays every parameter; LARS adapts and decays each
    part's weights, not its biases and norm parameters."""
    parts = ((nn.ModuleList([model.trunk, model.projector]), False, 1.0),
             (model.predictor, args.fix_pred_lr, args.predictor_lr_scale))
    if args.optimizer == "lars":
        groups = [dict(group, fixed_lr=fixed, lr_scale=scale) for part, fixed, scale in parts
                  for group in optim.param_groups(part, args.weight_decay, exclude_bias_and_norm=True)]
        return optim.LARS([g for g in groups if g["params"]], lr=0.0, momentum=args.momentum,
                          trust_coefficient=args.trust_coefficient)
    return torch.optim.SGD([dict(params=list(part.parameters()), fixed_lr=fixed, lr_scale=scale)
                            for part, fixed, scale in parts],
                           lr=0.0, momentum=args.momentum, weight_decay=args.weight_decay)


def learning_rate(step, steps_per_epoch, total_steps, warmup_steps, peak_lr, args):
    """Cosine from the peak to 0 over the run (after an optional linear warmup), evaluated at the start of each
    epoch (the original's adjust_learning_rate) or at every step."""
    if args.lr_every == "epoch" and step >= warmup_steps:
        epoch = step // steps_per_epoch
        return peak_lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
    return optim.warmup_cosine(step, total_steps, warmup_steps, peak_lr)


def train(args, runtime):
    if args.batch_size < 2:
        raise ValueError(f"SimSiam's projector and predictor normalise over the batch (BatchNorm): --batch-size must "
                         f"be at least 2, got {args.batch_size}.")
    if not args.predictor_lr_scale > 0:
        raise ValueError(f"--predictor-lr-scale must be positive, got {args.predictor_lr_scale}.")
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("simsiam", args, runtime)
    loader = run.loader(None, view_recipe(args))
    model, core = run.wrap(SimSiam(args), sync_bn=args.sync_bn)
    optimizer, scaler = build_optimizer(core, args), run.grad_scaler()
    run.resume(core, optimizer, scaler)

    # ---- the method: edit here
    peak_lr = optim.scaled_lr(args.lr, run.global_batch)
    warmup_steps = round(args.warmup_epochs * run.steps_per_epoch)
    run.start(f"peak lr {peak_lr:.4g} (predictor {'fixed' if args.fix_pred_lr else 'scheduled'}), "
              f"ops backend {ops.backend(run.device)}")
    model.train()
    for epoch in run.epochs():
        for views, indices in run.batches(loader):
            lr = learning_rate(run.step, run.steps_per_epoch, run.total_steps, warmup_steps, peak_lr, args)
            for group in optimizer.param_groups:
                group["lr"] = (peak_lr if group["fixed_lr"] else lr) * group.get("lr_scale", 1.0)
            with run.autocast():
                predictions, projections = model(views)
            loss = simsiam_loss(predictions, projections)
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

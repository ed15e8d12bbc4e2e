"""RotNet: Unsupervised Representation Learning by Predicting Image Rotations.

Gidaris, Singh, Komodakis, ICLR 2018 (https://arxiv.org/abs/1803.07728).

Every image of the batch is shown to the network at all four rotations (0, 90, 180,
270 degrees, the paper's Sec. 2.2 "all four rotated copies at once"); a 4-way linear
classifier on the pooled trunk feature predicts which rotation it sees, trained with
cross-entropy (Eq. 1-3). Label k means the picture was turned k x 90 degrees counter-clockwise
(torch.rot90; the authors' rotate_img and VISSL's ImgRotatePil turn the same way). Defaults
follow VISSL's rotnet_8gpu_resnet (ResNet-50, random-resized 224 crop and horizontal flip,
head 2048-4, SGD momentum 0.9, 0.1 x batch/256, wd 1e-4 not on BatchNorm, no warmup, 105
epochs with x0.1 steps at 30/60/90/100; 32 images x 4 rotations per GPU).

The flip comes before the rotation, as in the authors' code. Write R for a quarter turn
counter-clockwise, H for the horizontal flip and V for the vertical one; then H R = R^-1 H
and H R = R V. Flip-then-rotate shows R^k (F x) with F in {1, H}: since a flipped image is
just another upright image, label k always means "the scene's top is turned k quarter turns",
the paper's task. Rotate-then-flip (VISSL's order) shows H R^k x = R^-k (H x) half the time:
for k = 0 and 2 this is the same thing (R^2 = R^-2), but a picture labelled 90 degrees is
then the mirrored scene turned 270 degrees, i.e. the scene flipped upside down and then
turned 90 degrees (R V x). With images whose distribution is mirror-symmetric, which is what the
random flip assumes, the 90- and 270-degree labels then see the very same distribution of
inputs (both are an even mix of R(upright) and R^3(upright)): the 4-way task collapses to
upright / upside-down / sideways, the 90/270 half of the labels is noise for the loss, and
what the network can still learn there are mirror-asymmetric cues (text, handedness) rather
than which way is up.

Deviations from the original code. All four rotations of every image in one batch, as in the
authors' code and the paper, where VISSL draws one random rotation per image
(`--rotations 1` gives VISSL's); so 32 images per GPU make 128 inputs, and the learning rate is
per 256 images, not per 256 inputs. The rotation turns the square crop (no corners lost);
VISSL turns the whole, generally non-square, image before cropping with PIL's rotate, which
keeps the canvas and fills black bars that the crop can include at 90/270 degrees only. The
crop is bicubic (bilinear in VISSL and the authors' code). --preset cifar takes the
authors' CIFAR-10 optimiser (batch 128, lr 0.1, nesterov, wd 5e-4, x0.2 at 60/120/160 of 200
epochs; BatchNorm parameters undecayed, as everywhere here, where the authors decay every
parameter) on a ResNet-18 instead of their Network-In-Network, with a random-resized crop at
scale 0.5-1 and ImageNet statistics instead of their 4-px-padded random crop and CIFAR
statistics (the batched GPU augmentation makes resized crops).

    torchrun --nproc_per_node=8 rotnet.py --data /datasets/imagenet/train
    python rotnet.py --preset cifar --data cifar10
    python rotnet.py --preset cpu   # the CPU recipe of its convergence test

The views are stated once (`view_recipe`); common/augment.py builds both data paths from it: per image
with PIL in the data workers, or, on CUDA (`--gpu-aug`), batched on the GPU after decode-only workers
(common/gpu_aug.py; bilinear crops without antialias). The four rotations are made per batch on either path. Speed (common/speed.py): channels_last,
bf16 autocast, `--compile`.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from common import augment, cli, dist, gpu_aug, models, optim
from common.run import Run, RunArgs, launch


@dataclass
class Args(RunArgs):
    arch: str = "resnet50"
    cifar_stem: bool = False
    epochs: int = 105
    batch_size: int = 32  # images per process, each seen at 4 rotations: VISSL uses 32 x 8 GPUs
    lr: float = 0.1  # for a global batch of 256 images, scaled linearly
    warmup_epochs: float = 0.0
    lr_schedule: str = field(default="step", metadata={"choices": ["step", "cosine"]})  # step: times --lr-decay at each milestone
    lr_milestones: tuple[int, ...] = (30, 60, 90, 100)  # epochs where the step schedule multiplies by --lr-decay
    lr_decay: float = 0.1  # factor applied at each of --lr-milestones
    weight_decay: float = 1e-4  # on weights and biases, not on BatchNorm (VISSL regularize_bn: False)
    momentum: float = 0.9
    nesterov: bool = False  # Nesterov momentum
    rotations: int = field(default=4, metadata={"help": "rotated copies per image: 4 (paper) or 1 random (VISSL)"})
    crop_size: int = 224  # RandomResizedCrop size, before the rotations
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    output_dir: str = "runs/rotnet"


PRESETS = {
    "cifar": dict(_doc="ResNet-18 with the CIFAR stem, 32 px, batch 128, lr 0.1, wd 5e-4, nesterov, 200 epochs with "
                       "x0.2 at 60/120/160 (the paper's CIFAR-10 recipe, Sec. 3.1)",
                  arch="resnet18", cifar_stem=True, crop_size=32, crop_scale=(0.5, 1.0), batch_size=128, lr=0.2,
                  weight_decay=5e-4, nesterov=True, epochs=200, lr_milestones=(60, 120, 160), lr_decay=0.2,
                  workers=4, output_dir="runs/rotnet-cifar"),
}

# the recipe the CPU convergence test, demo.py and bench/convergence.py run: `--preset cpu` alone
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test: --preset cifar with the ImageNet stem at "
                            "32 px on the embedded cifar10-mini, 4 epochs, batch 32, cosine lr 0.1"),
                      data="cifar10-mini", cifar_stem=False, workers=2, epochs=4, batch_size=32, lr=0.1,
                      lr_schedule="cosine", output_dir="runs/rotnet-cpu")


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """VISSL's RotNet crop, stated once for both data paths (common/augment.py): random-resized crop (bicubic),
    flip, normalise. The rotations are applied per batch, after the flip (see the module docstring for why
    the order matters)."""
    return [(1, augment.View(args.crop_size, scale=tuple(args.crop_scale), interpolation="bicubic"))]


def rotate_batch(images, rotations=4, generator=None):
    """[B, 3, H, W] square images -> (rotated images, rotation labels in 0..3 = k x 90 degrees).

    rotations=4: all four copies, rotation-major ([B at 0], [B at 90], ...), labels
    [0]*B + [1]*B + ...; rotations=1: one random rotation per image (VISSL's ImgRotatePil).
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"RotNet needs square images, got {tuple(images.shape[-2:])}.")
    if rotations == 4:
        rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
        labels = torch.arange(4, device=images.device).repeat_interleave(len(images))
        return rotated, labels
    labels = torch.randint(4, (len(images),), generator=generator).to(images.device)
    return gpu_aug.apply_rot90(images, labels), labels


# ----------------------------------------------------------------------------- model

class RotNet(nn.Module):
    """ResNet trunk + a linear 4-way rotation classifier on the pooled res5 feature (VISSL head 2048-4)."""

    def __init__(self, args):
        super().__init__()
        self.trunk = models.build_trunk(args.arch, args.cifar_stem)
        self.head = nn.Linear(self.trunk.feature_dim, 4)

    def forward(self, images):
        return self.head(self.trunk(images))


# ----------------------------------------------------------------------------- loss

def rotation_loss(logits, labels):
    """Eq. 2: the mean over images and rotations of -log F^y(g(X, y)), i.e. cross-entropy."""
    return nn.functional.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), labels)


# ----------------------------------------------------------------------------- training

def learning_rate(step, steps_per_epoch, total_steps, peak_lr, args):
    """Linear warmup from peak/4 (VISSL's composite schedule), then x lr_decay at each milestone, or cosine to 0."""
    return optim.warmup_then_milestones_or_cosine(step, steps_per_epoch, total_steps, peak_lr, args.warmup_epochs,
                                                  0.25, args.lr_schedule, args.lr_decay, args.lr_milestones)


def train(args, runtime):
    if args.rotations not in (1, 4):
        raise ValueError(f"--rotations must be 4 (every rotation of every image) or 1 (one at random), "
                         f"got {args.rotations}.")
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("rotnet", args, runtime)
    # one view per image; with --gpu-aug the crop is made on the device, channels_last after the rotation
    loader = run.loader(None, view_recipe(args))
    model, core = run.wrap(RotNet(args))
    optimizer = torch.optim.SGD(optim.decay_all_but_norm(core, args.weight_decay), lr=0.0, momentum=args.momentum,
                                nesterov=args.nesterov)
    scaler = run.grad_scaler()
    run.resume(core, optimizer, scaler)

    # ---- the method: edit here
    peak_lr = optim.scaled_lr(args.lr, run.global_batch)
    run.start(f"{args.rotations} rotation(s) per image, peak lr {peak_lr:.4g}")
    model.train()
    for epoch in run.epochs():
        for (images,), indices in run.batches(loader):
            lr = learning_rate(run.step, run.steps_per_epoch, run.total_steps, peak_lr, args)
            optim.set_lr(optimizer, lr)
            # rotations drawn from (seed, step, rank) alone: a resumed run draws the same ones
            generator = run.step_generator()
            rotated, labels = rotate_batch(images, args.rotations, generator)
            rotated = rotated.contiguous(memory_format=run.memory_format)
            with run.autocast():
                logits = model(rotated)
            loss = rotation_loss(logits, labels)
            mean_loss = run.sync(loss)
            optimizer.zero_grad(set_to_none=True)
            if run.finite_loss(mean_loss, lr):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.finite_grads(core, mean_loss, lr, scaler):
                    scaler.step(optimizer)
                scaler.update()
            accuracy = (logits.detach().argmax(1) == labels).float().mean()
            run.log(loss=mean_loss.item(), rotation_acc=dist.all_reduce_mean(accuracy).item(), lr=lr)
    return run.finish()


def main(argv=None):
    return launch(train, Args, PRESETS, __doc__, argv)


if __name__ == "__main__":
    cli.run(main)

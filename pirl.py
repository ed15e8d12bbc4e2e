"""PIRL: Self-Supervised Learning of Pretext-Invariant Representations.

Misra, van der Maaten, CVPR 2020 (https://arxiv.org/abs/1912.01991).

An image I and its jigsaw transform I^t (9 patches cut from a 3x3 grid of another crop,
shuffled) should have the same representation. The image branch f(v_I) is the trunk's
pooled feature projected to 128-d; the jigsaw branch g(v_I^t) passes each patch through
the same trunk, projects it to 128-d, and projects the 9 concatenated patch codes to
128-d. A memory bank holds an exponential moving average (momentum 0.5) of f(v_I) for
every image; the loss (Eq. 5) is the convex combination, lambda = 0.5, of the NCE losses
of g(v_I^t) and of f(v_I) against the memory entry m_I and 32000 noise entries (NPID's
NCE, temperature 0.07, Z estimated once, from the first batch's patches term as in VISSL).
`--loss-type cross_entropy` is VISSL's InfoNCE variant: each image's logits are m_I and
the noise entries, cross-entropy against m_I. Defaults follow VISSL's
pirl_jigsaw_4node_resnet50 (ResNet-50, batch 32 x 32 GPUs, SGD 0.03 x batch/256,
wd 1e-4 on weights only, 800 epochs, cosine to 1/1000; 9 patches of 64 px jittered in
the 85-px cells of a 255-px crop, each patch with its own colour jitter, photometric,
grayscale and flip draws); `--gblur` is its photo_gblur transforms and `--mlp-head` its
resnet50_mlphead heads (which VISSL pairs with --loss-type cross_entropy --temperature 0.1).

Deviations from the original code (VISSL's NCELossWithMemory and PIRL configs): one set
of noise entries per step, shared by the batch and by both terms of Eq. 5 (VISSL draws
32000 per image and per term: the same expectation, one matmul per term, replayed
exactly on resume). The cosine schedule is updated every step, VISSL's every epoch.
`--mlp-head` has no ReLU after its last (128-d) layer, as VISSL's MLP head since April
2021 (skip_last_layer_relu_bn); VISSL's first release, which trained the published
PIRL MLP-head models, put a ReLU there too, so their embeddings are non-negative.
The blur (--gblur) is a Gaussian kernel of at most 13 taps (+-3 sigma_max) where VISSL uses
PIL's GaussianBlur(radius=sigma), and each patch is one resampling of its box in the image
where VISSL resizes the patch crop, then cuts the patches out of it.

    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-endpoint=HOST:29500 pirl.py --data /datasets/imagenet/train
    torchrun --nproc_per_node=8 pirl.py --data /datasets/imagenet/train --mlp-head --loss-type cross_entropy --temperature 0.1
    python pirl.py --preset cifar --data cifar10
    python pirl.py --preset cpu   # the CPU recipe of its convergence test

At 32 px VISSL's default photometric transform (solarize with a threshold drawn from 0-256, posterize,
autocontrast) leaves PIRL near chance; --gblur learns (tests/test_convergence_instance.py). Nine of every
ten images the trunk sees are patches. The trunk takes the patches, then the images (VISSL's input order), and
its BatchNorm running statistics average the two passes (about 47% patches, 53% images at momentum 0.1), so
the checkpoint's statistics fit neither well: evaluate with `--precise-bn N` (eval_*.py re-estimate them on N
training images).

The views are stated once (`view_recipe`); common/augment.py builds both data paths from it: per image
with PIL in the data workers, or, on CUDA (`--gpu-aug`), batched on the GPU after decode-only workers
(common/gpu_aug.py; bilinear crops without antialias). Speed (common/speed.py): channels_last,
bf16 autocast, `--compile`.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from common import augment, cli, models, ops, optim
from common.run import Run, RunArgs, launch
# PIRL keeps NPID's memory bank, noise draws, Z estimate and NCE loss (Misra & van der Maaten 2020, Sec. 3.2)
from npid import MemoryBank, estimate_z, info_nce_loss, nce_loss, noise_indices

GRID = 3  # 3 x 3 jigsaw patches


@dataclass
class Args(RunArgs):
    arch: str = "resnet50"
    cifar_stem: bool = False
    epochs: int = 800
    batch_size: int = 32  # per process: VISSL uses 32 x 32 GPUs = 1024
    lr: float = 0.03  # for a global batch of 256, scaled linearly (1024 -> 0.12)
    final_lr: float = 3e-5  # end of the cosine schedule, per 256 images (0.00012 at 1024)
    warmup_epochs: float = 0.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    loss_type: str = field(default="nce", metadata={"choices": ["nce", "cross_entropy"]})  # NCE (the paper) or VISSL's InfoNCE over [own memory entry, noise]
    temperature: float = 0.07
    jigsaw_weight: float = 0.5  # lambda of Eq. 5: weight of the patches-to-memory term
    embedding_dim: int = 128
    mlp_head: bool = False  # VISSL's resnet50_mlphead: 2048-2048-128 heads with ReLU
    num_negatives: int = 32000  # noise samples per step, drawn uniformly from the memory bank
    memory_momentum: float = 0.5  # memory entry <- normalise(momentum * entry + (1 - momentum) * image embedding)
    image_size: int = 224
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    patch_crop_size: int = 255  # the jigsaw crop, cut into a 3 x 3 grid of cells ...
    patch_crop_scale: tuple[float, ...] = (0.6, 1.0)  # area range of the crop the jigsaw patches are cut from
    patch_size: int = 64  # ... each patch a random patch_size square inside its cell (85 px)
    gblur: bool = False  # VISSL's photo_gblur: SimCLR colour distortion + Gaussian blur instead of photometric
    output_dir: str = "runs/pirl"


PRESETS = {
    "cifar": dict(_doc="ResNet-18 with the CIFAR stem, 32 px images, 14 px patches jittered in the 16 px cells of a 48 px "
                       "jigsaw crop, batch 128, 4096 negatives, 400 epochs",
                  arch="resnet18", cifar_stem=True, image_size=32, patch_crop_size=48, patch_size=14,
                  batch_size=128, num_negatives=4096, epochs=400, workers=4, output_dir="runs/pirl-cifar"),
}

# the recipe the CPU convergence test, demo.py and bench/convergence.py run: `--preset cpu` alone
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test: --preset cifar with the ImageNet stem at "
                            "32 px on a sixteenth of the embedded cifar10-mini, 100 epochs, batch 64, lr 0.03, "
                            "cross-entropy with 256 negatives, crop scale 0.2-1, Gaussian-blur colour pipeline"),
                      data="cifar10-mini", cifar_stem=False, workers=2, data_fraction=0.0625, epochs=100,
                      batch_size=64, lr=0.03, loss_type="cross_entropy", num_negatives=256, crop_scale=(0.2, 1.0),
                      gblur=True, output_dir="runs/pirl-cpu")


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """PIRL's views, stated once for both data paths (common/augment.py): the image I (a random resized crop) and
    the 9 patches of I^t (paper Sec. 3.3; VISSL's ImgPilToPatchesAndImage): a random resized crop of
    --patch-crop-size px cut into a 3 x 3 grid, in each cell a --patch-size square at an offset uniform in
    0 .. cell - patch - 1 (VISSL's ImgPatchesFromTensor), the patches shuffled. The image and every patch then
    get VISSL's photometric pipeline on their own: photo_gblur.yaml with --gblur (flip, colour jitter p=0.8,
    grayscale 0.2, blur p=0.5), else pirl_jigsaw_4node_resnet50.yaml (colour jitter, ImgPilRandomPhotometric
    p=0.66: posterize, sharpness, solarize, autocontrast; grayscale 0.2, flip)."""
    if args.gblur:
        colour = dict(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    else:
        colour = dict(jitter=(0.4, 0.4, 0.4, 0.2), jitter_p=1.0, photometric_p=0.66, grayscale_p=0.2)
    # PIL's GaussianBlur radius is the sigma: a kernel of +-3 sigma_max, within the image
    image = augment.View(args.image_size, scale=tuple(args.crop_scale),
                         blur_kernel_size=min(13, 2 * args.image_size - 1), **colour)
    patches = augment.Patches(args.patch_size, scale=tuple(args.patch_crop_scale), crop_size=args.patch_crop_size,
                              grid=GRID, blur_kernel_size=min(13, 2 * args.patch_size - 1), **colour)
    return [(1, image), (GRID * GRID, patches)]

# ----------------------------------------------------------------------------- model

def projection(d_in, args):
    """Linear to 128-d, or VISSL's MLP head variant d_in-2048-128 with ReLU, no BN."""
    if args.mlp_head:
        return models.mlp([d_in, 2048, args.embedding_dim], batch_norm=False)
    return nn.Linear(d_in, args.embedding_dim)


class PIRL(nn.Module):
    """Shared trunk phi; f = image head; g = per-patch head, concatenation, joint projection (Sec. 3.3)."""

    def __init__(self, args):
        super().__init__()
        self.trunk = models.build_trunk(args.arch, args.cifar_stem)
        self.image_head = projection(self.trunk.feature_dim, args)
        self.patch_head = projection(self.trunk.feature_dim, args)
        self.jigsaw_head = nn.Linear(GRID * GRID * args.embedding_dim, args.embedding_dim)

    def forward(self, images, patches):
        """images [B, 3, S, S], patches [B, 9, 3, P, P] -> normalised f(v_I), g(v_I^t), each [B, 128]."""
        patch_codes = self.patch_head(self.trunk(patches.flatten(0, 1)))  # patches first, as VISSL's input order
        f = self.image_head(self.trunk(images))
        g = self.jigsaw_head(patch_codes.reshape(len(images), -1))
        return [nn.functional.normalize(x if x.dtype == torch.float64 else x.float(), dim=1) for x in (f, g)]


# ----------------------------------------------------------------------------- loss (NPID's NCE, imported above)

def pirl_loss(image_embeddings, jigsaw_embeddings, positives, noise, z, args, n_data):
    """Eq. 5: lambda L(m_I, g(v_I^t)) + (1 - lambda) L(m_I, f(v_I)), both against the same memory entries."""
    def term(embeddings):
        if args.loss_type == "cross_entropy":
            return info_nce_loss(embeddings, positives, noise, args.temperature)
        return nce_loss(embeddings, positives, noise, z, args.temperature, n_data)

    return args.jigsaw_weight * term(jigsaw_embeddings) + (1 - args.jigsaw_weight) * term(image_embeddings)


# ----------------------------------------------------------------------------- training

def check_args(args):
    if args.num_negatives < 1:
        raise ValueError(f"--num-negatives must be at least 1, got {args.num_negatives}.")
    if not 0 <= args.memory_momentum < 1:
        raise ValueError(f"--memory-momentum must be in [0, 1), got {args.memory_momentum}.")
    if not 0 <= args.jigsaw_weight <= 1:
        raise ValueError(f"--jigsaw-weight is the convex weight lambda, in [0, 1]; got {args.jigsaw_weight}.")
    if not 0 < args.patch_size < args.patch_crop_size // GRID:
        raise ValueError(f"--patch-size {args.patch_size} must fit in a cell of the 3 x 3 grid over "
                         f"--patch-crop-size {args.patch_crop_size} ({args.patch_crop_size // GRID} px) with room "
                         f"to move: at most {args.patch_crop_size // GRID - 1}.")


def train(args, runtime):
    check_args(args)
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("pirl", args, runtime)
    loader = run.loader(None, view_recipe(args))
    model, core = run.wrap(PIRL(args))
    n_data = run.n_images
    memory = MemoryBank(n_data, args.embedding_dim, args.memory_momentum, seed=args.seed).to(run.device)
    optimizer = torch.optim.SGD(optim.param_groups(core, args.weight_decay), lr=0.0, momentum=args.momentum)
    scaler = run.grad_scaler()
    state = run.resume(core, optimizer, scaler)
    if state is not None:
        if state["memory"]["bank"].shape != memory.bank.shape:
            raise ValueError(f"{run.last_path} has a memory bank of {tuple(state['memory']['bank'].shape)} entries, "
                             f"this data needs {tuple(memory.bank.shape)} (different --data or --data-fraction?).")
        memory.load_state_dict(state["memory"])
    run.save_also(lambda: {"memory": memory.state_dict()})

    # ---- the method: edit here
    peak_lr, final_lr = optim.scaled_lr(args.lr, run.global_batch), optim.scaled_lr(args.final_lr, run.global_batch)
    warmup_steps = round(args.warmup_epochs * run.steps_per_epoch)
    z_estimated = args.loss_type == "cross_entropy" or float(memory.z) > 0
    run.start(f"peak lr {peak_lr:.4g}, {args.loss_type} loss with {args.num_negatives} negatives, "
              f"ops backend {ops.backend(run.device)}")
    model.train()
    for epoch in run.epochs():
        for views, indices in run.batches(loader):
            lr = optim.warmup_cosine(run.step, run.total_steps, warmup_steps, peak_lr, final_lr)
            optim.set_lr(optimizer, lr)
            images, *patches = views
            patches = torch.stack(patches, dim=1)  # [B, 9, 3, P, P]
            indices = indices.to(run.device, non_blocking=True)
            with run.autocast():
                image_embeddings, jigsaw_embeddings = model(images, patches)
            positives = memory.bank[indices]
            noise = memory.bank[noise_indices(n_data, args.num_negatives, args.seed, run.step, runtime.rank,
                                              run.device)]
            if not z_estimated:  # once, from the first batch of the run (not after a resume): VISSL's loss sets Z
                # in its first term, the patches-to-memory one
                memory.z.fill_(estimate_z(jigsaw_embeddings.detach(), positives, noise, args.temperature, n_data))
                z_estimated = True
                run.logger.info(f"NCE normalisation constant Z = {float(memory.z):.6g}")
            loss = pirl_loss(image_embeddings, jigsaw_embeddings, positives, noise, memory.z, args, n_data)
            mean_loss = run.sync(loss)
            optimizer.zero_grad(set_to_none=True)
            applied = False
            if run.finite_loss(mean_loss, lr):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.finite_grads(core, mean_loss, lr, scaler):
                    scaler.step(optimizer)
                    applied = True
                scaler.update()
            if applied:  # the memory tracks f(v_I) only (Sec. 3.2); a skipped step writes nothing
                memory.update(image_embeddings, indices)
            run.log(loss=mean_loss.item(), lr=lr)
    return run.finish()


def main(argv=None):
    return launch(train, Args, PRESETS, __doc__, argv)


if __name__ == "__main__":
    cli.run(main)

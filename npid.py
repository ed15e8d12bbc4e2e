"""NPID: Unsupervised Feature Learning via Non-Parametric Instance Discrimination.

Wu, Xiong, Yu, Lin, CVPR 2018 (https://arxiv.org/abs/1805.01978); NPID++ from Misra &
van der Maaten, CVPR 2020 (https://arxiv.org/abs/1912.01991).

Every training image is its own class. A memory bank keeps one L2-normalised 128-d
embedding per image (momentum 0.5 updates, random unit init); the network learns to
recognise image i's memory entry among m noise entries drawn uniformly from the bank,
with the binary NCE objective of Eq. 3-4 and a normalisation constant Z estimated once
from the first batch (Sec. 3.2). `--loss-type cross_entropy` is VISSL's InfoNCE variant:
each image's logits are its positive m_i and the m noise entries, cross-entropy against
the positive. Defaults follow VISSL's npid_8gpu_resnet (ResNet-50, linear head 2048-128,
T 0.07, 4096 negatives, SGD 0.03 x batch/256, wd 1e-4 on weights and biases but not on
BatchNorm, 200 epochs, lr / 10 at 120, 160; the step schedule is also lemniscate.pytorch's);
`--npid++` is npid++_4nodes_resnet (32000 negatives, 800 epochs, cosine to 1/1000).

Deviations from the original code (lemniscate.pytorch, VISSL's NCELossWithMemory):
the m noise entries are drawn once per step and shared by the batch, not m per image
(the same expectation, one matmul instead of B x m gathers; noise draws are seeded by
step and rank, so a resumed run replays them). The view is cropped before the colour
jitter (VISSL jitters the whole image, then crops): brightness, saturation and hue act
per pixel, so only contrast's grey mean changes (the crop's, not the image's), and the
jitter costs a 224-px image rather than a full-size one (the batched --gpu-aug path
crops first too). The cosine schedule of `--npid++` is updated every step, VISSL's
every epoch. lemniscate.pytorch's own ImageNet recipe differs from VISSL's in its
augmentation (crop scale 0.2-1, grayscale 0.2, then jitter) and decays BatchNorm too;
its memory bank starts unnormalised (uniform in +-sqrt(3/128)); we follow VISSL's
norm_init. The `cifar` preset is ours (see PRESETS), not lemniscate's cifar.py.

    torchrun --nproc_per_node=8 npid.py --data /datasets/imagenet/train
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-endpoint=HOST:29500 npid.py --npid++ --data /datasets/imagenet/train
    python npid.py --preset cifar --data cifar10
    python npid.py --preset cpu   # the CPU recipe of its convergence test

The views are stated once (`view_recipe`); common/augment.py builds both data paths from it: per image
with PIL in the data workers, or, on CUDA (`--gpu-aug`), batched on the GPU after decode-only workers
(common/gpu_aug.py; bilinear crops without antialias). Speed (common/speed.py): channels_last,
bf16 autocast, `--compile`.
"""
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from common import augment, cli, dist, models, ops, optim
from common.run import Run, RunArgs, launch


@dataclass
class Args(RunArgs):
    arch: str = "resnet50"
    cifar_stem: bool = False
    epochs: int = 200
    batch_size: int = 32  # per process: VISSL uses 32 x 8 GPUs = 256
    lr: float = 0.03  # for a global batch of 256, scaled linearly
    lr_schedule: str = field(default="step", metadata={"choices": ["step", "cosine"]})  # step: ÷10 at each milestone
    lr_milestones: tuple[float, ...] = (120, 160)  # epochs at which the step schedule divides the lr by 10
    final_lr: float = 0.0  # end of the cosine schedule, also per 256 images
    warmup_epochs: float = 0.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    loss_type: str = field(default="nce", metadata={"choices": ["nce", "cross_entropy"]})  # NCE (the paper) or VISSL's InfoNCE over [own memory entry, noise]
    temperature: float = 0.07
    embedding_dim: int = 128
    num_negatives: int = 4096  # noise samples m per step, drawn uniformly from the memory bank
    memory_momentum: float = 0.5  # memory entry <- normalise(momentum * entry + (1 - momentum) * embedding)
    image_size: int = 224
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    jitter: tuple[float, ...] = (0.4, 0.4, 0.4, 0.4)  # brightness, contrast, saturation, hue
    grayscale_p: float = 0.0
    output_dir: str = "runs/npid"


PRESETS = {
    "npid++": dict(_doc="NPID++ (PIRL paper, VISSL npid++_4nodes_resnet): 32000 negatives, 800 epochs, cosine "
                        "from 0.03 x batch/256 to 1/1000 of it; run it on 32 GPUs (batch 32 each)",
                   num_negatives=32000, epochs=800, lr_schedule="cosine", final_lr=3e-5, output_dir="runs/npid++"),
    "cifar": dict(_doc="ResNet-18 with the CIFAR stem, 32 px, batch 128, lr 0.03 at 128, T 0.1, crop scale 0.2-1, "
                       "grayscale 0.2 (T, crop scale and grayscale from lemniscate.pytorch's cifar.py, which trains "
                       "at lr 0.1 with wd 5e-4, no flip and a constant lr)",
                  arch="resnet18", cifar_stem=True, image_size=32, crop_scale=(0.2, 1.0), grayscale_p=0.2,
                  batch_size=128, lr=0.06, temperature=0.1, workers=4, output_dir="runs/npid-cifar"),
}

# the recipe the CPU convergence test, demo.py and bench/convergence.py run: `--preset cpu` alone
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test: --preset cifar with the ImageNet stem at "
                            "32 px on an eighth of the embedded cifar10-mini (each memory entry refreshed often), "
                            "100 epochs, batch 128, cosine lr 0.03, cross-entropy with 256 negatives"),
                      data="cifar10-mini", cifar_stem=False, workers=2, data_fraction=0.125, epochs=100,
                      batch_size=128, lr=0.03, lr_schedule="cosine", loss_type="cross_entropy", num_negatives=256,
                      output_dir="runs/npid-cpu")


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """VISSL's NPID view, stated once for both data paths (common/augment.py): random resized crop, flip, colour
    jitter (always), grayscale in the CIFAR recipe."""
    return [(1, augment.View(args.image_size, scale=tuple(args.crop_scale), jitter=tuple(args.jitter), jitter_p=1.0,
                             grayscale_p=args.grayscale_p))]

# ----------------------------------------------------------------------------- model

class NPID(nn.Module):
    """ResNet trunk + linear projection to 128-d, L2-normalised (paper Sec. 3.1, Fig. 2)."""

    def __init__(self, args):
        super().__init__()
        self.trunk = models.build_trunk(args.arch, args.cifar_stem)
        self.head = nn.Linear(self.trunk.feature_dim, args.embedding_dim)

    def forward(self, images):
        v = self.head(self.trunk(images))
        return nn.functional.normalize(v if v.dtype == torch.float64 else v.float(), dim=1)


class MemoryBank(nn.Module):
    """One embedding per training image (paper Sec. 3.1), plus the NCE normalisation constant Z.

    Initialised with uniform noise projected to the unit sphere (VISSL's norm_init), from
    `seed` alone, so every rank starts from the same bank; `update` gathers every rank's
    embeddings so the banks stay identical. Not part of the DDP model: DDP would broadcast
    this large buffer from rank 0 at every forward pass.
    """

    def __init__(self, size, dim, momentum, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        std = 1.0 / math.sqrt(dim / 3)
        bank = (torch.rand(size, dim, generator=generator) * 2 - 1) * std
        self.register_buffer("bank", nn.functional.normalize(bank, dim=1))
        self.register_buffer("z", torch.tensor(-1.0, dtype=torch.float64))  # < 0: not estimated yet
        self.momentum = momentum

    @torch.no_grad()
    def update(self, embeddings, indices):
        """m_i <- normalise(momentum * m_i + (1 - momentum) * v_i) for every rank's batch."""
        embeddings, indices = dist.gather(embeddings.detach().to(self.bank.dtype)), dist.gather(indices)
        mixed = self.bank[indices] * self.momentum + embeddings * (1 - self.momentum)
        self.bank.index_copy_(0, indices, nn.functional.normalize(mixed, dim=1))


def noise_indices(n_data, count, seed, step, rank, device):
    """m noise samples from Pn = 1/n, seeded by (seed, step, rank): exact resume needs no RNG state."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729 + 1) % (2**63 - 1))
    return torch.randint(n_data, (count,), generator=generator).to(device, non_blocking=True)


# ----------------------------------------------------------------------------- loss

@torch.no_grad()
def estimate_z(embeddings, positives, noise, temperature, n_data):
    """Z ~= n * E[exp(v . m / T)] over the first batch's scores (Sec. 3.2), all ranks averaged.

    Like lemniscate.pytorch's NCEAverage (and VISSL's), the mean runs over every score of the batch:
    each sample's positive m_i and its m noise entries, B x (m + 1) values.
    """
    v = embeddings.double()
    total = torch.exp((v * positives.double()).sum(1) / temperature).sum()
    total = total + torch.exp(v @ noise.double().t() / temperature).sum()
    mean_exp = total / (len(v) * (len(noise) + 1))
    return n_data * dist.all_reduce_mean(mean_exp)


NCE_EPS = 2.0 ** -23  # what VISSL's NCECriterion adds to both denominators (float32's eps; lemniscate.pytorch 1e-7)


def nce_loss(embeddings, positives, noise, z, temperature, n_data):
    """The binary NCE loss of Eq. 3-4 (VISSL's NCECriterion, after lemniscate.pytorch's), in log space.

    embeddings v [B, D] and memory entries (positives m_i [B, D], noise [m, D]) are
    normalised. P(i|v) = exp(v . m_i / T) / Z (Eq. 2); the posterior that a sample came
    from the data rather than the noise distribution Pn = 1/n is h = P / (P + m Pn + eps)
    (Eq. 3, with NCECriterion's eps); the loss is -mean over the batch of
    [log h(i, v_i) + sum_noise log(m Pn / (P(j|v_i) + m Pn + eps))] (Eq. 4). The m noise
    entries are shared by the batch (an unbiased estimate, like the original per-image
    draws, at the cost of one matmul instead of B x m gathers).
    """
    log_noise = math.log(len(noise) / n_data)  # log(m Pn)
    log_noise_eps = math.log(len(noise) / n_data + NCE_EPS)  # log(m Pn + eps)
    log_z = torch.log(torch.as_tensor(z, dtype=embeddings.dtype, device=embeddings.device))
    log_p_pos = (embeddings * positives).sum(1) / temperature - log_z
    log_p_noise = embeddings @ noise.t() / temperature - log_z
    log_h_pos = log_p_pos - torch.logaddexp(log_p_pos, torch.full_like(log_p_pos, log_noise_eps))
    log_not_h_noise = log_noise - torch.logaddexp(log_p_noise, torch.full_like(log_p_noise, log_noise_eps))
    return -(log_h_pos + log_not_h_noise.sum(1)).mean()


def info_nce_loss(embeddings, positives, noise, temperature):
    """`--loss-type cross_entropy`, VISSL's InfoNCE variant of NCELossWithMemory: sample i's logits are
    [v_i . m_i, v_i . noise_1, ..., v_i . noise_m] / T and the loss is their cross-entropy against index 0,
    averaged over the batch. The batch's other memory entries are not negatives (they are in the noise
    only when drawn there)."""
    positive = (embeddings * positives.to(embeddings.dtype)).sum(1, keepdim=True)
    logits = torch.cat([positive, embeddings @ noise.to(embeddings.dtype).t()], dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


# ----------------------------------------------------------------------------- training

def learning_rate(step, steps_per_epoch, total_steps, peak_lr, final_lr, args):
    """Linear warmup, then VISSL's multistep (/10 at each milestone epoch) or cosine to final_lr."""
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    if args.lr_schedule == "cosine" or step < warmup_steps:
        return optim.warmup_cosine(step, total_steps, warmup_steps, peak_lr, final_lr)
    return peak_lr * 0.1 ** sum(step >= round(m * steps_per_epoch) for m in args.lr_milestones)


def train(args, runtime):
    if args.num_negatives < 1:
        raise ValueError(f"--num-negatives must be at least 1, got {args.num_negatives}.")
    if not 0 <= args.memory_momentum < 1:
        raise ValueError(f"--memory-momentum must be in [0, 1), got {args.memory_momentum}.")
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("npid", args, runtime)
    loader = run.loader(None, view_recipe(args))
    n_data = run.n_images
    model, core = run.wrap(NPID(args))
    memory = MemoryBank(n_data, args.embedding_dim, args.memory_momentum, seed=args.seed).to(run.device)
    optimizer = torch.optim.SGD(optim.decay_all_but_norm(core, args.weight_decay), lr=0.0, momentum=args.momentum)
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
    z_estimated = args.loss_type == "cross_entropy" or float(memory.z) > 0
    run.start(f"one memory bank entry per image, peak lr {peak_lr:.4g}, {args.loss_type} loss with "
              f"{args.num_negatives} negatives, ops backend {ops.backend(run.device)}")
    model.train()
    for epoch in run.epochs():
        for (images,), indices in run.batches(loader):
            lr = learning_rate(run.step, run.steps_per_epoch, run.total_steps, peak_lr, final_lr, args)
            optim.set_lr(optimizer, lr)
            indices = indices.to(run.device, non_blocking=True)
            with run.autocast():
                embeddings = model(images)
            # memory entries as they were before this step: the positives m_i and m noise samples
            positives = memory.bank[indices]
            noise = memory.bank[noise_indices(n_data, args.num_negatives, args.seed, run.step, runtime.rank,
                                              run.device)]
            if not z_estimated:  # once, from the first batch of the run (not after a resume)
                memory.z.fill_(estimate_z(embeddings.detach(), positives, noise, args.temperature, n_data))
                z_estimated = True
                run.logger.info(f"NCE normalisation constant Z = {float(memory.z):.6g}")
            if args.loss_type == "cross_entropy":
                loss = info_nce_loss(embeddings, positives, noise, args.temperature)
            else:
                loss = nce_loss(embeddings, positives, noise, memory.z, args.temperature, n_data)
            mean_loss = run.sync(loss)
            optimizer.zero_grad(set_to_none=True)
            applied = False
            if run.finite_loss(mean_loss, lr):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.finite_grads(core, mean_loss, lr, scaler):
                    scaler.step(optimizer)
                    applied = True
                scaler.update()
            if applied:  # a skipped (non-finite) step must not write into the bank
                memory.update(embeddings, indices)
            run.log(loss=mean_loss.item(), lr=lr)
    return run.finish()


def expand_npid_plus(argv=None):
    """The command line with `--npid++` written out as `--preset npid++`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return [a for arg in argv for a in (["--preset", "npid++"] if arg == "--npid++" else [arg])]


def parse_args(argv=None):
    """cli.parse_args, with `--npid++` as a short form of `--preset npid++`."""
    return cli.parse_args(Args, PRESETS, expand_npid_plus(argv), description=__doc__.split("\n")[0])


def main(argv=None):
    return launch(train, Args, PRESETS, __doc__, expand_npid_plus(argv))


if __name__ == "__main__":
    cli.run(main)

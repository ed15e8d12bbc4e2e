"""SwAV: Unsupervised Learning of Visual Features by Contrasting Cluster Assignments.

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin, NeurIPS 2020 (https://arxiv.org/abs/2006.09882).

Every crop of an image is embedded (ResNet + MLP head, L2-normalised) and scored against K
learnable prototypes. The codes of the large crops are equal-partition soft assignments of
the global batch to the prototypes, computed by Sinkhorn-Knopp (Eq. 3); every other crop
predicts them ("swapped prediction", Eq. 1-2). Multi-crop: 2 large + V small crops, crops of
one size share a forward pass. Defaults follow the swav repository's main_swav.py with
scripts/swav_100ep_pretrain.sh, and VISSL's swav_loss / swav_8node_resnet: ResNet-50, head
2048-2048-128, 3000 prototypes (re-normalised every step, frozen for the first epoch, as the
scripts' 313 iterations at batch 4096), T=0.1, epsilon=0.05, 3 Sinkhorn iterations,
crops_for_assign [0, 1], crops 2x224 (scale 0.14-1) + 6x96 (0.05-0.14), LARS (every parameter,
as the repository's LARC: trust 0.001, no clip), wd 1e-6, 100 epochs at global batch 4096 with a
linear warmup 0.3 -> 4.8 over 10 epochs then cosine to 0.0048, all three quoted per 256 images
(0.01875, 0.3, 0.0003) and scaled linearly, no queue, SyncBN on GPUs. The warmup starts at the
scripts' 0.3: VISSL's 0.6 comes from scaling 0.3 by the batch of one node (8 x 64 = 512 images),
not the global batch. `--preset small-batch` is the swav repository's 256-image recipe
(swav_200ep_bs256_pretrain.sh: lr 0.6 -> 0.0006, no warmup, a queue of 3840 embeddings from
epoch 15, 200 epochs). Sinkhorn runs in fp32 over the global batch (plus the queue) with
ops.sinkhorn, which all-reduces its sums: no scores are gathered. The queue holds each
process's newest embeddings of the assigned crops and takes part once full, as in main_swav.py
(VISSL's swav_loss uses it from a start iteration on).

Deviations from the original code (main_swav.py, VISSL's swav_loss):
- SyncBN spans all processes (torch's SyncBatchNorm; apex, whose groups of 8 GPUs the 4096-image
  scripts use, is not a dependency; the 256-image scripts sync all processes too), and CUDA
  runs use bf16 autocast instead of apex's fp16 (O1); Sinkhorn and the scores stay fp32.
- Crops are resized bicubically on the per-image path (every script here does; the GPU path
  is bilinear), where the original's RandomResizedCrop is bilinear; the normalisation std is
  ImageNet's 0.229 for red (VISSL's) where the swav repository has 0.228.
- The head's first linear layer has no bias: the BatchNorm after it removes any bias.

Epsilon on small data: "a strong entropy regularization (i.e. using a high epsilon) generally
leads to a trivial solution where all samples collapse into an unique representation and are all
assigned uniformly to all prototypes" (the paper, on its choice of epsilon). A fresh network's
scores barely differ between images, so 0.05 keeps the codes near uniform for short runs:
ResNet-18, cifar10-mini, 8 epochs gave kNN top-1 30.1 / 31.7 / 33.2 / 34.1 at --epsilon 0.05 /
0.03 / 0.02 / 0.01.

    torchrun --nproc_per_node=8 --nnodes=8 ... swav.py --data /datasets/imagenet/train
    torchrun --nproc_per_node=8 swav.py --preset small-batch --data /datasets/imagenet/train
    python swav.py --preset cifar --data cifar10 --epochs 800
    python swav.py --preset cpu   # the CPU recipe of its convergence test

The views are stated once (`view_recipe`); common/augment.py builds both data paths from it: per image
with PIL in the data workers, or, on CUDA (`--gpu-aug`), batched on the GPU after decode-only workers
(common/gpu_aug.py; bilinear crops without antialias). Speed (common/speed.py): channels_last,
bf16 autocast, `--compile`.
"""
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
    lr: float = 0.3  # peak, for a global batch of 256, scaled linearly (4096 -> 4.8)
    start_lr: float = 0.01875  # warmup start per 256 images (4096 -> 0.3)
    final_lr: float = 0.0003  # cosine end per 256 images (4096 -> 0.0048)
    warmup_epochs: float = 10.0
    weight_decay: float = 1e-6
    momentum: float = 0.9
    exclude_bias_and_norm: bool = field(default=False, metadata={
        "help": "biases and BN parameters get plain SGD without weight decay (SimCLR's LARS) instead of LARC"})
    temperature: float = 0.1
    epsilon: float = 0.05  # Sinkhorn-Knopp's entropy weight: codes are exp(scores / epsilon), normalised
    sinkhorn_iters: int = 3  # alternating row / column normalisations
    n_prototypes: int = 3000  # learnable prototype vectors (clusters)
    crops_for_assign: tuple[int, ...] = (0, 1)  # crops whose codes are targets for every other crop
    freeze_prototypes_epochs: float = 1.0  # the prototypes get no update for this many epochs
    queue_length: int = 0  # embeddings kept per assigned crop over all processes (0: no queue)
    epoch_queue_starts: int = 15  # the queue's embeddings join the codes from this epoch on
    hidden_dim: int = 2048
    embedding_dim: int = 128
    crops: str = field(default="2x224,6x96", metadata={"help": "crops as NxSIZE groups: large crops first"})
    crop_scale: tuple[float, ...] = (0.14, 1.0)
    small_crop_scale: tuple[float, ...] = (0.05, 0.14)  # for crop groups after the first
    jitter_strength: float = 1.0  # colour jitter (0.8s, 0.8s, 0.8s, 0.2s) ...
    jitter_p: float = 0.8  # ... applied with probability 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    sync_bn: bool = True
    output_dir: str = "runs/swav"


PRESETS = {
    "small-batch": dict(_doc="the swav repository's 256-image recipe (its 4 x 64; here 32 per process, 8 processes), "
                             "lr 0.6 -> 0.0006 without warmup, "
                             "queue 3840 from epoch 15, 200 epochs",
                        batch_size=32, lr=0.6, start_lr=0.0, final_lr=0.0006, warmup_epochs=0.0, queue_length=3840,
                        epoch_queue_starts=15, epochs=200, output_dir="runs/swav-small-batch"),
    "cifar": dict(_doc="ResNet-18 with the CIFAR stem, crops 2x32 (0.14-1) + 4x16 (0.05-0.4: 16 px of a 32-px image "
                       "needs larger small crops), no blur, jitter 0.5, batch 256, lr 0.6 -> 0.0006, queue 3840 from "
                       "epoch 30, head 512-512-128",
                  arch="resnet18", cifar_stem=True, crops="2x32,4x16", small_crop_scale=(0.05, 0.4), batch_size=256,
                  lr=0.6, start_lr=0.0, final_lr=0.0006, warmup_epochs=10.0, queue_length=3840, epoch_queue_starts=30,
                  hidden_dim=512, jitter_strength=0.5, blur_p=0.0, epochs=800, workers=4, output_dir="runs/swav-cifar"),
}

# the recipe the CPU convergence test, demo.py and bench/convergence.py run: `--preset cpu` alone
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test: --preset cifar with the ImageNet stem at "
                            "32 px on the embedded cifar10-mini, 2x32 crops, 12 epochs, batch 128, lr 1.0, 100 "
                            "prototypes, no queue, eps 0.01"),
                      data="cifar10-mini", cifar_stem=False, workers=2, crops="2x32", epochs=12, warmup_epochs=0.5,
                      batch_size=128, lr=1.0, n_prototypes=100, queue_length=0, exclude_bias_and_norm=True,
                      epsilon=0.01, output_dir="runs/swav-cpu")


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """SwAV's multi-crop views (the swav repo's MultiCropDataset), stated once for both data paths (common/augment.py): bicubic crop, flip, colour
    distortion of strength s, grayscale, blur (kernel 10% of the side, sigma in [0.1, 2.0]; PIL's
    GaussianBlur(radius=sigma) in the swav repo). The first crop group at --crop-scale, later ones at
    --small-crop-scale."""
    s = args.jitter_strength
    return [(count, augment.View(size, scale=tuple(args.crop_scale if group == 0 else args.small_crop_scale),
                                 interpolation="bicubic", jitter=(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
                                 jitter_p=args.jitter_p, grayscale_p=args.grayscale_p, blur_p=args.blur_p,
                                 blur_kernel_size=2 * (size // 20) + 1))
            for group, (count, size) in enumerate(parse_crops(args.crops))]

# ----------------------------------------------------------------------------- model

class SwAV(nn.Module):
    """ResNet trunk + MLP head (2048-2048-128, BN) + prototypes C (a bias-free linear layer)."""

    def __init__(self, args):
        super().__init__()
        self.trunk = models.build_trunk(args.arch, args.cifar_stem)
        self.head = models.mlp([self.trunk.feature_dim, args.hidden_dim, args.embedding_dim])
        self.prototypes = nn.Linear(args.embedding_dim, args.n_prototypes, bias=False)

    @torch.no_grad()
    def normalize_prototypes(self):
        """Keep every prototype on the unit sphere (done before every step, Sec. 4 / swav repo)."""
        self.prototypes.weight.copy_(nn.functional.normalize(self.prototypes.weight, dim=1))

    def forward(self, crops):
        """crops: list of [n, 3, H, W]; same-size crops share one trunk pass, and the head (its BatchNorm) sees every
        crop at once, as SwAV's resnet50.py. Returns z [V*n, d], scores [V*n, K]."""
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            features.append(self.trunk(torch.cat(crops[start:end])))
            start = end
        z = self.head(torch.cat(features))
        z = nn.functional.normalize(z if z.dtype == torch.float64 else z.float(), dim=1)
        with torch.autocast(z.device.type, enabled=False):  # scores in fp32: Sinkhorn divides them by epsilon
            scores = self.prototypes(z)
        return z, scores


# ----------------------------------------------------------------------------- loss

def swav_loss(scores, n_crops, crops_for_assign, temperature, epsilon, sinkhorn_iters, queue_scores=None):
    """Swapped prediction (Eq. 1-2), averaged over the assigned crops and their n_crops - 1 predictors.

    scores: [n_crops * n, K], crop-major (row c*n + i is crop c of image i). Codes q come from
    Sinkhorn on the crop's detached scores, preceded by the queue's scores when given
    (queue_scores[j] for crops_for_assign[j]); only the batch's rows are kept. ops.sinkhorn
    normalises over every process's rows, so codes are those of the global batch.
    """
    n = len(scores) // n_crops
    log_p = nn.functional.log_softmax(scores / temperature, dim=1)
    loss = 0.0
    for j, crop in enumerate(crops_for_assign):
        with torch.no_grad():
            crop_scores = scores[crop * n:(crop + 1) * n].detach()
            if queue_scores is not None:
                crop_scores = torch.cat([queue_scores[j], crop_scores])
            q = ops.sinkhorn(crop_scores, epsilon, sinkhorn_iters)[-n:]
        others = [v for v in range(n_crops) if v != crop]
        loss = loss + sum(-(q * log_p[v * n:(v + 1) * n]).sum(dim=1).mean() for v in others) / len(others)
    return loss / len(crops_for_assign)


# ----------------------------------------------------------------------------- training

def train(args, runtime):
    n_crops = sum(count for count, _ in parse_crops(args.crops))
    if n_crops < 2:
        raise ValueError(f"SwAV needs at least two crops per image, --crops {args.crops} gives {n_crops}.")
    if not args.crops_for_assign or any(not 0 <= c < n_crops for c in args.crops_for_assign):
        raise ValueError(f"--crops-for-assign {list(args.crops_for_assign)} must name crops in [0, {n_crops}).")
    global_batch = args.batch_size * runtime.world_size
    # as the swav repository: the queue holds whole global batches, split evenly over the processes
    queue_length = args.queue_length - args.queue_length % global_batch
    if args.queue_length and not queue_length:
        raise ValueError(f"--queue-length {args.queue_length} is shorter than the global batch {global_batch}; "
                         f"use a multiple of it, or 0 for no queue.")
    local_queue_length = queue_length // runtime.world_size

    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("swav", args, runtime)
    loader = run.loader(None, view_recipe(args))
    model, core = run.wrap(SwAV(args), sync_bn=args.sync_bn)
    # as the swav repo's LARC(SGD): every parameter, biases and BN included, is decayed and LARS-adapted (by default)
    optimizer = optim.LARS(optim.param_groups(core, args.weight_decay, args.exclude_bias_and_norm), lr=0.0,
                           momentum=args.momentum)
    scaler = run.grad_scaler()
    state = run.resume(core, optimizer, scaler)
    # queue[j]: this process's last local_queue_length embeddings of crops_for_assign[j], newest first
    queue, queue_rows = None, 0
    if state is not None and state["queue"] is not None:
        if state["queue"].shape[1] != queue_length:
            raise ValueError(f"{run.last_path} holds a queue of {state['queue'].shape[1]} embeddings, this run asks "
                             f"for {queue_length}; resume with the same --queue-length and global batch.")
        local = state["queue"].view(len(args.crops_for_assign), runtime.world_size, local_queue_length, -1)
        queue, queue_rows = local[:, runtime.rank].to(run.device).contiguous(), state["queue_rows"]

    def saved_state():  # every process's queue, process-major along dim 1, so a run resumes with each its own
        everyone = None if queue is None else dist.gather(queue.transpose(0, 1).contiguous()).transpose(0, 1).cpu()
        return {"queue": everyone, "queue_rows": queue_rows,
                "prototypes": core.prototypes.weight.detach().cpu().clone()}
    run.save_also(saved_state)

    # ---- the method: edit here
    peak_lr = optim.scaled_lr(args.lr, run.global_batch)
    start_lr = optim.scaled_lr(args.start_lr, run.global_batch)
    final_lr = optim.scaled_lr(args.final_lr, run.global_batch)
    warmup_steps = round(args.warmup_epochs * run.steps_per_epoch)
    freeze_steps = round(args.freeze_prototypes_epochs * run.steps_per_epoch)
    run.start(f"crops {args.crops}, lr {start_lr:.4g} -> {peak_lr:.4g} -> {final_lr:.4g}, queue {queue_length} "
              f"from epoch {args.epoch_queue_starts}, ops backend {ops.backend(run.device)}")
    model.train()
    n = args.batch_size
    for epoch in run.epochs():
        if queue_length and epoch >= args.epoch_queue_starts and queue is None:
            queue = torch.zeros(len(args.crops_for_assign), local_queue_length, args.embedding_dim, device=run.device)
        for crops, indices in run.batches(loader):
            lr = optim.warmup_cosine(run.step, run.total_steps, warmup_steps, peak_lr, final_lr, start_lr,
                                     endpoint=True)  # np.linspace(start, peak, warmup steps), as the original
            optim.set_lr(optimizer, lr)
            core.normalize_prototypes()
            with run.autocast():
                z, scores = model(crops)
            queue_scores = None
            if queue is not None and queue_rows >= local_queue_length:  # used once full, as the swav repo
                with torch.no_grad():
                    queue_scores = queue @ core.prototypes.weight.t()
            loss = swav_loss(scores, n_crops, args.crops_for_assign, args.temperature, args.epsilon,
                             args.sinkhorn_iters, queue_scores)
            if queue is not None and bool(torch.isfinite(z).all()):  # newest first: shift by one batch
                queue = torch.cat([torch.stack([z[c * n:(c + 1) * n].detach() for c in args.crops_for_assign]),
                                   queue[:, :-n]], dim=1)
                queue_rows += n
            mean_loss = run.sync(loss)
            optimizer.zero_grad(set_to_none=True)
            if run.finite_loss(mean_loss, lr):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.step < freeze_steps:  # the prototypes stay fixed while the codes are still random
                    core.prototypes.weight.grad = None
                if run.finite_grads(core, mean_loss, lr, scaler):
                    scaler.step(optimizer)
                scaler.update()
            run.log(loss=mean_loss.item(), lr=lr)
    return run.finish()


def main(argv=None):
    return launch(train, Args, PRESETS, __doc__, argv)


if __name__ == "__main__":
    cli.run(main)

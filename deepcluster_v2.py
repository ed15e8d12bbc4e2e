"""DeepCluster-v2, from "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments".

Caron, Misra, Mairal, Goyal, Bojanowski, Joulin, NeurIPS 2020 (https://arxiv.org/abs/2006.09882,
Appendix A.2); DeepCluster: Caron et al., ECCV 2018.

A memory bank keeps every training image's embeddings of the memory-bank crops (crops_for_mb)
from the previous epoch. At the start of each epoch, spherical k-means clusters the banks, once
per prototype head, head h clustering bank h mod len(crops_for_mb) (with crops 0 and 1 and three
heads: banks 0, 1, 0); the centroids become the weights of the prototype heads (not trained) and
each image's cluster ids become its pseudo-labels. During the epoch every crop of an image is
classified into its image's clusters (cross-entropy of scores / T, averaged over the heads), and
the banks are refilled with the new embeddings. Defaults follow the swav repository's
main_deepclusterv2.py with scripts/deepclusterv2_800ep_pretrain.sh, and VISSL's deepclusterv2_loss:
3 clusterings of 3000 centroids, T=0.1, 10 k-means iterations, crops_for_mb [0, 1], head
2048-2048-128, 800 epochs of 2x224 (scale 0.14-1) + 6x96 (0.05-0.14), LARS (every parameter, as
the repository's LARC: trust 0.001, no clip), wd 1e-6, global batch 4096 with a 10-epoch linear
warmup 0.3 -> 4.8 then cosine to 0.0048, all three quoted per 256 images (0.01875, 0.3, 0.0003)
and scaled linearly, SyncBN on GPUs. `--preset 400ep` is deepclusterv2_400ep_pretrain.sh (2x160
(0.08-1) + 4x96, 400 epochs). Distributed: each process keeps the bank rows of the images it saw,
ops.kmeans all-reduces centroid sums and counts (identical centroids everywhere), and the
pseudo-labels of all images are gathered onto every process. Epoch 0's banks come from one
forward pass over the data before training (as the swav repository's init_memory).

Deviations from the original code (main_deepclusterv2.py, VISSL's deepclusterv2_loss):
- k-means starts from k distinct rows of the whole bank (every process's rows) chosen by a seed
  derived from --seed, the epoch and the head, not from rank 0's rows drawn by the global RNG:
  a resumed run repeats the clustering exactly; on one process the starting distribution is the same.
- A cluster that empties during k-means is re-seeded with the bank rows farthest from their
  centroids (ops.kmeans, shared with clusterfit.py); the original keeps its previous centroid,
  which then labels no image. Both agree whenever no cluster empties; re-seeding keeps all k
  clusters in use on small data.
- SyncBN spans all processes (torch's SyncBatchNorm; apex, whose groups of 8 GPUs the original
  uses, is not a dependency), and CUDA runs use bf16 autocast where the original trains in fp32
  (`--precision fp32` restores it).
- Crops are resized bicubically on the per-image path (every script here does; the GPU path
  is bilinear), where the original's RandomResizedCrop is bilinear; the normalisation std is
  ImageNet's 0.229 for red (VISSL's) where the swav repository has 0.228.
- The head's first linear layer has no bias: the BatchNorm after it removes any bias.

    torchrun --nproc_per_node=8 --nnodes=8 ... deepcluster_v2.py --data /datasets/imagenet/train
    python deepcluster_v2.py --preset cifar --data cifar10 --epochs 800
    python deepcluster_v2.py --preset cpu   # the CPU recipe of its convergence test

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

IGNORE = -100  # pseudo-label of an image that is not in the memory bank (cross_entropy's ignore_index)


@dataclass
class Args(RunArgs):
    arch: str = "resnet50"
    cifar_stem: bool = False
    epochs: int = 800
    batch_size: int = 64  # per process: 64 x 64 GPUs = 4096
    lr: float = 0.3  # peak, for a global batch of 256, scaled linearly (4096 -> 4.8)
    start_lr: float = 0.01875  # warmup start per 256 images (4096 -> 0.3)
    final_lr: float = 0.0003  # cosine end per 256 images (4096 -> 0.0048)
    warmup_epochs: float = 10.0
    weight_decay: float = 1e-6
    momentum: float = 0.9
    exclude_bias_and_norm: bool = field(default=False, metadata={
        "help": "biases and BN parameters get plain SGD without weight decay (SimCLR's LARS) instead of LARC"})
    temperature: float = 0.1
    num_clusters: tuple[int, ...] = (3000, 3000, 3000)  # one k-means (and one prototype head) per entry
    kmeans_iters: int = 10  # Lloyd iterations of each epoch's spherical k-means over the memory bank
    crops_for_mb: tuple[int, ...] = (0, 1)  # crops whose embeddings fill the memory banks; head h clusters bank h % len
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
    output_dir: str = "runs/deepcluster_v2"


PRESETS = {
    "400ep": dict(_doc="the swav repository's 400-epoch recipe: crops 2x160 (0.08-1) + 4x96 (0.05-0.14), 400 epochs",
                  crops="2x160,4x96", crop_scale=(0.08, 1.0), epochs=400, output_dir="runs/deepcluster_v2-400ep"),
    "cifar": dict(_doc="ResNet-18 with the CIFAR stem, crops 2x32 (0.14-1) + 4x16 (0.05-0.4), no blur, jitter 0.5, "
                       "batch 256, lr 0.6 -> 0.0006, 3 x 3000 clusters, head 512-512-128",
                  arch="resnet18", cifar_stem=True, crops="2x32,4x16", small_crop_scale=(0.05, 0.4), batch_size=256,
                  lr=0.6, start_lr=0.0, final_lr=0.0006, warmup_epochs=10.0, hidden_dim=512, jitter_strength=0.5,
                  blur_p=0.0, epochs=800, workers=4, output_dir="runs/deepcluster_v2-cifar"),
}

# the recipe the CPU convergence test, demo.py and bench/convergence.py run: `--preset cpu` alone
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test: --preset cifar with the ImageNet stem at "
                            "32 px on a quarter of the embedded cifar10-mini, 2x32 crops, 28 epochs, batch 128, lr "
                            "1.0, 3 x 30 clusters"),
                      data="cifar10-mini", cifar_stem=False, workers=2, crops="2x32", data_fraction=0.25, epochs=28,
                      warmup_epochs=0.5, batch_size=128, lr=1.0, num_clusters=(30, 30, 30),
                      exclude_bias_and_norm=True, output_dir="runs/deepcluster_v2-cpu")


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """DeepCluster-v2's multi-crop views, as SwAV's, stated once for both data paths (common/augment.py): bicubic crop, flip, colour
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

class DeepClusterV2(nn.Module):
    """ResNet trunk + MLP head (L2-normalised z) + one bias-free prototype head per clustering.

    The prototype weights are the k-means centroids, set at every epoch's start, never trained.
    """

    def __init__(self, args):
        super().__init__()
        self.trunk = models.build_trunk(args.arch, args.cifar_stem)
        self.head = models.mlp([self.trunk.feature_dim, args.hidden_dim, args.embedding_dim])
        self.prototypes = nn.ModuleList(nn.Linear(args.embedding_dim, k, bias=False) for k in args.num_clusters)
        for p in self.prototypes.parameters():
            p.requires_grad = False

    def forward(self, crops):
        """crops: list of [n, 3, H, W]; same-size crops share a trunk pass, and the head (its BatchNorm) sees every
        crop at once, as SwAV's resnet50.py. Returns z [V*n, d], [scores [V*n, k]]."""
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            features.append(self.trunk(torch.cat(crops[start:end])))
            start = end
        z = self.head(torch.cat(features))
        z = nn.functional.normalize(z if z.dtype == torch.float64 else z.float(), dim=1)
        with torch.autocast(z.device.type, enabled=False):
            scores = [prototypes(z) for prototypes in self.prototypes]
        return z, scores


# ----------------------------------------------------------------------------- clustering and loss

@torch.no_grad()
def cluster_memory(model, bank, bank_indices, n_images, n_iters, seed):
    """Spherical k-means of the memory bank, once per prototype head (Appendix A.2).

    bank: [len(crops_for_mb), rows, d], this process's rows; bank_indices: [rows] dataset indices.
    Sets head h's weights to the centroids of k-means on bank[h % len(bank)] and returns the
    pseudo-labels [heads, n_images] of every image (IGNORE for images no process holds),
    identical on every process.
    """
    labels = torch.full((len(model.prototypes), n_images), IGNORE, dtype=torch.long, device=bank.device)
    all_indices = dist.gather(bank_indices)
    for h, head in enumerate(model.prototypes):
        centroids, assignments = ops.kmeans(bank[h % len(bank)], head.out_features, n_iters, spherical=True,
                                            init="random", seed=seed + h)
        head.weight.copy_(centroids.to(head.weight.dtype))
        labels[h, all_indices] = dist.gather(assignments)
    return labels


def deepcluster_loss(scores, targets, n_crops, temperature):
    """Cross-entropy of every crop's scores / T against its image's cluster id, averaged over the heads.

    scores: per head [n_crops * n, k], crop-major; targets: [heads, n] (IGNORE rows are left out).
    """
    loss = 0.0
    for head_scores, head_targets in zip(scores, targets):
        per_crop = head_targets.repeat(n_crops)
        total = nn.functional.cross_entropy(head_scores / temperature, per_crop, ignore_index=IGNORE, reduction="sum")
        loss = loss + total / (per_crop != IGNORE).sum().clamp(min=1)
    return loss / len(scores)


# ----------------------------------------------------------------------------- training

def train(args, runtime):
    n_crops = sum(count for count, _ in parse_crops(args.crops))
    if not args.crops_for_mb or any(not 0 <= c < n_crops for c in args.crops_for_mb):
        raise ValueError(f"--crops-for-mb {list(args.crops_for_mb)} must name crops in [0, {n_crops}).")
    if not args.num_clusters or min(args.num_clusters) < 1:
        raise ValueError(f"--num-clusters must be positive integers, got {list(args.num_clusters)}.")

    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("deepcluster_v2", args, runtime)
    dataset = run.dataset()
    loader = run.loader(dataset, view_recipe(args))
    bank_rows = run.steps_per_epoch * args.batch_size  # per process: the images it trains on in one epoch
    if max(args.num_clusters) > bank_rows * runtime.world_size:
        raise ValueError(f"--num-clusters {max(args.num_clusters)} exceeds the {bank_rows * runtime.world_size} "
                         f"images of the memory bank; use fewer clusters or more data.")
    model, core = run.wrap(DeepClusterV2(args), sync_bn=args.sync_bn)
    # as the swav repository's LARC(SGD): every trained parameter is decayed and LARS-adapted (by default)
    optimizer = optim.LARS(optim.param_groups(core, args.weight_decay, args.exclude_bias_and_norm), lr=0.0,
                           momentum=args.momentum)
    scaler = run.grad_scaler()
    state = run.resume(core, optimizer, scaler)  # the model includes the prototypes (this epoch's centroids)
    # the memory bank: this process's embeddings of crops_for_mb, and the dataset index of each row
    bank = torch.zeros(len(args.crops_for_mb), bank_rows, args.embedding_dim, device=run.device)
    bank_indices = torch.zeros(bank_rows, dtype=torch.long, device=run.device)
    labels = None  # [heads, len(dataset)] pseudo-labels of the current epoch
    if state is not None:
        if state["bank"].shape[1] != bank_rows * runtime.world_size:
            raise ValueError(f"{run.last_path} holds a memory bank of {state['bank'].shape[1]} rows, this run needs "
                             f"{bank_rows * runtime.world_size}; resume with the same data, batch and processes.")
        mine = slice(runtime.rank * bank_rows, (runtime.rank + 1) * bank_rows)
        bank.copy_(state["bank"][:, mine])
        bank_indices.copy_(state["bank_indices"][mine])
        labels = state["labels"].to(run.device)

    def saved_state():  # every process's bank rows, process-major, so a resumed run gives each its own back
        everyone = dist.gather(bank.transpose(0, 1).contiguous()).transpose(0, 1).cpu()
        return {"bank": everyone, "bank_indices": dist.gather(bank_indices).cpu(), "labels": labels.cpu()}
    run.save_also(saved_state)

    # ---- the method: edit here
    if state is None:  # epoch 0 clusters the embeddings of an initial forward pass (swav repo's init_memory)
        bank_recipe = augment.select(view_recipe(args), args.crops_for_mb)  # one view of each memory-bank crop
        bank_items = run.view_dataset(dataset, bank_recipe, seed=args.seed + 1)
        bank_views = run.device_views(bank_recipe, seed=args.seed + 1)
        bank_loader = run.build_loader(bank_items)
        run.sampler.set_epoch(0)
        with torch.no_grad():
            for i, (crops, _, indices, _) in enumerate(bank_loader):
                crops = run.to_device(crops, indices, bank_views)
                with run.autocast():
                    z = torch.stack([core([crop])[0] for crop in crops])
                bank[:, i * args.batch_size:(i + 1) * args.batch_size] = z
                bank_indices[i * args.batch_size:(i + 1) * args.batch_size] = indices.to(run.device)
        del bank_loader  # stops its worker processes
    peak_lr = optim.scaled_lr(args.lr, run.global_batch)
    start_lr = optim.scaled_lr(args.start_lr, run.global_batch)
    final_lr = optim.scaled_lr(args.final_lr, run.global_batch)
    warmup_steps = round(args.warmup_epochs * run.steps_per_epoch)
    run.start(f"crops {args.crops}, lr {start_lr:.4g} -> {peak_lr:.4g} -> {final_lr:.4g}, clusters "
              f"{list(args.num_clusters)}, ops backend {ops.backend(run.device)}")
    model.train()
    n = args.batch_size
    for epoch in run.epochs():
        if run.step % run.steps_per_epoch == 0:  # a new epoch (not a resume in its middle): cluster last epoch's bank
            labels = cluster_memory(core, bank, bank_indices, run.n_images, args.kmeans_iters,
                                    seed=args.seed * 1_000_003 + epoch * 1_000)
        for crops, indices in run.batches(loader):
            lr = optim.warmup_cosine(run.step, run.total_steps, warmup_steps, peak_lr, final_lr, start_lr,
                                     endpoint=True)  # np.linspace(start, peak, warmup steps), as the original
            optim.set_lr(optimizer, lr)
            indices = indices.to(run.device, non_blocking=True)
            with run.autocast():
                z, scores = model(crops)
            loss = deepcluster_loss(scores, labels[:, indices], n_crops, args.temperature)
            mean_loss = run.sync(loss)
            optimizer.zero_grad(set_to_none=True)
            applied = False
            if run.finite_loss(mean_loss, lr):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.finite_grads(core, mean_loss, lr, scaler):
                    scaler.step(optimizer)
                    applied = True
                scaler.update()
            row = (run.step % run.steps_per_epoch) * n  # refill the bank for the next epoch's k-means
            if applied:  # a skipped (non-finite) step leaves the previous epoch's rows in place
                bank[:, row:row + n] = torch.stack([z[c * n:(c + 1) * n].detach() for c in args.crops_for_mb])
                bank_indices[row:row + n] = indices
            run.log(loss=mean_loss.item(), lr=lr)
    return run.finish()


def main(argv=None):
    return launch(train, Args, PRESETS, __doc__, argv)


if __name__ == "__main__":
    cli.run(main)

"""ClusterFit: Improving Generalization of Visual Representations.

Yan, Misra, Gupta, Ghadiyaram, Mahajan, CVPR 2020 (https://arxiv.org/abs/1912.03330).

Three stages (Fig. 2 of the paper): 1. `extract`: the pooled res5 features of a given
pretrained network N_pre (one of our checkpoints, or a foreign torchvision-style state
dict) over the training images; 2. `cluster`: k-means into K clusters (`ops.kmeans`,
distributed over the ranks); 3. `train`: a fresh trunk N_cf plus a linear classifier
learns to predict each image's cluster with cross-entropy. Each stage writes its output
atomically to --output-dir (features.pth, clusters.pth, checkpoints) and is skipped when
that output exists, so re-running the same command resumes where it stopped.
Defaults follow VISSL's cluster_features_resnet_8gpu_imagenet + clusterfit_resnet_8gpu_imagenet
and its tools/cluster_features_and_label.py (res5 features, avg-pooled; each row divided by its
L2 norm + 1e-5, then faiss's Euclidean k-means into 16000 clusters, 50 iterations; ResNet-50,
head 2048-16000, random-resized crop + colour jitter + flip, SGD momentum 0.9, 0.1 x batch/256,
wd 1e-4 on weights and biases, not on BatchNorm, 105 epochs with x0.1 steps at 30/60/90/100,
32 images per GPU). `--kmeans spherical` clusters on the unit sphere instead (normalised
centroids, cosine assignment, as DeepCluster-v2), `--kmeans euclidean` the raw features.
The warmup is VISSL's: its YAML writes a 5-epoch linear ramp "0.25 -> 0.1", but VISSL's
automatic lr scaling replaces both ends (vissl/utils/hydra_config.py, resolve_linear_schedule):
it ramps from the lr of one node's batch (0.1 x 256/256 with 8 x 32 images) to the scaled lr
and drops the ramp when they are equal, so the reference 8-GPU run has no warmup. Here the ramp
starts at --lr (the rate quoted for 256 images) and exists only when the global batch is larger.

    torchrun --nproc_per_node=8 clusterfit.py --weights rotnet.pth --data /datasets/imagenet/train
    python clusterfit.py --preset cifar --weights runs/rotnet-cifar/checkpoint-00078000.pth --data cifar10
    python clusterfit.py --preset cpu --weights runs/simclr-cpu/checkpoint-00000120.pth   # the CPU recipe of its convergence test
    python clusterfit.py --stage cluster --num-clusters 8000 --output-dir runs/clusterfit ...   # one stage

The views are stated once (`view_recipe`); common/augment.py builds both data paths from it: per image
with PIL in the data workers, or, on CUDA (`--gpu-aug`), batched on the GPU after decode-only workers
(common/gpu_aug.py; bilinear crops without antialias). Speed (common/speed.py): channels_last,
bf16 autocast, `--compile`.

Deviations from the original code: k-means is `ops.kmeans` (Lloyd iterations, k distinct rows
as the first centroids, an empty cluster re-seeded with the point farthest from its centroid)
rather than faiss.Kmeans (which splits a large cluster in two for an empty one, and trains on at
most 256 random rows per centroid: all of ImageNet's 1.28M rows for 16000 clusters, 25,600 of
CIFAR-10's 50,000 for 100), so the same features give other, equally valid clusters. The lr
changes every step (VISSL: every epoch; the same rates at epoch starts). The warmup starts from
the lr of 256 images, VISSL's from that of one node's batch: the same with 256 images per node.
Crops and the extraction resize are bicubic, as in every script here (VISSL: torchvision's
bilinear default).
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common import augment, checkpoint, cli, data, dist, features, models, ops, optim
from common.run import Run, RunArgs, launch

STAGES = ("extract", "cluster", "train")
KMEANS = ("l2norm-euclidean", "spherical", "euclidean")


@dataclass
class Args(RunArgs):
    stage: str = field(default="all", metadata={"choices": ["all", *STAGES]})  # extract, cluster, train, or all three in order
    # stage 1: features of the pretrained network
    weights: str = field(default="", metadata={"help": "pretrained checkpoint (ours or a torchvision state dict) "
                                                       "whose features are clustered; 'random' for a random trunk"})
    weights_arch: str = field(default="", metadata={"help": "its architecture (default: the checkpoint's, else resnet50)"})
    weights_cifar_stem: bool = field(default=None, metadata={"help": "its stem (default: the checkpoint's)"})
    feature_layer: str = field(default="pooled", metadata={"choices": models.all_taps()})  # VISSL: res5, avg-pooled
    extract_size: int = 224  # centre crop of the resized image, as eval_knn/eval_linear see it
    # stage 2: k-means
    num_clusters: int = 16000  # k-means clusters = pseudo-label classes
    kmeans_iters: int = 50  # Lloyd iterations
    kmeans: str = field(default="l2norm-euclidean", metadata={
        "choices": list(KMEANS), "help": "l2norm-euclidean: VISSL's (rows / (|row| + 1e-5), Euclidean k-means); "
                                         "spherical: cosine k-means on the unit sphere; euclidean: raw features"})
    # stage 3: a fresh network on the pseudo-labels
    arch: str = "resnet50"
    cifar_stem: bool = False
    epochs: int = 105
    batch_size: int = 32  # per process: VISSL uses 32 x 8 GPUs
    lr: float = 0.1  # for a global batch of 256, scaled linearly
    warmup_epochs: float = 5.0
    warmup_start: float = None  # the warmup starts at this x the peak lr; default: at --lr (VISSL's rule)
    lr_schedule: str = field(default="step", metadata={"choices": ["step", "cosine"]})  # step: times --lr-decay at each milestone
    lr_milestones: tuple[int, ...] = (30, 60, 90, 100)  # epochs where the step schedule multiplies by --lr-decay
    lr_decay: float = 0.1  # factor applied at each of --lr-milestones
    weight_decay: float = 1e-4  # on weights and biases, not on BatchNorm (VISSL regularize_bn: False)
    momentum: float = 0.9
    crop_size: int = 224  # RandomResizedCrop size of the fresh trunk's training images
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    jitter: tuple[float, ...] = (0.4, 0.4, 0.4, 0.2)  # brightness, contrast, saturation, hue (VISSL's [0.6, 1.4] ...)
    output_dir: str = "runs/clusterfit"


PRESETS = {
    "cifar": dict(_doc="features at 32 px, 100 clusters (10x over-clustering of CIFAR-10), ResNet-18 with the CIFAR "
                       "stem, batch 256, warmup 5 epochs from lr/4 then cosine, 100 epochs",
                  extract_size=32, num_clusters=100, arch="resnet18", cifar_stem=True, crop_size=32,
                  crop_scale=(0.2, 1.0), batch_size=256, lr=0.1, warmup_start=0.25, lr_schedule="cosine", epochs=100,
                  workers=4, output_dir="runs/clusterfit-cifar"),
}

# the recipe the CPU convergence test, demo.py and bench/convergence.py run: `--preset cpu` alone
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test (with --weights a SimCLR --preset cpu "
                            "checkpoint): --preset cifar with the ImageNet stem at 32 px on the embedded "
                            "cifar10-mini, 30 clusters, 14 epochs, batch 256, lr 0.2"),
                      data="cifar10-mini", cifar_stem=False, workers=2, num_clusters=30, epochs=14, warmup_epochs=1.0,
                      batch_size=256, lr=0.2, output_dir="runs/clusterfit-cpu")


# ----------------------------------------------------------------------------- stage 1: features

def extract_stage(args, runtime, dataset, path):
    """Pooled features of the pretrained network for every training image, in dataset order."""
    if not args.weights:
        raise ValueError("--weights is required for the extract stage (the pretrained network to cluster; "
                         "'random' for a random-init trunk).")
    trunk, info = features.load_trunk(args.weights, args.weights_arch or None, args.weights_cifar_stem)
    feats, labels = features.extract(trunk, dataset, [args.feature_layer], features.eval_transform(args.extract_size),
                                     batch_size=256, workers=args.workers, device=runtime.device)
    result = {"features": feats[args.feature_layer], "labels": labels, "weights": args.weights,
              "arch": trunk.arch, "layer": args.feature_layer, "extract_size": args.extract_size}
    if runtime.is_main:
        checkpoint.save_atomic(result, path)
    dist.barrier()
    return result


# ----------------------------------------------------------------------------- stage 2: k-means

def l2_normalise(feats):
    """VISSL's normalisation before k-means: each row divided by its L2 norm + 1e-5 (a zero row stays zero)."""
    return feats / (torch.linalg.vector_norm(feats, dim=1, keepdim=True) + 1e-5)


def kmeans(feats, k, n_iters, mode="l2norm-euclidean", seed=0):
    """(centroids, assignments) of this rank's rows, clustered as --kmeans `mode` says (ops.kmeans all-reduces)."""
    if mode not in KMEANS:
        raise ValueError(f"--kmeans must be one of {', '.join(KMEANS)}, got {mode!r}.")
    if mode == "l2norm-euclidean":
        feats = l2_normalise(feats)
    return ops.kmeans(feats, k, n_iters=n_iters, spherical=mode == "spherical", seed=seed)


def cluster_stage(args, runtime, feats, path):
    """K-means of the features; each rank clusters a contiguous block of rows."""
    if len(feats) < args.num_clusters:
        raise ValueError(f"--num-clusters {args.num_clusters} is more than the {len(feats)} training images.")
    device = runtime.device
    rows = np.array_split(np.arange(len(feats)), runtime.world_size)
    mine = feats[rows[runtime.rank]].to(device)
    centroids, assignments = kmeans(mine, args.num_clusters, args.kmeans_iters, args.kmeans, args.seed)
    if runtime.world_size > 1:  # pad every block to the longest, gather, drop the padding
        longest = max(len(r) for r in rows)
        padded = torch.full((longest,), -1, dtype=torch.long, device=device)
        padded[:len(assignments)] = assignments
        assignments = dist.gather(padded)
        assignments = assignments[assignments >= 0]
    sizes = torch.bincount(assignments.cpu(), minlength=args.num_clusters)
    result = {"centroids": centroids.cpu(), "assignments": assignments.cpu(), "num_clusters": args.num_clusters,
              "kmeans_iters": args.kmeans_iters, "kmeans": args.kmeans, "seed": args.seed}
    if runtime.is_main:
        checkpoint.save_atomic(result, path)
        print(f"clusterfit: {args.num_clusters} clusters of {len(assignments)} images, {int((sizes == 0).sum())} "
              f"empty, largest {int(sizes.max())}", flush=True)
    dist.barrier()
    return result


# ----------------------------------------------------------------------------- stage 3: augmentations, model, loss

def view_recipe(args):
    """VISSL's clusterfit_resnet training view, stated once for both data paths (common/augment.py): random
    resized crop (bicubic), colour jitter (always), flip, normalise."""
    return [(1, augment.View(args.crop_size, scale=tuple(args.crop_scale), interpolation="bicubic",
                             jitter=tuple(args.jitter), jitter_p=1.0))]


class ClusterFitNet(nn.Module):
    """A fresh ResNet trunk (N_cf) + a linear classifier over the K clusters (VISSL head 2048-16000)."""

    def __init__(self, args):
        super().__init__()
        self.trunk = models.build_trunk(args.arch, args.cifar_stem)
        self.head = nn.Linear(self.trunk.feature_dim, args.num_clusters)

    def forward(self, images):
        return self.head(self.trunk(images))


def pseudo_label_loss(logits, pseudo_labels):
    """Cross-entropy against the cluster assignments (paper Sec. 3, 'we train N_cf ... to predict the clusters')."""
    return nn.functional.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), pseudo_labels)


def learning_rate(step, steps_per_epoch, total_steps, peak_lr, args):
    """Linear ramp from the warmup start to peak, then x lr_decay at each milestone, or cosine to 0.

    The ramp starts at --warmup-start x peak, by default at --lr, the rate of a 256-image batch that peak
    scales up (Goyal et al. 2017, as VISSL's auto-scaled warmup): no ramp for 256 images or fewer.
    """
    return optim.warmup_then_milestones_or_cosine(step, steps_per_epoch, total_steps, peak_lr, args.warmup_epochs,
                                                  optim.vissl_warmup_start(args.warmup_start, args.lr, peak_lr),
                                                  args.lr_schedule, args.lr_decay, args.lr_milestones)


# ----------------------------------------------------------------------------- stage 3: training

def train_stage(args, runtime, dataset, pseudo_labels):
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("clusterfit", args, runtime)
    loader = run.loader(dataset, view_recipe(args))
    torch.manual_seed(args.seed)  # the same fresh network whether or not earlier stages ran in this process
    model, core = run.wrap(ClusterFitNet(args))
    optimizer = torch.optim.SGD(optim.decay_all_but_norm(core, args.weight_decay), lr=0.0, momentum=args.momentum)
    scaler = run.grad_scaler()
    state = run.latest_state()
    if state is not None and not torch.equal(state["pseudo_labels"], pseudo_labels):
        raise ValueError(f"{run.last_path} was trained on other pseudo-labels than {args.output_dir}/clusters.pth; "
                         f"use another --output-dir.")
    run.resume(core, optimizer, scaler)
    run.save_also(lambda: {"pseudo_labels": pseudo_labels})  # each checkpoint names the clusters it learns

    # ---- the method: edit here
    pseudo_labels_on_device = pseudo_labels.to(run.device)
    peak_lr = optim.scaled_lr(args.lr, run.global_batch)
    run.start(f"{args.num_clusters} clusters, peak lr {peak_lr:.4g}")
    model.train()
    for epoch in run.epochs():
        for (images,), indices in run.batches(loader):
            lr = learning_rate(run.step, run.steps_per_epoch, run.total_steps, peak_lr, args)
            optim.set_lr(optimizer, lr)
            targets = pseudo_labels_on_device[indices.to(run.device, non_blocking=True)]
            with run.autocast():
                logits = model(images)
            loss = pseudo_label_loss(logits, targets)
            mean_loss = run.sync(loss)
            optimizer.zero_grad(set_to_none=True)
            if run.finite_loss(mean_loss, lr):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.finite_grads(core, mean_loss, lr, scaler):
                    scaler.step(optimizer)
                scaler.update()
            run.log(loss=mean_loss.item(), lr=lr)
    return run.finish()


def run_stages(args, runtime):
    """Runs the requested stage(s); a stage whose output file already exists is loaded instead of re-run."""
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    dataset = data.subset(data.build_dataset(args.data, "train"), args.data_fraction, args.seed)
    stages = STAGES if args.stage == "all" else (args.stage,)
    features_path, clusters_path = output / "features.pth", output / "clusters.pth"

    extracted = None
    if "extract" in stages:
        if features_path.exists():
            if runtime.is_main:
                print(f"clusterfit: {features_path} exists, skipping the extract stage", flush=True)
        else:
            extracted = extract_stage(args, runtime, dataset, features_path)
    clusters = None
    if "cluster" in stages:
        if clusters_path.exists():
            if runtime.is_main:
                print(f"clusterfit: {clusters_path} exists, skipping the cluster stage", flush=True)
        else:
            if extracted is None:
                extracted = load_output(features_path, "extract", len(dataset))
            clusters = cluster_stage(args, runtime, extracted["features"], clusters_path)
    if "train" in stages:
        clusters = clusters or load_output(clusters_path, "cluster", len(dataset))
        if clusters["num_clusters"] != args.num_clusters:
            raise ValueError(f"{clusters_path} has {clusters['num_clusters']} clusters, not --num-clusters "
                             f"{args.num_clusters}; delete it or use another --output-dir.")
        return train_stage(args, runtime, dataset, clusters["assignments"])


def load_output(path, stage, n_images):
    """A previous stage's output (features.pth after `extract`, clusters.pth after `cluster`), checked.

    The file is input like any other: its types, shapes, finiteness and cluster ids are checked,
    and that it covers the `n_images` training images, before any of it is used.
    """
    if not path.exists():
        raise ValueError(f"{path} does not exist; run the {stage} stage first (--stage {stage} or --stage all).")
    result = checkpoint.load(path)
    written_by = "written by the extract stage" if stage == "extract" else "written by the cluster stage"
    if not isinstance(result, dict):
        raise checkpoint.CheckpointError(f"{path} is not a ClusterFit {stage}-stage output ({written_by}).")

    def tensor(key, floating):
        value = result.get(key)
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_quantized or \
                value.is_complex() or value.is_floating_point() != floating or value.dtype == torch.bool:
            kind = "a floating-point" if floating else "an integer"
            raise checkpoint.CheckpointError(f"{path} is damaged: '{key}' is not {kind} tensor ({written_by}).")
        return value

    if stage == "extract":
        feats = tensor("features", floating=True)
        if feats.dim() != 2 or feats.shape[1] < 1:
            raise checkpoint.CheckpointError(f"{path} is damaged: 'features' has shape {tuple(feats.shape)}, "
                                             f"not [N, D].")
        n = len(feats)
        if not torch.isfinite(feats).all():
            raise checkpoint.CheckpointError(f"{path} is damaged: its features hold NaN or infinite values.")
        result = dict(result, features=feats.float())
    else:
        k = result.get("num_clusters")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise checkpoint.CheckpointError(f"{path} is damaged: 'num_clusters' is not a positive integer "
                                             f"({written_by}).")
        assignments = tensor("assignments", floating=False)
        if assignments.dim() != 1:
            raise checkpoint.CheckpointError(f"{path} is damaged: 'assignments' has shape "
                                             f"{tuple(assignments.shape)}, not [N].")
        n = len(assignments)
        if n and not bool(((assignments >= 0) & (assignments < k)).all()):
            raise checkpoint.CheckpointError(f"{path} is damaged: its cluster assignments are not all in [0, {k}).")
        result = dict(result, assignments=assignments.long())
    if n != n_images:
        raise checkpoint.CheckpointError(f"{path} covers {n} images but --data/--data-fraction select "
                                         f"{n_images}; use the same data or another --output-dir.")
    return result


def main(argv=None):
    return launch(run_stages, Args, PRESETS, __doc__, argv)


if __name__ == "__main__":
    cli.run(main)

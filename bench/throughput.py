"""Training throughput of simclr.py's step vs lightly's SimCLR step, measured in one run, JSON out.

Cases (img/s counts source images; every image gives two views):
  resnet18_32   simclr.py --preset cifar (CIFAR stem, 32 px, no blur), cifar10-mini JPEGs
  resnet50_224  simclr.py defaults (ResNet-50, 224 px, blur p=0.5), synthetic JPEGs of
                256-500 px sides (smooth random images, written to a temporary folder)
For each case, and for our two data paths (--gpu-aug on: workers decode, views made
batched on the device; off: per-image PIL views in the workers):
  data    the loader + views on the device alone (what the model would be fed)
  model   forward (autocast) + NT-Xent + backward + LARS step alone, on fixed views
  e2e     both together, as simclr.py's loop runs them (no logging or checkpoints)
and the same three for the peer: lightly's SimCLRTransform (per image, in the same
DataLoader set-up), torchvision backbone (the same trunk), lightly's
SimCLRProjectionHead + NTXentLoss + lightly's LARS, under the same autocast
(lightly's examples run one forward per view and use NCHW; so does the peer here).
Ours uses channels_last on CUDA and the multi-tensor LARS (common.optim).

The other training scripts (--scripts, default all: moco, swav, deepcluster_v2, pirl, npid,
rotnet, jigsaw, clusterfit; "" for none) at ResNet-18 32 px (each script's --preset cifar):
their --gpu-aug data path (the batched path of their view_recipe, common.augment.batched; jigsaw's tiles
cut per batch by jigsaw.puzzles), their model step (the
script's own model, loss, optimiser and per-step state updates, as its loop runs them; memory
banks of 50k images with random indices and pseudo-labels; deepcluster_v2's per-epoch k-means
and clusterfit's stages 1-2 are not per-step costs and are left out, clusterfit is its stage 3)
and both together; and, where lightly has them, its equivalent steps as peers on the same
trunk and autocast, with lightly's per-image transforms: MoCo (MoCoV2Transform,
MoCoProjectionHead, momentum encoder, NTXentLoss with a memory bank of the script's queue
size, SGD) and SwAV (SwaVTransform with the script's crops, SwaVProjectionHead,
SwaVPrototypes, SwaVLoss, LARS); the other scripts have no lightly peer. A script
case costs at most 3 x (warmup + drain + steps) batches per side, so its time is bounded
by the batch counts (a few seconds per script on an H100).

    python bench/throughput.py --device cpu --out bench/results/throughput-cpu.json
    python bench/throughput.py --device cuda --workers 12 --decode-on-device --out bench/results/throughput-h100.json
    (add --compile for a torch.compile'd model step)

Batch sizes default to 512 (r18) / 128 (r50) on CUDA and 32 / 4 on CPU. Load from
other processes hits every measurement; on a shared machine compare numbers of one run.
"""
import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from typing import Callable, NamedTuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/augment.py: spinning OpenMP stalls on shared cores
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clusterfit  # noqa: E402
import deepcluster_v2  # noqa: E402
import jigsaw  # noqa: E402
import moco  # noqa: E402
import npid  # noqa: E402
import pirl  # noqa: E402
import rotnet  # noqa: E402
import simclr  # noqa: E402
import swav  # noqa: E402
from common import augment, cli, data, dist, models, optim, speed  # noqa: E402

CASES = {
    "resnet18_32": dict(flags=["--preset", "cifar"], data="cifar10-mini", batch={"cuda": 512, "cpu": 32}),
    "resnet50_224": dict(flags=[], data="synthetic", batch={"cuda": 128, "cpu": 4}),
}


class RepeatSampler(torch.utils.data.Sampler):
    """`total` shuffled indices over as many epochs of n as needed; (epoch, index) pairs for ViewDataset."""

    def __init__(self, n, total, pairs=True):
        self.n, self.total, self.pairs = n, total, pairs

    def __iter__(self):
        count, epoch = 0, 0
        while count < self.total:
            for i in torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch)).tolist()[:self.total - count]:
                yield (epoch, i) if self.pairs else i
                count += 1
            epoch += 1

    def __len__(self):
        return self.total


def synthetic_jpegs(folder, n, seed=0):
    """n smooth random RGB JPEGs (quality 90) with sides in [256, 500], like ImageNet's typical sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "c"), exist_ok=True)
    for i in range(n):
        h, w = rng.integers(256, 501, 2)
        low = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8))
        low.resize((int(w), int(h)), Image.BICUBIC).save(os.path.join(folder, "c", f"{i:05d}.jpg"), quality=90)
    return folder


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, steps, warmup, batch, device, drain=None):
    """Images per second of `fn` (one batch per call), after `drain()` and `warmup` untimed calls."""
    if drain is not None:
        drain()
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return round(steps * batch / (time.perf_counter() - start), 1)


def loader_of(dataset, batch, workers, device, total, collate_fn, pairs=True):
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch, sampler=RepeatSampler(len(dataset), total, pairs), num_workers=workers,
        collate_fn=collate_fn, pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)


# ----------------------------------------------------------------------------- ours (simclr.py's pieces)

def our_views(args, dataset, device, gpu_aug, workers, total, decode_on_device=False):
    """A function returning the next batch's list of views on the device, as simclr.train makes them (Run.loader
    of simclr.view_recipe: augment.batched on the device, or augment.PerImage in the workers)."""
    channels_last = speed.channels_last(device)
    recipe = simclr.view_recipe(args)
    if gpu_aug:
        max_side = augment.max_side(recipe)
        views = data.ViewDataset(data.DecodedImages(dataset, max_side, encoded=decode_on_device), None, seed=args.seed)
        make_views, collate = augment.batched(recipe, args.seed, channels_last), data.collate_canvas
    else:
        views, collate = data.ViewDataset(dataset, augment.PerImage(recipe), seed=args.seed), data.collate
    batches = iter(loader_of(views, args.batch_size, workers, device, total, collate))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def next_views():
        batch, _, indices, _ = next(batches)
        return make_views(batch, 0, indices, device) if gpu_aug else speed.to_device(batch, device, memory_format)
    return next_views


def our_step(args, device, precision, compile_model):
    memory_format = torch.channels_last if speed.channels_last(device) else torch.contiguous_format
    core = simclr.SimCLR(args).to(device, memory_format=memory_format).train()
    model = speed.compile_model(core, compile_model)
    optimizer = optim.LARS(optim.param_groups(core, args.weight_decay), lr=0.1, momentum=args.momentum)
    n_views = sum(count for count, _ in simclr.parse_crops(args.crops))

    def step(views):
        with dist.autocast(device, precision):
            z = model(views)
        loss = simclr.nt_xent_loss(z, n_views, args.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


# ----------------------------------------------------------------------------- the peer: lightly

HAVE_LIGHTLY = importlib.util.find_spec("lightly") is not None
LIGHTLY_MISSING = "lightly is not installed here (pip install lightly): the peer was not measured"


def peer_views(transform, dataset, batch, device, workers, total):
    """lightly's per-image transform in the same DataLoader set-up; the next batch's list of views on the device."""
    batches = iter(loader_of(PeerViews(dataset, transform), batch, workers, device, total,
                             torch.utils.data.default_collate, pairs=False))

    def next_views():
        views, _ = next(batches)
        return [v.to(device, non_blocking=True) for v in views]
    return next_views


class PeerViews(torch.utils.data.Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return self.transform(image), label


def lightly_views(args, dataset, device, workers, total):
    from lightly.transforms import SimCLRTransform

    s, size = args.jitter_strength, simclr.parse_crops(args.crops)[0][1]
    transform = SimCLRTransform(input_size=size, cj_prob=args.jitter_p, cj_strength=s, min_scale=args.crop_scale[0],
                                random_gray_scale=args.grayscale_p, gaussian_blur=args.blur_p)
    batches = iter(loader_of(PeerViews(dataset, transform), args.batch_size, workers, device, total,
                             torch.utils.data.default_collate, pairs=False))

    def next_views():
        views, _ = next(batches)
        return [v.to(device, non_blocking=True) for v in views]
    return next_views


def lightly_step(args, device, precision):
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.utils.lars import LARS

    class PeerSimCLR(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = models.build_trunk(args.arch, args.cifar_stem)
            self.projection_head = SimCLRProjectionHead(self.backbone.feature_dim, args.hidden_dim, args.embedding_dim)

        def forward(self, x):
            return self.projection_head(self.backbone(x))

    model = PeerSimCLR().to(device).train()
    criterion = NTXentLoss(temperature=args.temperature)
    optimizer = LARS(model.parameters(), lr=0.1, momentum=args.momentum, weight_decay=args.weight_decay)

    def step(views):
        with dist.autocast(device, precision):
            z0, z1 = model(views[0]), model(views[1])
        loss = criterion(z0.float(), z1.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


# ----------------------------------------------------------------------------- the other scripts and their peers

def script_views(module, args, dataset, device, workers, total):
    """The script's --gpu-aug path, as Run.loader makes it from the script's view_recipe: decode-only workers
    (images shrunk to augment.max_side of the recipe), views made by augment.batched on the device."""
    recipe = module.view_recipe(args)
    views = data.ViewDataset(data.DecodedImages(dataset, augment.max_side(recipe)), None, seed=args.seed)
    make_views = augment.batched(recipe, args.seed, speed.channels_last(device))
    batches = iter(loader_of(views, args.batch_size, workers, device, total, data.collate_canvas))

    def next_views():
        batch, _, indices, _ = next(batches)
        return make_views(batch, 0, indices, device)
    return next_views


def moco_step(args, device, precision, memory_format):
    """moco.py's step: query and key encoders (Shuffling BN in 8 chunks on one process), InfoNCE, SGD, enqueue."""
    model = moco.MoCo(args).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    splits = args.shuffle_bn_splits or 8
    shuffle = torch.Generator().manual_seed(0)

    def step(views):
        with dist.autocast(device, precision):
            q, k = model(views[0], views[1], args.key_momentum, splits, shuffle)
        loss = moco.moco_loss(q, k, model.queue.clone(), args.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.enqueue(k)
    return step


def swav_step(args, device, precision, memory_format):
    """swav.py's step: prototypes re-normalised, multi-crop forward, Sinkhorn codes + swapped prediction, LARS."""
    model = swav.SwAV(args).to(device, memory_format=memory_format).train()
    optimizer = optim.LARS(optim.param_groups(model, args.weight_decay, exclude_bias_and_norm=False), lr=0.1,
                           momentum=args.momentum)
    n_crops = sum(count for count, _ in swav.parse_crops(args.crops))

    def step(crops):
        model.normalize_prototypes()
        with dist.autocast(device, precision):
            _, scores = model(crops)
        loss = swav.swav_loss(scores, n_crops, args.crops_for_assign, args.temperature, args.epsilon,
                              args.sinkhorn_iters)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def batch_indices(n_data, batch, step, device):
    """The data indices of step `step`'s batch, for steps that keep per-image state (memory banks, pseudo-labels):
    random, seeded by the step (the loader's indices are not passed to a step)."""
    return torch.randint(n_data, (batch,), generator=torch.Generator().manual_seed(step)).to(device)


def npid_step(args, device, precision, memory_format, n_data=50_000):
    """npid.py's step: embeddings, positives and noise from the memory bank, NCE loss, SGD, bank update."""
    model = npid.NPID(args).to(device, memory_format=memory_format).train()
    memory = npid.MemoryBank(n_data, args.embedding_dim, args.memory_momentum).to(device)
    optimizer = torch.optim.SGD(optim.param_groups(model, args.weight_decay), lr=0.03, momentum=args.momentum)
    count = [0]

    def step(views):
        indices = batch_indices(n_data, len(views[0]), count[0], device)
        with dist.autocast(device, precision):
            embeddings = model(views[0])
        positives = memory.bank[indices]
        noise = memory.bank[npid.noise_indices(n_data, args.num_negatives, 0, count[0], 0, device)]
        if float(memory.z) < 0:
            memory.z.fill_(npid.estimate_z(embeddings.detach(), positives, noise, args.temperature, n_data))
        loss = npid.nce_loss(embeddings, positives, noise, memory.z, args.temperature, n_data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        memory.update(embeddings, indices)
        count[0] += 1
    return step


def rotnet_step(args, device, precision, memory_format):
    """rotnet.py's step: every image at its rotations (4: the paper's), 4-way cross-entropy, SGD."""
    model = rotnet.RotNet(args).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(optim.decay_all_but_norm(model, args.weight_decay), lr=0.1, momentum=args.momentum,
                                nesterov=args.nesterov)
    generator = torch.Generator().manual_seed(0)

    def step(views):
        rotated, labels = rotnet.rotate_batch(views[0], args.rotations, generator)
        with dist.autocast(device, precision):
            logits = model(rotated.contiguous(memory_format=memory_format))
        loss = rotnet.rotation_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def deepcluster_v2_step(args, device, precision, memory_format, n_data=50_000):
    """deepcluster_v2.py's step within an epoch: multi-crop forward, cross-entropy of every crop against its
    image's pseudo-labels of each clustering (prototype heads fixed), LARS, the batch's embeddings written
    into the memory bank.

    The per-epoch k-means (cluster_memory: ops.kmeans of the bank into --num-clusters, once per head) is not
    a per-step cost and is not measured: the heads are set to random unit centroids and the pseudo-labels of
    n_data images are random, which costs the step the same as real ones.
    """
    model = deepcluster_v2.DeepClusterV2(args).to(device, memory_format=memory_format).train()
    optimizer = optim.LARS(optim.param_groups(model, args.weight_decay, args.exclude_bias_and_norm), lr=0.1,
                           momentum=args.momentum)
    n_crops = sum(count for count, _ in deepcluster_v2.parse_crops(args.crops))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for head in model.prototypes:
            centroids = torch.randn(head.out_features, args.embedding_dim, generator=generator)
            head.weight.copy_(torch.nn.functional.normalize(centroids, dim=1))
    labels = torch.stack([torch.randint(k, (n_data,), generator=generator) for k in args.num_clusters]).to(device)
    bank = torch.zeros(len(args.crops_for_mb), n_data, args.embedding_dim, device=device)
    bank_indices = torch.zeros(n_data, dtype=torch.long, device=device)
    count = [0]

    def step(crops):
        n = len(crops[0])
        indices = batch_indices(n_data, n, count[0], device)
        with dist.autocast(device, precision):
            z, scores = model(crops)
        loss = deepcluster_v2.deepcluster_loss(scores, labels[:, indices], n_crops, args.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        row = (count[0] * n) % (n_data - n + 1)
        bank[:, row:row + n] = torch.stack([z[c * n:(c + 1) * n].detach() for c in args.crops_for_mb])
        bank_indices[row:row + n] = indices
        count[0] += 1
    return step


def pirl_step(args, device, precision, memory_format, n_data=50_000):
    """pirl.py's step: the image view and its 9 patches (stacked [B, 9, 3, P, P]) through the shared trunk,
    positives and noise from the memory bank, Eq. 5 (NCE, Z estimated on the first batch), SGD, bank update."""
    model = pirl.PIRL(args).to(device, memory_format=memory_format).train()
    memory = pirl.MemoryBank(n_data, args.embedding_dim, args.memory_momentum, seed=args.seed).to(device)
    optimizer = torch.optim.SGD(optim.param_groups(model, args.weight_decay), lr=0.03, momentum=args.momentum)
    count, z_estimated = [0], [args.loss_type == "cross_entropy"]

    def step(views):
        images, *patches = views
        patches = torch.stack(patches, dim=1)
        indices = batch_indices(n_data, len(images), count[0], device)
        with dist.autocast(device, precision):
            image_embeddings, jigsaw_embeddings = model(images, patches)
        noise = memory.bank[pirl.noise_indices(n_data, args.num_negatives, args.seed, count[0], 0, device)]
        if not z_estimated[0]:
            memory.z.fill_(pirl.estimate_z(jigsaw_embeddings.detach(), memory.bank[indices], noise, args.temperature,
                                           n_data))
            z_estimated[0] = True
        loss = pirl.pirl_loss(image_embeddings, jigsaw_embeddings, memory.bank[indices], noise, memory.z, args,
                              n_data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        memory.update(image_embeddings, indices)
        count[0] += 1
    return step


def jigsaw_puzzles(args, dataset, device, workers, total):
    """jigsaw.py's --gpu-aug path: decode-only workers, its view_recipe's image made on the device
    (script_views), then its puzzle cut per batch (jigsaw.puzzles, a generator seeded per step as train() does);
    the next batch's (tiles [B, 9, 3, t, t], permutation labels [B])."""
    permutations = jigsaw.hamming_permutations(args.num_permutations, seed=args.seed)
    next_views = script_views(jigsaw, args, dataset, device, workers, total)
    count = [0]

    def next_puzzles():
        generator = torch.Generator().manual_seed((args.seed * 1_000_003 + count[0]) * 4_099)
        count[0] += 1
        return jigsaw.puzzles(next_views()[0], permutations, args.tile_size, generator)
    return next_puzzles


def jigsaw_fixed_puzzles(args, batch, device, memory_format):
    """Fixed random tiles and permutation labels in jigsaw.puzzles' shapes."""
    tiles = torch.randn(batch, jigsaw.GRID ** 2, 3, args.tile_size, args.tile_size, device=device)
    return tiles, torch.randint(args.num_permutations, (batch,), device=device)


def jigsaw_step(args, device, precision, memory_format):
    """jigsaw.py's step: the 9 tiles of every puzzle through the siamese trunk and tile head, permutation
    cross-entropy, SGD (no weight decay on BatchNorm)."""
    model = jigsaw.JigsawNet(args).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(optim.decay_all_but_norm(model, args.weight_decay), lr=0.1, momentum=args.momentum)

    def step(puzzles):
        tiles, labels = puzzles
        with dist.autocast(device, precision):
            logits = model(tiles)
        loss = jigsaw.permutation_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def clusterfit_step(args, device, precision, memory_format, n_data=50_000):
    """clusterfit.py's stage 3 (training a fresh trunk on the pseudo-labels): cross-entropy over
    --num-clusters classes, SGD (no weight decay on BatchNorm). Stages 1 and 2 (feature extraction, k-means)
    run once before training and are not measured; the pseudo-labels of n_data images are random here."""
    model = clusterfit.ClusterFitNet(args).to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(optim.decay_all_but_norm(model, args.weight_decay), lr=0.1,
                                momentum=args.momentum)
    pseudo_labels = torch.randint(args.num_clusters, (n_data,), generator=torch.Generator().manual_seed(0)).to(device)
    count = [0]

    def step(views):
        targets = pseudo_labels[batch_indices(n_data, len(views[0]), count[0], device)]
        with dist.autocast(device, precision):
            logits = model(views[0])
        loss = clusterfit.pseudo_label_loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        count[0] += 1
    return step


def lightly_moco(args, device, precision):
    """lightly's MoCo v2 step (its examples/pytorch/moco.py, on our trunk): MoCoV2Transform, MoCoProjectionHead,
    momentum copies updated by update_momentum, NTXentLoss with a memory bank of --queue-size, SGD."""
    import copy

    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms import MoCoV2Transform

    backbone = models.build_trunk(args.arch, args.cifar_stem).to(device).train()
    head = MoCoProjectionHead(backbone.feature_dim, args.hidden_dim, args.embedding_dim).to(device).train()
    backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(head_m)
    criterion = NTXentLoss(temperature=args.temperature, memory_bank_size=(args.queue_size, args.embedding_dim))
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.03, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    transform = MoCoV2Transform(input_size=args.image_size, min_scale=args.crop_scale[0],
                                random_gray_scale=args.grayscale_p, gaussian_blur=args.blur_p)

    def step(views):
        update_momentum(backbone, backbone_m, args.key_momentum)
        update_momentum(head, head_m, args.key_momentum)
        with dist.autocast(device, precision):
            query = head(backbone(views[0]))
            with torch.no_grad():
                key = head_m(backbone_m(views[1]))
        loss = criterion(query.float(), key.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return transform, step


def lightly_swav(args, device, precision):
    """lightly's SwAV step (its examples/pytorch/swav.py, on our trunk): SwaVTransform with the script's crops,
    SwaVProjectionHead, SwaVPrototypes (normalised every step), SwaVLoss (Sinkhorn), lightly's LARS."""
    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
    from lightly.transforms import SwaVTransform
    from lightly.utils.lars import LARS

    (n_large, large), (n_small, small) = swav.parse_crops(args.crops)
    backbone = models.build_trunk(args.arch, args.cifar_stem).to(device).train()
    head = SwaVProjectionHead(backbone.feature_dim, args.hidden_dim, args.embedding_dim).to(device).train()
    prototypes = SwaVPrototypes(args.embedding_dim, args.n_prototypes).to(device).train()
    criterion = SwaVLoss(temperature=args.temperature, sinkhorn_iterations=args.sinkhorn_iters,
                         sinkhorn_epsilon=args.epsilon)
    optimizer = LARS([*backbone.parameters(), *head.parameters(), *prototypes.parameters()], lr=0.1,
                     momentum=args.momentum, weight_decay=args.weight_decay)
    transform = SwaVTransform(crop_sizes=(large, small), crop_counts=(n_large, n_small),
                              crop_min_scales=(args.crop_scale[0], args.small_crop_scale[0]),
                              crop_max_scales=(args.crop_scale[1], args.small_crop_scale[1]), cj_prob=args.jitter_p,
                              cj_strength=args.jitter_strength, random_gray_scale=args.grayscale_p,
                              gaussian_blur=args.blur_p)

    def step(crops):
        prototypes.normalize()
        with dist.autocast(device, precision):
            scores = [prototypes(torch.nn.functional.normalize(head(backbone(c)), dim=1)) for c in crops]
        scores = [x.float() for x in scores]
        loss = criterion(scores[:n_large], scores[n_large:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return transform, step


class Script(NamedTuple):
    """How to measure one training script (a SCRIPTS entry)."""
    module: object
    view_sizes: Callable  # args -> side of each view its step takes, in order (the fixed views)
    step: Callable  # (args, device, precision, memory_format) -> step(views): the script's training step
    peer: Callable = None  # (args, device, precision) -> (lightly's per-image transform, its step), or None
    views: Callable = None  # (args, dataset, device, workers, total) -> next batch, when not script_views'
    fixed: Callable = None  # (args, batch, device, memory_format) -> fixed input, when not random views


def crop_sizes(parse_crops):
    """args -> the side of every crop of a '2x224,6x96' --crops spec, in order."""
    return lambda args: [size for count, size in parse_crops(args.crops) for _ in range(count)]


SCRIPTS = {
    "moco": Script(moco, lambda a: [a.image_size] * 2, moco_step, lightly_moco),
    "swav": Script(swav, crop_sizes(swav.parse_crops), swav_step, lightly_swav),
    "deepcluster_v2": Script(deepcluster_v2, crop_sizes(deepcluster_v2.parse_crops), deepcluster_v2_step),
    "pirl": Script(pirl, lambda a: [a.image_size] + [a.patch_size] * pirl.GRID ** 2, pirl_step),
    "npid": Script(npid, lambda a: [a.image_size], npid_step),
    "rotnet": Script(rotnet, lambda a: [a.crop_size], rotnet_step),
    "jigsaw": Script(jigsaw, lambda a: [a.tile_size] * jigsaw.GRID ** 2, jigsaw_step, views=jigsaw_puzzles,
                     fixed=jigsaw_fixed_puzzles),
    "clusterfit": Script(clusterfit, lambda a: [a.crop_size], clusterfit_step),
}


def run_script_case(name, opts, device):
    """One script at ResNet-18 32 px (its --preset cifar, batch 512 on CUDA): ours (--gpu-aug) and its lightly peer."""
    script = SCRIPTS[name]
    batch = opts.batch_size or CASES["resnet18_32"]["batch"][device.type]
    args = cli.parse_args(script.module.Args, script.module.PRESETS, ["--preset", "cifar", "--batch-size", str(batch)])
    if script.module is moco:
        args = moco.resolve_version_defaults(args)
    precision = "bf16" if device.type == "cuda" else "fp32"
    memory_format = torch.channels_last if speed.channels_last(device) else torch.contiguous_format
    dataset = data.build_dataset("cifar10-mini", "train")
    drain = opts.workers * 4
    total = batch * ((opts.warmup + drain + opts.steps) * 2 + 1)
    sizes = script.view_sizes(args)
    torch.manual_seed(0)
    if script.fixed is not None:
        fixed = script.fixed(args, batch, device, memory_format)
    else:
        fixed = [torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
                 for size in sizes]
    if script.views is not None:
        pipeline = script.views(args, dataset, device, opts.workers, total)
    else:
        pipeline = script_views(script.module, args, dataset, device, opts.workers, total)
    out = {"batch_size": batch, "view_sizes": sizes, "arch": args.arch, "cifar_stem": args.cifar_stem,
           "precision": precision, "images": len(dataset)}
    out["ours_gpu_aug"] = measure(pipeline, script.step(args, device, precision, memory_format), fixed, opts.steps,
                                  opts.warmup, drain, batch, device)
    print(name, "ours_gpu_aug", out["ours_gpu_aug"], flush=True)
    if script.peer is not None and not HAVE_LIGHTLY:
        out["lightly"] = {"skipped": LIGHTLY_MISSING}
    elif script.peer is not None:
        transform, peer_step = script.peer(args, device, precision)
        out["lightly"] = measure(peer_views(transform, dataset, batch, device, opts.workers, total), peer_step,
                                 [f.contiguous() for f in fixed], opts.steps, opts.warmup, drain, batch, device)
        print(name, "lightly", out["lightly"], flush=True)
        out["e2e_over_lightly_e2e"] = round(out["ours_gpu_aug"]["e2e"] / out["lightly"]["e2e"], 3)
        out["model_over_lightly_model"] = round(out["ours_gpu_aug"]["model"] / out["lightly"]["model"], 3)
    return out


# ----------------------------------------------------------------------------- the run

def measure(pipeline_views, step, fixed_views, steps, warmup, drain, batch, device):
    """data alone, model alone, end to end (img/s).

    The loader's workers keep up to `drain` batches ready (workers x prefetch_factor),
    filled while anything else runs; those are taken first, untimed and without a model
    step, so a short timed window sees the rate batches are made at, not a full queue.
    """
    def empty_queue():
        for _ in range(drain):
            pipeline_views()
    result = {"data": rate(pipeline_views, steps, warmup, batch, device, empty_queue),
              "model": rate(lambda: step(fixed_views), steps, warmup, batch, device),
              "e2e": rate(lambda: step(pipeline_views()), steps, warmup, batch, device, empty_queue)}
    result["e2e_over_model"] = round(result["e2e"] / result["model"], 3)
    return result


def run_case(name, opts, device, tmp):
    case = CASES[name]
    batch = opts.batch_size or case["batch"][device.type]
    args = cli.parse_args(simclr.Args, simclr.PRESETS, case["flags"] + ["--batch-size", str(batch)])
    precision = "bf16" if device.type == "cuda" else "fp32"
    if case["data"] == "synthetic":
        dataset = data.build_dataset(synthetic_jpegs(os.path.join(tmp, name), opts.synthetic_images))
    else:
        dataset = data.build_dataset(case["data"], "train")
    drain = opts.workers * 4  # build_loader's prefetch_factor
    total = batch * ((opts.warmup + drain + opts.steps) * 2 + 1)  # data alone, then end to end, one iterator each
    size = simclr.parse_crops(args.crops)[0][1]
    memory_format = torch.channels_last if speed.channels_last(device) else torch.contiguous_format
    fixed = [torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
             for _ in range(2)]
    torch.manual_seed(0)
    out = {"batch_size": batch, "crops": args.crops, "arch": args.arch, "cifar_stem": args.cifar_stem,
           "precision": precision, "images": len(dataset)}
    step = our_step(args, device, precision, opts.compile)
    variants = [("simclr_gpu_aug", True, False), ("simclr_per_image", False, False)]
    if opts.decode_on_device:
        variants.insert(1, ("simclr_gpu_aug_jpeg_on_device", True, True))
    for key, gpu_aug, on_device in variants:
        out[key] = measure(our_views(args, dataset, device, gpu_aug, opts.workers, total, on_device), step, fixed,
                           opts.steps, opts.warmup, drain, batch, device)
        print(name, key, out[key], flush=True)
    if HAVE_LIGHTLY:
        peer_step = lightly_step(args, device, precision)
        out["lightly"] = measure(lightly_views(args, dataset, device, opts.workers, total), peer_step,
                                 [f.contiguous() for f in fixed], opts.steps, opts.warmup, drain, batch, device)
        print(name, "lightly", out["lightly"], flush=True)
        best = max(out["simclr_gpu_aug"]["e2e"], out["simclr_per_image"]["e2e"])
        out["simclr_e2e_over_lightly_e2e"] = round(best / out["lightly"]["e2e"], 3)
    else:
        out["lightly"] = {"skipped": LIGHTLY_MISSING}
    if name == "resnet18_32":
        out["cifar10_epoch_seconds_at_e2e"] = round(50_000 / out["simclr_gpu_aug"]["e2e"], 1)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default=",".join(CASES), help=f"simclr cases, of {','.join(CASES)} ('': none)")
    parser.add_argument("--batch-size", type=int, default=0, help="0: per-case default for the device")
    parser.add_argument("--steps", type=int, default=0, help="timed batches per measurement (0: 20 CUDA, 2 CPU)")
    parser.add_argument("--warmup", type=int, default=-1, help="untimed batches first (-1: 5 CUDA, 1 CPU)")
    parser.add_argument("--workers", type=int, default=-1, help="loader workers (-1: 8 CUDA, 2 CPU)")
    parser.add_argument("--synthetic-images", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--decode-on-device", action="store_true",
                        help="also measure --gpu-aug with JPEGs decoded on the device (DecodedImages(encoded=True))")
    parser.add_argument("--scripts", default=",".join(SCRIPTS),
                        help=f"other training scripts to measure at ResNet-18 32 px, of {','.join(SCRIPTS)} ('': none)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the main process (0: default)")
    parser.add_argument("--out", default="")
    opts = parser.parse_args()
    unknown = set(filter(None, opts.scripts.split(","))) - set(SCRIPTS)
    if unknown:
        parser.error(f"--scripts: unknown {sorted(unknown)}, choose from {list(SCRIPTS)}")
    device = torch.device(opts.device)
    cuda = device.type == "cuda"
    opts.steps = opts.steps or (20 if cuda else 2)
    opts.warmup = opts.warmup if opts.warmup >= 0 else (5 if cuda else 1)
    opts.workers = opts.workers if opts.workers >= 0 else (8 if cuda else 2)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    result = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "steps": opts.steps, "warmup": opts.warmup,
              "workers": opts.workers, "compile": opts.compile, "torch_threads": torch.get_num_threads(),
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": {}, "scripts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in filter(None, opts.cases.split(",")):
            result["cases"][name] = run_case(name, opts, device, tmp)
    for name in filter(None, opts.scripts.split(",")):
        result["scripts"][name] = run_script_case(name, opts, device)
    text = json.dumps(result, indent=1)
    print(text)
    if opts.out:
        os.makedirs(os.path.dirname(os.path.abspath(opts.out)), exist_ok=True)
        with open(opts.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

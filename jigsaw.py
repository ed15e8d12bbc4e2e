"""Jigsaw: Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles.

Noroozi & Favaro, ECCV 2016 (https://arxiv.org/abs/1603.09246); the ResNet version of
Goyal, Mahajan, Gupta, Misra, "Scaling and Benchmarking Self-Supervised Visual
Representation Learning", ICCV 2019 (https://arxiv.org/abs/1905.01235).

A 255 px crop is cut into a 3x3 grid of 85 px cells, numbered row by row; a 64 px tile is
taken at a random position inside each cell (offsets 0-21 px on each axis: the gaps keep
edges from giving the answer away) and normalised on its own. The tiles are shuffled by one
permutation drawn from a fixed set chosen for a large Hamming distance (position i shows
tile perm[i]); each tile goes through the shared (siamese) trunk and a 1000-d fc-BN-ReLU,
the nine outputs are concatenated in position order and a linear classifier predicts which
permutation was applied (cross-entropy). Defaults follow VISSL's jigsaw_8gpu_resnet
(ResNet-50, 2000 permutations, grayscale p=0.66, SGD 0.1 x batch/256, wd 1e-4 not on
BatchNorm, 105 epochs with x0.1 steps at 30/60/90/100, 32 images per GPU). The warmup is the one
VISSL runs: its YAML writes 5 epochs "0.025 -> 0.1", which its automatic lr scaling turns into a
ramp from the lr of one node's batch to the scaled lr, none at all for 8 x 32 images; here the
ramp starts at --lr (the rate of 256 images), so it exists only for larger global batches.

The permutation set is a deterministic function of --seed and --permutation-rule (see
`hamming_permutations`), saved in every checkpoint and reused on resume. The default rule,
max-avg, is the paper's Algorithm 1 and the rule of VISSL's generator and of its 2000- and
10000-permutation files: starting from a random permutation, greedily add the one with the
largest average Hamming distance to those chosen so far. max-min instead maximises the
distance to the nearest one. For seed 0, average / minimum Hamming distance (of at most 9):

    permutations   max-avg (default)   max-min
    100            8.08 / 2            8.03 / 6
    1000           8.01 / 2            7.91 / 5
    2000           8.00 / 2            7.96 / 4

The max-avg averages are the largest any set of that size can have: every tile sits at every
position n/9 times, as evenly as possible, which minimises the pairs that agree somewhere
(the authors' own 100-permutation file, which VISSL's 100-permutation config loads, also has
8.08 / 2). Generating 2000 over all 9! = 362880 candidates takes about 2 s of CPU.

    torchrun --nproc_per_node=8 jigsaw.py --data /datasets/imagenet/train
    python jigsaw.py --preset cifar --data cifar10
    python jigsaw.py --preset cpu   # the CPU recipe of its convergence test
    python eval_knn.py --weights runs/jigsaw-cpu/checkpoint-00000186.pth --arch resnet18 --no-cifar-stem \
        --image-size 32 --train-data cifar10-mini --test-data cifar10-test --layers res4 --precise-bn 4000

On CPU at 32 px the res4 features gain most (tests/test_convergence_cluster_pretext.py): the trunk
only sees tiles, so kNN re-estimates BatchNorm statistics on whole images first (--precise-bn).

Deviations from the original code. Tile offsets are uniform over all 22 positions where a 64 px
tile fits in an 85 px cell, as in the authors' Caffe data layer (VISSL's ImgPatchesFromTensor
draws 0-20, never touching the cell's far edge). The cells are numbered row by row, as in the
authors' code; VISSL numbers them column by column, which only relabels positions (Hamming
distances, and so the permutation sets' properties, are unchanged, but a VISSL permutation file
would mean the transposed puzzles here). Each tile is standardised per channel (mean and std),
following the paper's Sec. 3.2 against low-level shortcuts; the authors' code subtracts each
tile's per-channel mean only, and VISSL only normalises the whole crop with ImageNet statistics.
The crop, flip and grayscale follow VISSL (resize 256, random 255 crop, horizontal flip,
grayscale p 0.66) rather than the authors' release (a central 255 crop, no flip, colour only);
the per-channel spatial jitter of their later data layer is not used. Ties in the permutation
rule go to the lexicographically first candidate on exact integer distance sums; VISSL's
generator averages float fractions, so its ties fall to rounding (the same rule, other sets).
Resizing is bicubic on the per-image path (torchvision's default, bilinear, in VISSL), and one
resampling of the crop's box rather than a resize of the whole image followed by a crop.

The views are stated once (`view_recipe`); common/augment.py builds both data paths from it: per image
with PIL in the data workers, or, on CUDA (`--gpu-aug`), batched on the GPU after decode-only workers
(common/gpu_aug.py; bilinear crops without antialias). The tiles are cut, standardised and permuted per batch on either path. Speed (common/speed.py): channels_last,
bf16 autocast, `--compile`.
"""
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from common import augment, cli, dist, gpu_aug, models, optim
from common.run import Run, RunArgs, launch

GRID = 3  # tiles per side: 9 tiles


@dataclass
class Args(RunArgs):
    arch: str = "resnet50"
    cifar_stem: bool = False
    epochs: int = 105
    batch_size: int = 32  # images (puzzles) per process: VISSL uses 32 x 8 GPUs
    lr: float = 0.1  # for a global batch of 256 puzzles, scaled linearly
    warmup_epochs: float = 5.0  # a linear ramp to the scaled lr over 5 of 105 epochs, when the batch exceeds 256
    warmup_start: float = None  # the ramp starts at this x the peak lr; default: at --lr (VISSL's rule)
    lr_schedule: str = field(default="step", metadata={"choices": ["step", "cosine"]})  # step: times --lr-decay at each milestone
    lr_milestones: tuple[int, ...] = (30, 60, 90, 100)  # epochs where the step schedule multiplies by --lr-decay
    lr_decay: float = 0.1  # factor applied at each of --lr-milestones
    weight_decay: float = 1e-4  # on weights and biases, not on BatchNorm (VISSL regularize_bn: False)
    momentum: float = 0.9
    num_permutations: int = field(default=2000, metadata={
        "help": "size of the permutation set (100, 1000, 2000); --seed chooses its members"})
    permutation_rule: str = field(default="max-avg", metadata={
        "choices": ["max-avg", "max-min"],
        "help": "greedy choice of each new permutation: largest average (Algorithm 1) or minimum Hamming distance "
                "to the set so far"})
    tile_dim: int = 1000  # per-tile fc-BN-ReLU before concatenation (VISSL head mlp 2048-1000)
    resize_size: int = 256
    crop_size: int = 255  # split into 3x3 cells of crop_size // 3 = 85 px
    tile_size: int = 64  # taken at a random offset in [0, cell - tile] = [0, 21] inside each cell
    grayscale_p: float = 0.66
    output_dir: str = "runs/jigsaw"


PRESETS = {
    "cifar": dict(_doc="ResNet-18 with the CIFAR stem; the ImageNet geometry scaled by 30/255: a 30 px crop of the "
                       "32 px image, 10 px cells, 8 px tiles (64/85 x 10 = 7.5, rounded up); 100 permutations, "
                       "batch 128, 5 warmup epochs from lr/4, cosine, 100 epochs",
                  arch="resnet18", cifar_stem=True, resize_size=32, crop_size=30, tile_size=8, num_permutations=100,
                  batch_size=128, lr=0.1, epochs=100, warmup_epochs=5, warmup_start=0.25, lr_schedule="cosine",
                  workers=4,
                  output_dir="runs/jigsaw-cifar"),
}

# the recipe the CPU convergence test, demo.py and bench/convergence.py run: `--preset cpu` alone
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test: --preset cifar with the ImageNet stem on "
                            "the embedded cifar10-mini resized to 54 px, 16-px tiles, 6 epochs, batch 128, lr 0.025"),
                      data="cifar10-mini", cifar_stem=False, workers=2, resize_size=54, crop_size=54, tile_size=16,
                      epochs=6, warmup_epochs=0.5, batch_size=128, lr=0.025, output_dir="runs/jigsaw-cpu")


# ----------------------------------------------------------------------------- permutation set

PERMUTATION_RULES = ("max-avg", "max-min")


def hamming_permutations(n, n_tiles=GRID * GRID, seed=0, rule="max-avg"):
    """[n, n_tiles] permutations chosen greedily for a large Hamming distance between them.

    Noroozi & Favaro's Algorithm 1: the candidates are all n_tiles! permutations in
    lexicographic order; the first member is one of them drawn uniformly (from `seed`), then
    each step adds the candidate not yet chosen that scores highest against the set so far,
    the earliest in lexicographic order on a tie.

    rule "max-avg" (Algorithm 1, VISSL's 2000 and 10000 sets): the score is the sum of the
        candidate's Hamming distances to every member (the same choice as their average).
    rule "max-min": the score is the distance to the nearest member (a larger minimum
        distance, a smaller average).

    The scores are updated incrementally: each step only compares every candidate with the
    newest member, one tile position at a time (9 vectorised passes over 9! candidates).
    """
    if rule not in PERMUTATION_RULES:
        raise ValueError(f"--permutation-rule must be one of {', '.join(PERMUTATION_RULES)}, got {rule!r}.")
    count = math.factorial(n_tiles)
    if not 1 <= n <= count:
        raise ValueError(f"--num-permutations must be between 1 and {count} ({n_tiles}!), got {n}.")
    pool = np.fromiter(itertools.chain.from_iterable(itertools.permutations(range(n_tiles))), dtype=np.uint8,
                       count=count * n_tiles).reshape(count, n_tiles)  # lexicographic order
    columns = np.ascontiguousarray(pool.T)  # columns[i]: every candidate's tile at position i
    chosen = [int(np.random.default_rng(seed).integers(count))]
    score = np.zeros(count, np.int32) if rule == "max-avg" else np.full(count, n_tiles, np.int32)
    agree, same = np.empty(count, np.uint8), np.empty(count, np.bool_)
    for _ in range(n - 1):
        newest = pool[chosen[-1]]
        agree.fill(0)
        for position in range(n_tiles):  # agree: positions where a candidate matches the newest member
            np.equal(columns[position], newest[position], out=same)
            np.add(agree, same, out=agree)
        distance = n_tiles - agree.astype(np.int32)
        if rule == "max-avg":
            score += distance
        else:
            np.minimum(score, distance, out=score)
        score[chosen[-1]] = np.iinfo(np.int32).min  # never chosen twice
        chosen.append(int(np.argmax(score)))  # the first (lexicographically smallest) of the best
    return torch.from_numpy(pool[chosen]).long()


def hamming_distances(permutations):
    """[n, n] numbers of positions in which two permutations of the set differ."""
    return (permutations[:, None, :] != permutations[None, :, :]).sum(-1)


def min_hamming_distance(permutations):
    """The smallest number of positions in which two permutations of the set differ."""
    distances = hamming_distances(permutations)
    distances.fill_diagonal_(permutations.shape[1] + 1)
    return int(distances.min())


def mean_hamming_distance(permutations):
    """The average number of positions in which two different permutations of the set differ."""
    n = len(permutations)
    return float(hamming_distances(permutations).sum()) / (n * (n - 1)) if n > 1 else 0.0


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """VISSL's Jigsaw image, stated once for both data paths (common/augment.py): resize (bicubic), random crop,
    flip, grayscale (p=0.66), normalise. Its tiles are cut per batch (`puzzles`)."""
    return [(1, augment.View(args.crop_size, resize_size=args.resize_size, interpolation="bicubic",
                             grayscale_p=args.grayscale_p))]


def puzzles(images, permutations, tile_size, generator=None):
    """[B, 3, S, S] images -> (tiles [B, 9, 3, t, t] shuffled by a random permutation of the set, its index [B]).

    VISSL's ImgPatchesFromTensor and ShuffleImgPatches: in each cell of the 3 x 3 grid a tile at an offset
    uniform in 0 .. cell - t on each axis, each tile standardised on its own (Noroozi & Favaro Sec. 3.2, so that
    tiles cannot be matched by their low-level statistics), then position i shows tile perm[i] of a
    permutation drawn uniformly from the set. All draws from `generator`, one batch at a time.
    """
    cell = images.shape[-1] // GRID
    offsets = gpu_aug.sample_tile_offsets(len(images), GRID * GRID, cell - tile_size, generator, images.device)
    tiles = gpu_aug.apply_jigsaw_tiles(images, offsets, cell, tile_size)
    labels = torch.randint(len(permutations), (len(images),), generator=generator).to(images.device)
    order = permutations.to(images.device)[labels]  # position i shows tile order[i]
    return tiles.gather(1, order[:, :, None, None, None].expand_as(tiles)), labels

# ----------------------------------------------------------------------------- model

class JigsawNet(nn.Module):
    """Siamese trunk over the 9 tiles, a shared fc-BN-ReLU per tile, concatenation, a linear permutation classifier."""

    def __init__(self, args):
        super().__init__()
        self.trunk = models.build_trunk(args.arch, args.cifar_stem)
        self.tile_head = nn.Sequential(nn.Linear(self.trunk.feature_dim, args.tile_dim), nn.BatchNorm1d(args.tile_dim),
                                       nn.ReLU(inplace=True))
        self.classifier = nn.Linear(GRID * GRID * args.tile_dim, args.num_permutations)

    def forward(self, tiles):
        """tiles: [B, 9, 3, t, t] -> permutation logits [B, num_permutations]."""
        b, n = tiles.shape[:2]
        per_tile = self.tile_head(self.trunk(tiles.flatten(0, 1)))  # one pass for all B x 9 tiles
        return self.classifier(per_tile.reshape(b, n * per_tile.shape[1]))


# ----------------------------------------------------------------------------- loss

def permutation_loss(logits, labels):
    """Cross-entropy over the permutation set (the paper's classification of the permutation index)."""
    return nn.functional.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), labels)


# ----------------------------------------------------------------------------- training

def learning_rate(step, steps_per_epoch, total_steps, peak_lr, args):
    """Linear warmup from optim.vissl_warmup_start, then x lr_decay at each milestone, or cosine to 0."""
    return optim.warmup_then_milestones_or_cosine(step, steps_per_epoch, total_steps, peak_lr, args.warmup_epochs,
                                                  optim.vissl_warmup_start(args.warmup_start, args.lr, peak_lr),
                                                  args.lr_schedule, args.lr_decay, args.lr_milestones)


def check_geometry(args):
    cell = args.crop_size // GRID
    if not 0 < args.tile_size <= cell:
        raise ValueError(f"--tile-size must be between 1 and the cell size --crop-size // 3 = {cell}, "
                         f"got {args.tile_size}.")
    if args.resize_size < args.crop_size:
        raise ValueError(f"--resize-size ({args.resize_size}) must be at least --crop-size ({args.crop_size}).")


def train(args, runtime):
    check_geometry(args)
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("jigsaw", args, runtime)
    state = run.latest_state()  # a resumed run keeps its checkpoint's permutation set
    if state is not None:
        permutations = state["permutations"]
        if len(permutations) != args.num_permutations:
            raise ValueError(f"{run.last_path} was trained with {len(permutations)} permutations, not "
                             f"--num-permutations {args.num_permutations}; use another --output-dir.")
    else:
        permutations = hamming_permutations(args.num_permutations, seed=args.seed, rule=args.permutation_rule)
    loader = run.loader(None, view_recipe(args))
    model, core = run.wrap(JigsawNet(args))
    optimizer = torch.optim.SGD(optim.decay_all_but_norm(core, args.weight_decay), lr=0.0, momentum=args.momentum)
    scaler = run.grad_scaler()
    run.resume(core, optimizer, scaler)
    run.save_also(lambda: {"permutations": permutations})

    # ---- the method: edit here
    peak_lr = optim.scaled_lr(args.lr, run.global_batch)
    run.start(f"9 tiles of {args.tile_size} px, {len(permutations)} permutations (Hamming distance: average "
              f"{mean_hamming_distance(permutations):.2f}, minimum {min_hamming_distance(permutations)}), "
              f"peak lr {peak_lr:.4g}")
    model.train()
    for epoch in run.epochs():
        for (images,), _ in run.batches(loader):
            lr = learning_rate(run.step, run.steps_per_epoch, run.total_steps, peak_lr, args)
            optim.set_lr(optimizer, lr)
            generator = run.step_generator()
            tiles, labels = puzzles(images, permutations, args.tile_size, generator)
            with run.autocast():
                logits = model(tiles)
            loss = permutation_loss(logits, labels)
            mean_loss = run.sync(loss)
            optimizer.zero_grad(set_to_none=True)
            if run.finite_loss(mean_loss, lr):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.finite_grads(core, mean_loss, lr, scaler):
                    scaler.step(optimizer)
                scaler.update()
            accuracy = (logits.detach().argmax(1) == labels).float().mean()
            run.log(loss=mean_loss.item(), puzzle_acc=dist.all_reduce_mean(accuracy).item(), lr=lr)
    return run.finish()


def main(argv=None):
    return launch(train, Args, PRESETS, __doc__, argv)


if __name__ == "__main__":
    cli.run(main)

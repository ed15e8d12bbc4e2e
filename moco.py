"""MoCo v2: Momentum Contrast for Unsupervised Visual Representation Learning.

He, Fan, Wu, Xie, Girshick, CVPR 2020 (https://arxiv.org/abs/1911.05722); v2: Chen, Fan,
Girshick, He, "Improved Baselines with Momentum Contrastive Learning" (arXiv:2003.04297).

A query encoder (ResNet + head) is trained so that the query q of one view picks out the
key k of another view of the same image among a queue of keys of earlier batches (InfoNCE,
Eq. 1). Keys come from a key encoder, the exponential moving average of the query encoder
(Eq. 2), and every step's keys, gathered from all processes, replace the oldest in the queue.
Defaults follow the official code's MoCo v2 settings (main_moco.py --mlp --moco-t 0.2 --aug-plus --cos):
ResNet-50 (torchvision init), MLP head 2048-2048-128, 65536 keys, momentum 0.999, T=0.2, SGD 0.03 x batch/256
(momentum 0.9, no Nesterov), wd 1e-4 on every parameter, cosine, 200 epochs, aug+ (bilinear crop 0.2-1, jitter
0.4/0.4/0.4/0.1 p=0.8, grayscale 0.2, blur p=0.5). VISSL's moco_1node_resnet.yaml differs in Nesterov momentum,
zero-initialised residual BatchNorms, a multistep schedule and crop scale 0.08-1.
`--v1` is MoCo v1 (main_moco.py's defaults): linear head, grayscale then jitter 0.4/0.4/0.4/0.4 always, no
blur, T=0.07, lr /10 at epochs 120 and 160 (`--lr-schedule step`).

Shuffling BN (paper Sec. 3.3): with several processes the key batch is gathered, permuted,
and each process encodes its slice of the permuted batch (own BatchNorm statistics), then
the keys are un-shuffled. On one process the permuted key batch is split into
`--shuffle-bn-splits` chunks (8: the paper's 8 GPUs), each normalised with its own statistics in
one pass (SplitBatchNorm2d, the "split/ghost BatchNorm" of MoCo's single-GPU CIFAR demo): a key
never shares BatchNorm statistics with exactly the images its query saw. The query encoder uses
the same number of (unshuffled) chunks, as on S GPUs. With P processes and S splits, each
encoder's outputs are those of P x S chunks; P processes x S splits equal one process with P x S.

The queue starts as K random unit vectors (builder.py's normalised randn), drawn from a generator seeded by
`--seed` alone, so every process and every world size starts from the same queue and a resumed run restores it
from the checkpoint. `--queue-init empty` starts with no negatives instead and uses only the keys enqueued so far
(after K / global batch steps this is the same loss). On small data the empty start is what learns: with the
random start a fresh network's queries are all alike (mean cosine 0.57), the quickest way to raise q.k+ against
unrelated random negatives is to send every query to one direction, and the head does so at once and stays there
(measured at ResNet-18 32 px, K = 1024, batch 256, lr 0.06, T = 0.1 on cifar10-mini: mean cosine between queries
0.999 after 15 steps and 0.998 after 90, loss flat at 6.90 ~ ln(K + 1) from step 40 on, and kNN top-1 27.95 at
step 135 of 240 against 31.77 for random init). The CPU convergence recipe therefore passes `--queue-init empty`.

Deviations from the original code (facebookresearch/moco builder.py, main_moco.py): Shuffling BN on one process
is emulated by SplitBatchNorm2d chunks (the original runs only under DDP), and the queries are encoded in the same
chunks; the learning rate is scaled linearly with the global batch (the README's recipe for other GPU counts) and
the cosine schedule is updated every step rather than every epoch (the step schedule's milestones are epochs, as
there); the Shuffling-BN permutation and the random queue come from seeded generators instead of the global RNG
(exact resume, identical on every rank without builder.py's reliance on DDP broadcasting rank 0's buffers); the
queue is stored [K, d] (builder.py: [d, K]); the blur is torchvision's GaussianBlur with a kernel of 10% of the
image side and sigma in [0.1, 2] (PIL's GaussianBlur(radius=sigma) there); bf16 autocast on GPU; a step with a
non-finite loss or gradient is skipped and enqueues nothing.

    torchrun --nproc_per_node=8 moco.py --data /datasets/imagenet/train --epochs 200
    python moco.py --preset cifar --data cifar10 --epochs 800
    python moco.py --preset cpu   # the CPU recipe of its convergence test

The views are stated once (`view_recipe`); common/augment.py builds both data paths from it: per image
with PIL in the data workers, or, on CUDA (`--gpu-aug`), batched on the GPU after decode-only workers
(common/gpu_aug.py; bilinear crops without antialias). Speed (common/speed.py): channels_last,
bf16 autocast, `--compile`.
"""
import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from common import augment, cli, dist, models, ops, optim, speed
from common.run import Run, RunArgs, launch


@dataclass
class Args(RunArgs):
    arch: str = "resnet50"
    cifar_stem: bool = False
    v1: bool = field(default=False, metadata={"help": "MoCo v1: linear head, no blur, stronger hue jitter, T=0.07"})
    epochs: int = 200
    batch_size: int = 32  # per process: 32 x 8 GPUs = 256
    lr: float = 0.03  # for a global batch of 256, scaled linearly
    final_lr: float = 0.0
    warmup_epochs: float = 0.0
    weight_decay: float = 1e-4
    momentum: float = 0.9
    lr_schedule: Optional[str] = field(default=None, metadata={
        "choices": ["cosine", "step"], "help": "default: cosine (v2), step (v1: /10 at each --lr-milestones epoch)"})
    lr_milestones: tuple[float, ...] = (120, 160)  # epochs at which the step schedule divides the lr by 10
    temperature: Optional[float] = field(default=None, metadata={"help": "default: 0.2 (v2), 0.07 (v1)"})
    queue_size: int = 65536  # K, a multiple of the global batch
    queue_init: str = field(default="random", metadata={
        "choices": ["random", "empty"],
        "help": "random: K random unit vectors drawn from --seed (the official code); empty: only the keys "
                "enqueued so far are negatives"})
    key_momentum: float = 0.999  # m of Eq. 2
    hidden_dim: int = field(default=2048, metadata={"help": "MLP head width (v2); 0: a linear head, as v1"})
    embedding_dim: int = 128
    image_size: int = 224
    crop_scale: tuple[float, ...] = (0.2, 1.0)
    grayscale_p: float = 0.2
    blur_p: Optional[float] = field(default=None, metadata={"help": "default: 0.5 (v2), 0 (v1)"})
    shuffle_bn_splits: int = field(default=0, metadata={
        "help": "BatchNorm chunks per process of both encoders, the keys' after shuffling (0: 8 on one process, 1 "
                "with several)"})
    output_dir: str = "runs/moco"


PRESETS = {
    "cifar": dict(_doc="ResNet-18 with the CIFAR stem, 32 px, no blur, batch 512, K=4096, m=0.99, T=0.1, wd 5e-4, "
                       "cosine, 8 BatchNorm splits (MoCo's official CIFAR-10 demo, but with v2's MLP head 512-512-128 "
                       "(the demo's is linear: --hidden-dim 0), crop scale 0.2-1 (the demo: 0.08-1) and 800 epochs "
                       "(the demo: 200, its table up to 800))",
                  arch="resnet18", cifar_stem=True, image_size=32, batch_size=512, lr=0.03, temperature=0.1,
                  queue_size=4096, key_momentum=0.99, weight_decay=5e-4, hidden_dim=512, blur_p=0.0, epochs=800,
                  workers=4, output_dir="runs/moco-cifar"),
}

# the recipe the CPU convergence test, demo.py and bench/convergence.py run: `--preset cpu` alone
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test: --preset cifar with the ImageNet stem at "
                            "32 px on the embedded cifar10-mini, 16 epochs, batch 256, lr 0.06, K=1024 starting "
                            "empty"),
                      data="cifar10-mini", cifar_stem=False, workers=2, epochs=16, batch_size=256, lr=0.06,
                      queue_size=1024, queue_init="empty", output_dir="runs/moco-cpu")


def resolve_version_defaults(args):
    """Fill the defaults that differ between MoCo v1 and v2 (explicit flags win)."""
    if args.temperature is None:
        args.temperature = 0.07 if args.v1 else 0.2
    if args.blur_p is None:
        args.blur_p = 0.0 if args.v1 else 0.5
    if args.lr_schedule is None:
        args.lr_schedule = "step" if args.v1 else "cosine"
    return args


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """MoCo's query and key views, stated once for both data paths (common/augment.py): v2 (the paper's appendix,
    main_moco.py --aug-plus) or v1 (grayscale, then an always-on jitter). Bilinear crops, as main_moco.py; its
    flip, drawn last there, commutes with the colour ops and the symmetric blur. The blur is SimCLR's: kernel
    10% of the image side, sigma in [0.1, 2.0]."""
    size = args.image_size
    if args.v1:
        colour = dict(jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, grayscale_first=True)
    else:
        colour = dict(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8)
    return [(2, augment.View(size, scale=tuple(args.crop_scale), grayscale_p=args.grayscale_p, blur_p=args.blur_p,
                             blur_kernel_size=2 * (size // 20) + 1, **colour))]

# ----------------------------------------------------------------------------- model

class Encoder(nn.Module):
    """ResNet trunk + head (v2: MLP 2048-2048-128 without BN; v1: linear), L2-normalised output."""

    def __init__(self, args):
        super().__init__()
        self.trunk = models.build_trunk(args.arch, args.cifar_stem)
        hidden = [] if args.v1 or not args.hidden_dim else [args.hidden_dim]
        dims = [self.trunk.feature_dim] + hidden + [args.embedding_dim]
        self.head = models.mlp(dims, batch_norm=False)

    def forward(self, images):
        z = self.head(self.trunk(images))
        return nn.functional.normalize(z if z.dtype == torch.float64 else z.float(), dim=1)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises each of `splits` contiguous chunks of the batch with the
    chunk's own statistics, in one pass (MoCo's CIFAR demo's SplitBatchNorm: S GPUs' BatchNorm on one
    device). Outputs equal encoding the chunks one by one; the running statistics take the mean of the
    chunks' updates. Same parameters and buffers as nn.BatchNorm2d, so the trunk loads into torchvision."""

    splits = 1

    def forward(self, x):
        if not self.training or self.splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.splits
        if n % s:
            raise ValueError(f"a batch of {n} does not split into {s} BatchNorm chunks.")
        # chunk j's channels become channels j*C..(j+1)*C of a batch of n/s: one batch_norm call normalises each
        grouped = x.reshape(s, n // s, c, h, w).transpose(0, 1).reshape(n // s, s * c, h, w)
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = nn.functional.batch_norm(grouped, mean, var, self.weight.repeat(s), self.bias.repeat(s), True,
                                       self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, c).mean(dim=0))
            self.running_var.copy_(var.view(s, c).mean(dim=0))
            self.num_batches_tracked.add_(1)
        return out.reshape(n // s, s, c, h, w).transpose(0, 1).reshape(n, c, h, w)


def split_batch_norms(module):
    """Replace every BatchNorm2d of `module` by a SplitBatchNorm2d with the same state (in place)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(child.num_features, child.eps, child.momentum, device=child.weight.device,
                                     dtype=child.weight.dtype)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batch_norms(child)
    return module


def encode(encoder, images, splits):
    """encoder(images) with BatchNorm over `splits` contiguous chunks of the batch (= encoding each chunk)."""
    split_norms = [m for m in encoder.modules() if isinstance(m, SplitBatchNorm2d)]
    for m in split_norms:
        m.splits = splits
    try:
        return encoder(images)
    finally:
        for m in split_norms:
            m.splits = 1


def initial_queue(size, dim, how, seed):
    """The queue before the first step, [K, d]. "random": K unit vectors (standard normal draws scaled to unit
    length, as builder.py's normalised randn), from a generator seeded by `seed` alone, so every process and every
    world size starts from the same queue without a broadcast; "empty": zeros, none of them used as negatives."""
    if how == "empty":
        return torch.zeros(size, dim)
    if how != "random":
        raise ValueError(f"unknown --queue-init {how!r}; choose random or empty.")
    draws = torch.randn(size, dim, generator=torch.Generator().manual_seed(seed))
    return nn.functional.normalize(draws, dim=1)


class MoCo(nn.Module):
    """Query encoder f_q, its momentum copy f_k, and the queue of keys (a buffer, so it is checkpointed)."""

    def __init__(self, args):
        super().__init__()
        self.query_encoder = split_batch_norms(Encoder(args))
        self.key_encoder = copy.deepcopy(self.query_encoder)
        for p in self.key_encoder.parameters():
            p.requires_grad = False
        self.register_buffer("queue", initial_queue(args.queue_size, args.embedding_dim, args.queue_init, args.seed))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # entries that are negatives: all K with the random start, else the keys enqueued so far
        filled = args.queue_size if args.queue_init == "random" else 0
        self.register_buffer("queue_filled", torch.tensor(filled, dtype=torch.long))

    @property
    def trunk(self):
        return self.query_encoder.trunk

    @torch.no_grad()
    def momentum_update(self, m):
        """theta_k <- m theta_k + (1 - m) theta_q (Eq. 2); BatchNorm running statistics stay the key encoder's own."""
        for p_k, p_q in zip(self.key_encoder.parameters(), self.query_encoder.parameters()):
            p_k.mul_(m).add_(p_q.detach(), alpha=1 - m)

    @torch.no_grad()
    def encode_keys(self, images, splits, generator=None):
        """Keys of `images` with Shuffling BN: shuffle the global key batch, encode it in `splits` BatchNorm
        chunks per process, un-shuffle."""
        world = dist.world_size()
        everyone = dist.gather(images)  # [world * n, ...], rank-major
        permutation = torch.randperm(len(everyone), generator=generator).to(images.device)
        dist.broadcast(permutation, 0)  # every process uses rank 0's permutation
        mine = permutation.view(world, -1)[dist.rank()]
        keys = encode(self.key_encoder, everyone[mine], splits)
        shuffled = dist.gather(keys)  # row j is the key of image permutation[j]
        unshuffled = torch.empty_like(shuffled)
        unshuffled[permutation] = shuffled
        return unshuffled.view(world, -1, unshuffled.shape[1])[dist.rank()]

    def forward(self, query_images, key_images, key_momentum, splits, generator=None):
        """q of the query views (with gradient) and k of the key views (without), both [n, d].

        The queries are encoded in the same `splits` chunks (unshuffled), so both encoders normalise
        over as many images as one of the paper's GPUs does (measured on one process, batch 256 in 8
        chunks, 8 short CPU epochs: kNN top-1 31.7 against 30.3 with the queries normalised as one batch)."""
        q = encode(self.query_encoder, query_images, splits)
        self.momentum_update(key_momentum)
        k = self.encode_keys(key_images, splits, generator)
        return q, k.to(q.dtype)

    @torch.no_grad()
    def enqueue(self, keys):
        """Replace the oldest len(keys) queue entries by `keys` (every process's keys, gathered). As in the
        official code the pointer never wraps inside a batch (K is a multiple of the global batch)."""
        ptr = int(self.queue_ptr)
        if ptr + len(keys) > len(self.queue):
            raise ValueError(f"{len(keys)} keys at position {ptr} overrun the queue of {len(self.queue)}: the queue "
                             f"size must be a multiple of the global batch.")
        self.queue[ptr:ptr + len(keys)] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + len(keys)) % len(self.queue))
        self.queue_filled.fill_(min(int(self.queue_filled) + len(keys), len(self.queue)))

    def negatives(self):
        """The keys enqueued so far (all K once the queue has wrapped), a copy: the step enqueues in place."""
        return self.queue[:int(self.queue_filled)].clone()


# ----------------------------------------------------------------------------- loss

def moco_loss(q, k, queue, temperature):
    """InfoNCE (Eq. 1): -log exp(q.k+/T) / (exp(q.k+/T) + sum_queue exp(q.k/T)), averaged over queries.

    Exactly the paper's logits [l_pos, l_neg] (VISSL's moco_loss): the other keys of the batch
    are not negatives, so the loss does not depend on how the batch is split over processes.
    The fused ops.contrastive_loss supplies the log-sum-exp over the queue (the N x K part): with
    every target at column 0 its per-row value is lse_j(q.queue_j/T) - q.queue_0/T.
    With no negatives yet (the first step) the loss is 0: each query's only candidate is its key.
    """
    positive = (q * k).sum(dim=1) / temperature
    if len(queue) == 0:
        return (positive - positive).mean()
    queue = queue.to(q.dtype)
    first = torch.zeros(len(q), dtype=torch.long, device=q.device)
    negatives_lse = ops.contrastive_loss(q, queue, first, temperature, reduction="none") + q @ queue[0] / temperature
    return (torch.logaddexp(positive, negatives_lse) - positive).mean()


# ----------------------------------------------------------------------------- training

def learning_rate(step, steps_per_epoch, total_steps, warmup_steps, peak_lr, args):
    """Linear warmup, then cosine to --final-lr (v2) or /10 at each milestone epoch (v1), per step."""
    if args.lr_schedule == "cosine" or step < warmup_steps:
        return optim.warmup_cosine(step, total_steps, warmup_steps, peak_lr, args.final_lr)
    return peak_lr * 0.1 ** sum(step >= round(m * steps_per_epoch) for m in args.lr_milestones)


def train(args, runtime):
    args = resolve_version_defaults(args)
    global_batch = args.batch_size * runtime.world_size
    splits = args.shuffle_bn_splits or (8 if runtime.world_size == 1 else 1)
    if args.queue_size < global_batch or args.queue_size % global_batch:
        raise ValueError(f"--queue-size {args.queue_size} must be a multiple of the global batch {global_batch} "
                         f"({runtime.world_size} process(es) x --batch-size {args.batch_size}).")
    if args.batch_size % splits:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by the {splits} Shuffling-BN splits "
                         f"(--shuffle-bn-splits).")
    if not 0 <= args.key_momentum < 1:
        raise ValueError(f"--key-momentum must be in [0, 1), got {args.key_momentum}.")
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("moco", args, runtime)
    dataset = run.dataset()
    if args.queue_size >= len(dataset):
        # keys of the last K images include an older key of the query's own image: a positive scored as a negative
        raise ValueError(f"--queue-size {args.queue_size} must be smaller than the {len(dataset)} training images "
                         f"(a queue holding the whole data set makes each query's own earlier keys negatives).")
    loader = run.loader(dataset, view_recipe(args))
    # no SyncBN: Shuffling BN is what MoCo uses instead; the queue is identical on every process by construction, so
    # DDP need not broadcast its 32 MB of buffers each step; the encoders are compiled, not the top-level forward
    model, core = run.wrap(MoCo(args), compile=False, broadcast_buffers=False)
    speed.compile_in_place([core.query_encoder, core.key_encoder], args.compile)
    # the official recipe decays every parameter (biases and BN too)
    optimizer = torch.optim.SGD([p for p in core.parameters() if p.requires_grad], lr=0.0, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scaler = run.grad_scaler()
    run.resume(core, optimizer, scaler)  # the model's state includes key_encoder.*, queue, queue_ptr/_filled
    run.save_also(lambda: {"queue_ptr": int(core.queue_ptr)})  # the queue itself and the key encoder are in `model`

    # ---- the method: edit here
    peak_lr = optim.scaled_lr(args.lr, run.global_batch)
    warmup_steps = round(args.warmup_epochs * run.steps_per_epoch)
    run.start(f"MoCo {'v1' if args.v1 else 'v2'}, peak lr {peak_lr:.4g}, queue {args.queue_size} ({args.queue_init} "
              f"start), Shuffling BN {runtime.world_size} x {splits} chunk(s), ops backend {ops.backend(run.device)}")
    model.train()
    for epoch in run.epochs():
        for (query_images, key_images), indices in run.batches(loader):
            lr = learning_rate(run.step, run.steps_per_epoch, run.total_steps, warmup_steps, peak_lr, args)
            optim.set_lr(optimizer, lr)
            with run.autocast():
                # the shuffle depends on (seed, step) only, so a resumed run draws the same one
                shuffle = torch.Generator().manual_seed(args.seed * 1_000_003 + run.step)
                q, k = model(query_images, key_images, args.key_momentum, splits, shuffle)
            loss = moco_loss(q, k, core.negatives(), args.temperature)
            mean_loss = run.sync(loss)
            optimizer.zero_grad(set_to_none=True)
            applied = False
            if run.finite_loss(mean_loss, lr):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.finite_grads(core, mean_loss, lr, scaler):
                    scaler.step(optimizer)
                    applied = True
                scaler.update()
            if applied:  # a skipped (non-finite) step enqueues nothing
                core.enqueue(dist.gather(k))
            run.log(loss=mean_loss.item(), lr=lr)
    return run.finish()


def main(argv=None):
    return launch(train, Args, PRESETS, __doc__, argv)


if __name__ == "__main__":
    cli.run(main)

"""MoCo v3: An Empirical Study of Training Self-Supervised Vision Transformers.

Chen, Xie, He, ICCV 2021 (https://arxiv.org/abs/2104.02057).

Two views of each image go through a base encoder (trunk + projection MLP) and a prediction MLP to give queries
q1, q2, and through a momentum encoder (an exponential moving average of the base encoder, no predictor) to give
keys k1, k2. Each query picks out the key of the other view of its image among the keys of every image in the
global batch (InfoNCE, Algorithm 1), no memory queue:

    ctr(q, k) = CrossEntropy(q k^T / tau, arange(N)) * 2 tau,    L = ctr(q1, k2) + ctr(q2, k1)

with q and k L2-normalised. For ViTs the patch projection stays at its random initialisation (Sec. 4.1, "random
patch projection": gradients stop at the patch embedding), which the paper found to stabilise training.

Defaults are the paper's ViT-S recipe (the official CONFIG.md, 300 epochs): `vit_s_16`, projector 3 layers and
predictor 2 layers, 4096 hidden, 256 out (Linear-BN-ReLU, the last BatchNorm without affine parameters), tau 0.2,
momentum 0.99 raised to 1 along a half cosine, AdamW lr 1.5e-4 x batch/256 with weight decay 0.1 on every
parameter, 40 warmup epochs then cosine to 0 (per step), batch 4096, frozen random patch projection with the
official initialisation (Xavier-uniform linear layers, the packed qkv projection as three, a uniform patch
projection, a CLS token with std 1e-6) and fixed 2-D sine-cosine position embeddings. `--preset resnet50` is the
ResNet-50 recipe (100 epochs: LARS lr 0.6, wd 1e-6 on weights only, tau 1.0, projector 2 layers, predictor
without a last BatchNorm, zero-initialised residual BatchNorms, crop scale 0.2-1). Views are BYOL's (bilinear crop
0.08-1 at 224, jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, blur p 1.0 / 0.1, solarisation p 0 / 0.2).

Deviations from the original code:
- ViT-S/16 is DINO's (6 heads of 64, as `vit_s_16` everywhere in this repository); MoCo v3's vits.py gives its
  ViT-S 12 heads of 32 (same width, depth and parameter count). ViT-B/16 is the same in both.
- The ViT is torchvision's VisionTransformer (pre-norm blocks with LayerNorm eps 1e-6, as timm's), with MoCo v3's
  initialisation and position embeddings applied to it; the sine-cosine table is interpolated for other input
  sizes like any position embedding here.
- The logits go through ops.contrastive_loss (fused, the N x world*N logits never stored); the value is the
  official formula's (tests/test_mocov3.py checks it in float64).
- The blur is torchvision's GaussianBlur with a kernel of 10% of the image side (PIL's radius=sigma there).
- bf16 autocast on GPU (the original: fp16 with a grad scaler, which --precision fp16 gives); a step with a
  non-finite loss or gradient is skipped.

    torchrun --nproc_per_node=8 mocov3.py --data /datasets/imagenet/train
    torchrun --nproc_per_node=8 mocov3.py --preset resnet50 --data /datasets/imagenet/train
    python mocov3.py --preset cifar --data cifar10
    python mocov3.py --preset cpu   # a 2-core CPU recipe on the embedded cifar10-mini

The views are stated once (`view_recipe`); common/augment.py builds both data paths from it: per image
with PIL in the data workers, or, on CUDA (`--gpu-aug`), batched on the GPU after decode-only workers
(common/gpu_aug.py; bilinear crops without antialias). Speed (common/speed.py): channels_last,
bf16 autocast, `--compile`.
"""
import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from common import augment, cli, dist, models, ops, optim
from common.run import Run, RunArgs, launch


@dataclass
class Args(RunArgs):
    arch: str = "vit_s_16"
    cifar_stem: bool = False
    stop_grad_conv1: bool = field(default=True, metadata={
        "help": "ViTs: keep the patch projection at its random initialisation (the paper's random patch "
                "projection); ResNets: no effect"})
    zero_init_residual: bool = field(default=True, metadata={
        "help": "ResNets: start each residual block's last BatchNorm scale at 0 (the original code)"})
    epochs: int = 300
    batch_size: int = 128  # per process: 128 x 32 = 4096, the paper's batch
    optimizer: str = field(default="adamw", metadata={
        "choices": ["adamw", "lars"], "help": "adamw: weight decay on every parameter (the ViT recipe); lars: "
                                              "eta 0.001, biases and norms neither decayed nor adapted (ResNets)"})
    lr: float = 1.5e-4  # for a global batch of 256, scaled linearly
    warmup_epochs: float = 40.0  # linear warmup from 0, then cosine to 0
    weight_decay: float = 0.1
    momentum: float = 0.9  # LARS's momentum (--optimizer lars)
    temperature: float = 0.2  # tau
    moco_momentum: float = 0.99  # the momentum encoder's EMA rate at step 0, raised to 1 along a half cosine
    projector_layers: int = 0  # 0: 3 for ViTs, 2 for ResNets (the original)
    hidden_dim: int = 4096  # projector and predictor hidden width
    embedding_dim: int = 256  # q and k size
    image_size: int = 224
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    jitter: tuple[float, ...] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # probability of applying the colour jitter
    grayscale_p: float = 0.2
    blur_p: tuple[float, ...] = (1.0, 0.1)  # per view
    solarize_p: tuple[float, ...] = (0.0, 0.2)  # per view
    sync_bn: bool = True
    output_dir: str = "runs/mocov3"


PRESETS = {
    "resnet50": dict(_doc="the official ResNet-50 100-epoch recipe (CONFIG.md, 68.9 linear): LARS lr 0.6, wd 1e-6, "
                          "tau 1.0, 10 warmup epochs, crop scale 0.2-1",
                     arch="resnet50", optimizer="lars", lr=0.6, weight_decay=1e-6, temperature=1.0, epochs=100,
                     warmup_epochs=10, crop_scale=(0.2, 1.0), output_dir="runs/mocov3-resnet50"),
    "cifar": dict(_doc="solo-learn's CIFAR-10 recipe (scripts/pretrain/cifar/mocov3.yaml, 93.10 linear after 1000 "
                       "epochs): ResNet-18 with the CIFAR stem at 32 px, batch 256, LARS lr 0.3, wd 1e-6, tau 0.2, "
                       "momentum 0.99 -> 1, 10 warmup epochs, no blur, solarisation 0 / 0.2, no zero-initialised "
                       "residual BatchNorms (solo-learn's LARS clips the trust ratio at the lr and uses Apex's "
                       "denominator |g| + wd |w|: not modelled here)",
                  arch="resnet18", cifar_stem=True, zero_init_residual=False, image_size=32, batch_size=256,
                  optimizer="lars", lr=0.3, weight_decay=1e-6, temperature=0.2, epochs=1000, warmup_epochs=10,
                  blur_p=(0.0, 0.0), workers=4, output_dir="runs/mocov3-cifar"),
}
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("a 2-core CPU recipe: --preset cifar with the ImageNet stem at 32 px on the embedded "
                            "cifar10-mini, 8 epochs with 1 of warmup, hidden width 1024"),
                      data="cifar10-mini", cifar_stem=False, workers=2, epochs=8, warmup_epochs=1.0, hidden_dim=1024,
                      output_dir="runs/mocov3-cpu")


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """BYOL's asymmetric views, as main_moco.py: blur p 1.0 / 0.1, solarisation p 0 / 0.2 for view 1 / view 2,
    the rest alike. Bilinear crops; the flip, drawn last there, commutes with the rest."""
    augment.check_per_view(2, blur_p=args.blur_p, solarize_p=args.solarize_p)
    size = args.image_size
    return [(1, augment.View(size, scale=tuple(args.crop_scale), jitter=tuple(args.jitter), jitter_p=args.jitter_p,
                             grayscale_p=args.grayscale_p, blur_p=blur, blur_kernel_size=2 * (size // 20) + 1,
                             solarize_p=solarize))
            for blur, solarize in zip(args.blur_p, args.solarize_p)]


# ----------------------------------------------------------------------------- model

def is_vit(trunk):
    return hasattr(trunk, "conv_proj") and hasattr(trunk, "class_token")


def sincos_position_embedding(grid, dim, temperature=10000.0):
    """MoCo v3's fixed 2-D sine-cosine table [1, 1 + grid^2, dim]: a zero row for the CLS token, then for patch
    (a, b) of the grid (row-major) sin/cos of a * omega and of b * omega, omega_i = temperature^(-i / (dim / 4))."""
    if dim % 4:
        raise ValueError(f"the 2-D sine-cosine position embedding needs a width divisible by 4, got {dim}.")
    a, b = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    out_a, out_b = a.flatten()[:, None] * omega, b.flatten()[:, None] * omega
    table = torch.cat([out_a.sin(), out_a.cos(), out_b.sin(), out_b.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table])[None].float()


@torch.no_grad()
def init_vit_as_moco_v3(trunk, stop_grad_conv1):
    """MoCo v3's ViT initialisation (vits.py) on a torchvision VisionTransformer trunk: Xavier-uniform linear layers
    with zero biases (the packed qkv weight [3D, D] as three [D, D] matrices), CLS token ~ N(0, 1e-6^2), the patch
    projection uniform in +-sqrt(6 / (3 p^2 + D)) with zero bias (frozen with `stop_grad_conv1`), and the fixed
    sine-cosine position embeddings (never trained)."""
    for name, m in trunk.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            bound = math.sqrt(6.0 / (m.in_proj_weight.shape[0] // 3 + m.in_proj_weight.shape[1]))
            nn.init.uniform_(m.in_proj_weight, -bound, bound)
            nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(trunk.class_token, std=1e-6)
    proj = trunk.conv_proj
    bound = math.sqrt(6.0 / (3 * proj.kernel_size[0] * proj.kernel_size[1] + proj.out_channels))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)
    pos = trunk.encoder.pos_embedding
    pos.copy_(sincos_position_embedding(int(round(math.sqrt(pos.shape[1] - 1))), pos.shape[2]))
    pos.requires_grad = False
    if stop_grad_conv1:
        proj.weight.requires_grad = proj.bias.requires_grad = False
    return trunk


def mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn=True):
    """MoCo v3's MLP: Linear (no bias) - BN - ReLU between layers; after the last Linear an affine-free BN
    (SimCLR's design) unless `last_bn` is False."""
    layers = []
    for i in range(num_layers):
        d_in, d_out = in_dim if i == 0 else hidden_dim, out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Trunk + projection MLP (3 layers after a ViT, 2 after a ResNet, unless --projector-layers says)."""

    def __init__(self, args):
        super().__init__()
        self.trunk = models.build_trunk(args.arch, args.cifar_stem, zero_init_residual=args.zero_init_residual)
        if is_vit(self.trunk):
            init_vit_as_moco_v3(self.trunk, args.stop_grad_conv1)
        layers = args.projector_layers or (3 if is_vit(self.trunk) else 2)
        self.projector = mlp(layers, self.trunk.feature_dim, args.hidden_dim, args.embedding_dim)

    def forward(self, images):
        return self.projector(self.trunk(images))


class MoCoV3(nn.Module):
    """Base encoder + predictor (queries), momentum encoder (keys, an EMA copy of the base encoder)."""

    def __init__(self, args):
        super().__init__()
        self.base_encoder = Encoder(args)
        # the ViT predictor ends in an affine-free BN, the ResNet one does not (the original's two builders)
        self.predictor = mlp(2, args.embedding_dim, args.hidden_dim, args.embedding_dim,
                             last_bn=is_vit(self.base_encoder.trunk))
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        for p in self.momentum_encoder.parameters():
            p.requires_grad = False

    @property
    def trunk(self):
        return self.base_encoder.trunk

    @torch.no_grad()
    def update_momentum_encoder(self, m):
        for p_m, p_b in zip(self.momentum_encoder.parameters(), self.base_encoder.parameters()):
            p_m.mul_(m).add_(p_b.detach(), alpha=1 - m)

    def forward(self, views, m):
        """Queries [q1, q2] and keys [k1, k2] of this process's images. As the original, the momentum encoder
        takes its step (rate m) before encoding the keys; each view is encoded on its own."""
        queries = [self.predictor(self.base_encoder(v)) for v in views]
        with torch.no_grad():
            self.update_momentum_encoder(m)
            keys = [self.momentum_encoder(v) for v in views]
        return queries, keys


def moco_momentum(step, total_steps, base):
    """m = 1 - (1 + cos(pi t / T)) / 2 * (1 - m0), t the (fractional) epoch, as main_moco.py --moco-m-cos."""
    return 1 - 0.5 * (1 + math.cos(math.pi * step / max(1, total_steps))) * (1 - base)


# ----------------------------------------------------------------------------- loss

def ctr(q, k, temperature):
    """CrossEntropy(q k^T / tau) * 2 tau with q, k L2-normalised: the positive of query i is the key of the same
    image; the keys are every process's (gathered without gradient, the momentum encoder's)."""
    q = nn.functional.normalize(q, dim=1)
    k = nn.functional.normalize(dist.gather(k.detach()), dim=1).to(q.dtype)
    positive = torch.arange(len(q), device=q.device) + dist.rank() * len(q)
    return ops.contrastive_loss(q, k, positive, temperature) * (2 * temperature)


def mocov3_loss(queries, keys, temperature):
    """The symmetrised loss ctr(q1, k2) + ctr(q2, k1) (Algorithm 1). Float32 even under autocast."""
    (q1, q2), (k1, k2) = [[x if x.dtype == torch.float64 else x.float() for x in pair] for pair in (queries, keys)]
    return ctr(q1, k2, temperature) + ctr(q2, k1, temperature)


# ----------------------------------------------------------------------------- training

def build_optimizer(model, args):
    """AdamW with weight decay on every trained parameter, or LARS (MoCo v3's: the decay inside the trust ratio,
    1-D parameters neither decayed nor adapted)."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0,
                                 weight_decay=args.weight_decay)
    groups = optim.param_groups(model, args.weight_decay, exclude_bias_and_norm=True)
    return optim.LARS([g for g in groups if g["params"]], lr=0.0, momentum=args.momentum, decayed_norm=True)


def train(args, runtime):
    if not 0 <= args.moco_momentum <= 1:
        raise ValueError(f"--moco-momentum must be in [0, 1], got {args.moco_momentum}.")
    if args.batch_size < 2:
        raise ValueError(f"MoCo v3's projector and predictor normalise over the batch (BatchNorm): --batch-size must "
                         f"be at least 2, got {args.batch_size}.")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}.")
    views_recipe = view_recipe(args)
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("mocov3", args, runtime)
    loader = run.loader(None, views_recipe)
    model, core = run.wrap(MoCoV3(args), sync_bn=args.sync_bn)
    optimizer, scaler = build_optimizer(core, args), run.grad_scaler()
    run.resume(core, optimizer, scaler)  # the model's state includes the momentum encoder

    # ---- the method: edit here
    peak_lr = optim.scaled_lr(args.lr, run.global_batch)
    warmup_steps = round(args.warmup_epochs * run.steps_per_epoch)
    run.start(f"{args.optimizer}, peak lr {peak_lr:.4g}, tau {args.temperature}, momentum {args.moco_momentum} -> 1, "
              f"ops backend {ops.backend(run.device)}")
    model.train()
    for epoch in run.epochs():
        for views, indices in run.batches(loader):
            lr = optim.warmup_cosine(run.step, run.total_steps, warmup_steps, peak_lr)
            optim.set_lr(optimizer, lr)
            m = moco_momentum(run.step, run.total_steps, args.moco_momentum)
            with run.autocast():
                queries, keys = model(views, m)
            loss = mocov3_loss(queries, keys, args.temperature)
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

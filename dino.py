"""DINO: Emerging Properties in Self-Supervised Vision Transformers (self-distillation with no labels).

Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin, ICCV 2021 (https://arxiv.org/abs/2104.14294).

A student network (trunk + DINO head) is trained to match, on every crop of an image, the output distribution of
a teacher network on the two global crops (Algorithm 1):

    P_t = softmax((g_t(x) - C) / tau_t),  P_s = softmax(g_s(x') / tau_s),
    L = mean over pairs (global crop x, any other crop x' != x) of  -sum_k P_t(x)_k log P_s(x')_k

The teacher has no gradient: its weights are an exponential moving average of the student's (momentum 0.996
raised to 1 along a cosine), its outputs are centred by C (an EMA, rate 0.9, of the teacher's mean output over
the global batch) and sharpened by a low temperature tau_t; the two together avoid collapse.

Defaults are main_dino.py's (100 epochs) with the two settings the paper and README give for ViT-S/16's best
results: 10 local crops and the teacher temperature warmed up from 0.04 to 0.07 over 30 epochs. So: ViT-S/16 (DINO's
sizes) with stochastic depth 0.1 in the student only, DINO's ViT initialisation (truncated normal, std 0.02), head
MLP 384-2048-2048-256 (GELU, no BatchNorm), L2-normalised bottleneck, weight-normalised last layer to 65536
prototypes with its norm fixed at 1 (--norm-last-layer) and frozen for the first epoch, student temperature 0.1,
centre momentum 0.9, AdamW lr 0.0005 x batch/256 (batch 1024) with 10 warmup epochs then cosine to 1e-6, weight
decay 0.04 -> 0.4 along a cosine on weights only (biases and norms: none), per-parameter gradient clipping at norm
3.0. Crops: 2 global 224-px (bicubic, scale 0.4-1) and 10 local 96-px (scale 0.05-0.4); flip, colour jitter
(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2; blur p 1.0 / 0.1 / 0.5 (global 1, global 2, local); solarisation p 0.2 on
global 2. Only the global crops go through the teacher. `--preset resnet50` is the README's ResNet-50 command.

Deviations from the original code:
- The ViT is torchvision's VisionTransformer (`vit_s_16`: DINO's sizes; pre-norm blocks, LayerNorm eps 1e-6)
  with DINO's initialisation applied and stochastic depth added to its blocks (DropPath on both residual
  branches, rates rising linearly to --drop-path-rate over the blocks, as DINO); DINO's own ViT puts the same
  computation in differently named modules (common/foreign.py converts DINO checkpoints).
- The blur is torchvision's GaussianBlur with a kernel of 10% of the crop's side (PIL's radius=sigma there).
- bf16 autocast on GPU (the original: fp16 with a grad scaler, which --precision fp16 gives). A step with a
  non-finite loss or gradient is skipped (the original exits), leaving the centre and the teacher as they were.

    torchrun --nproc_per_node=8 dino.py --data /datasets/imagenet/train
    torchrun --nproc_per_node=8 dino.py --preset resnet50 --data /datasets/imagenet/train
    python dino.py --preset cifar --data cifar10
    python dino.py --preset cpu   # a 2-core CPU recipe on the embedded cifar10-mini

The crops are stated once (`view_recipe`); common/augment.py builds both data paths from it: per image
with PIL in the data workers, or, on CUDA (`--gpu-aug`), batched on the GPU after decode-only workers
(common/gpu_aug.py; bilinear crops without antialias). Speed (common/speed.py): channels_last,
bf16 autocast, `--compile`.
"""
import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torchvision

from common import augment, cli, dist, models, ops, optim
from common.run import Run, RunArgs, launch


@dataclass
class Args(RunArgs):
    arch: str = "vit_s_16"
    cifar_stem: bool = False
    epochs: int = 100
    batch_size: int = 64  # per process: 64 x 16 = 1024
    optimizer: str = field(default="adamw", metadata={
        "choices": ["adamw", "sgd", "lars"], "help": "adamw for ViTs; sgd (momentum 0.9) or lars for ConvNets"})
    lr: float = 0.0005  # peak, for a global batch of 256, scaled linearly
    min_lr: float = 1e-6  # the cosine's end
    warmup_epochs: float = 10.0  # linear warmup from 0
    weight_decay: float = 0.04  # at step 0, on weights only
    weight_decay_end: float = 0.4  # at the last step (cosine)
    momentum: float = 0.9  # SGD's and LARS's momentum
    clip_grad: float = 3.0  # clip each parameter's gradient to this norm (0: off)
    freeze_last_layer: float = 1.0  # epochs during which the head's last layer gets no update
    drop_path_rate: float = 0.1  # the student ViT's stochastic depth (the last block's rate)
    out_dim: int = 65536  # prototypes K of the head's last layer
    hidden_dim: int = 2048  # head MLP width
    bottleneck_dim: int = 256  # head bottleneck, L2-normalised before the last layer
    head_bn: bool = False  # BatchNorm in the head MLP (DINO's --use_bn_in_head)
    norm_last_layer: bool = field(default=True, metadata={
        "help": "keep the weight-normalised last layer's norm fixed at 1 (DINO's default; off can help ViT-S "
                "but may destabilise training)"})
    momentum_teacher: float = 0.996  # the teacher's EMA rate at step 0, raised to 1 along a cosine
    student_temp: float = 0.1  # tau_s of the student's softmax
    teacher_temp: float = 0.07  # after the warm-up
    warmup_teacher_temp: float = 0.04  # tau_t at epoch 0, raised linearly to --teacher-temp
    warmup_teacher_temp_epochs: int = 30  # epochs of that warm-up
    center_momentum: float = 0.9  # EMA rate of the centre C
    global_size: int = 224  # side of the two global crops
    local_size: int = 96  # side of the local crops
    local_crops: int = 10  # local crops per image (0: two global crops only)
    global_scale: tuple[float, ...] = (0.4, 1.0)  # area fraction of the global crops
    local_scale: tuple[float, ...] = (0.05, 0.4)  # area fraction of the local crops
    jitter: tuple[float, ...] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # probability of applying the colour jitter
    grayscale_p: float = 0.2
    blur_p: tuple[float, ...] = (1.0, 0.1, 0.5)  # global crop 1, global crop 2, local crops
    solarize_p: float = 0.2  # global crop 2 only
    sync_bn: bool = True
    output_dir: str = "runs/dino"


PRESETS = {
    "resnet50": dict(_doc="the README's ResNet-50 command: SGD lr 0.03, weight decay 1e-4 throughout, global crops "
                          "0.14-1, local crops 0.05-0.14, and main_dino.py's defaults for the rest: 8 local crops, "
                          "teacher temperature 0.04 throughout",
                     arch="resnet50", optimizer="sgd", lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4,
                     global_scale=(0.14, 1.0), local_scale=(0.05, 0.14), local_crops=8, teacher_temp=0.04,
                     warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0, output_dir="runs/dino-resnet50"),
    "cifar": dict(_doc="solo-learn's CIFAR-10 recipe (scripts/pretrain/cifar/dino.yaml, 89.52 linear after 1000 "
                       "epochs): ResNet-18 with the CIFAR stem at 32 px, two crops and no local ones, head "
                       "2048-256 -> 4096 prototypes, teacher momentum 0.9995, LARS lr 0.3 (the authors' trust "
                       "ratio; solo-learn's is Apex's, clipped), wd 1e-6, no blur, solarisation on crop 2",
                  arch="resnet18", cifar_stem=True, global_size=32, local_crops=0, global_scale=(0.08, 1.0),
                  out_dim=4096, batch_size=256, optimizer="lars", lr=0.3, weight_decay=1e-6, weight_decay_end=1e-6,
                  momentum_teacher=0.9995, blur_p=(0.0, 0.0, 0.0), epochs=1000, warmup_teacher_temp_epochs=50,
                  clip_grad=0.0, workers=4, output_dir="runs/dino-cifar"),
}
PRESETS["cpu"] = dict(PRESETS["cifar"],
                      _doc=("the 2-core CPU recipe of the convergence test: --preset cifar with the ImageNet stem "
                            "at 32 px on the embedded cifar10-mini, 8 epochs with 1 of warmup, batch 64 (496 "
                            "steps), LARS at lr 2.0, teacher momentum 0.99, a head 1024 wide with BatchNorm to 1024 "
                            "prototypes, teacher temperature 0.02 -> 0.04 over 2 epochs: with the cifar recipe's "
                            "momentum 0.9995 the teacher, the network evaluated, hardly leaves its random init in "
                            "so few steps, and with 4096 prototypes and tau_t 0.04 -> 0.07 the loss stayed at "
                            "ln 4096 (a uniform student)"),
                      data="cifar10-mini", cifar_stem=False, workers=2, epochs=8, warmup_epochs=1.0, batch_size=64,
                      lr=2.0, momentum_teacher=0.99, head_bn=True, hidden_dim=1024, out_dim=1024, teacher_temp=0.04,
                      warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=2, output_dir="runs/dino-cpu")


# ----------------------------------------------------------------------------- augmentations

def view_recipe(args):
    """DINO's multi-crop (DataAugmentationDINO), stated once for both data paths (common/augment.py): two global
    crops (blur p 1.0 and 0.1, solarisation on the second) and --local-crops local ones (blur p 0.5), bicubic,
    each with flip, jitter and grayscale."""
    if len(args.blur_p) != 3:
        raise ValueError(f"--blur-p takes three probabilities (global crop 1, global crop 2, local crops), got "
                         f"{args.blur_p}.")
    colour = dict(interpolation="bicubic", jitter=tuple(args.jitter), jitter_p=args.jitter_p,
                  grayscale_p=args.grayscale_p)
    g, local = args.global_size, args.local_size
    groups = [(1, augment.View(g, scale=tuple(args.global_scale), blur_p=args.blur_p[0],
                               blur_kernel_size=2 * (g // 20) + 1, **colour)),
              (1, augment.View(g, scale=tuple(args.global_scale), blur_p=args.blur_p[1],
                               blur_kernel_size=2 * (g // 20) + 1, solarize_p=args.solarize_p, **colour))]
    if args.local_crops:
        groups.append((args.local_crops, augment.View(local, scale=tuple(args.local_scale), blur_p=args.blur_p[2],
                                                      blur_kernel_size=2 * (local // 20) + 1, **colour)))
    return groups


# ----------------------------------------------------------------------------- model

class DropPathEncoderBlock(torchvision.models.vision_transformer.EncoderBlock):
    """torchvision's pre-norm ViT block with stochastic depth (DINO's DropPath) on both residual branches: in
    training each sample's branch output is dropped with probability `drop_prob` and kept ones scaled by
    1 / (1 - drop_prob). Same parameters as the block it replaces."""

    drop_prob = 0.0

    def drop_path(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def forward(self, input):
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = input + self.drop_path(self.dropout(x))
        return x + self.drop_path(self.mlp(self.ln_2(x)))


def add_drop_path(trunk, rate):
    """Stochastic depth on a ViT trunk's blocks, rates rising linearly from 0 to `rate` (DINO's dpr)."""
    blocks = list(trunk.encoder.layers)
    for block, prob in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist()):
        block.__class__ = DropPathEncoderBlock
        block.drop_prob = prob
    return trunk


@torch.no_grad()
def init_vit_as_dino(trunk):
    """DINO's ViT initialisation on a torchvision VisionTransformer trunk: every Linear (and the packed qkv
    projection) ~ truncated normal std 0.02 with zero bias, LayerNorms 1 / 0, position embeddings and CLS token
    ~ truncated normal std 0.02; the patch projection keeps the default Conv2d initialisation."""
    for m in trunk.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
            nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    nn.init.trunc_normal_(trunk.encoder.pos_embedding, std=0.02)
    nn.init.trunc_normal_(trunk.class_token, std=0.02)
    nn.init.kaiming_uniform_(trunk.conv_proj.weight, a=math.sqrt(5))  # nn.Conv2d's default
    bound = 1 / math.sqrt(trunk.conv_proj.weight[0].numel())
    nn.init.uniform_(trunk.conv_proj.bias, -bound, bound)
    return trunk


class WeightNormLinear(nn.Module):
    """Linear without bias, weight = g * v / |v| row-wise (nn.utils.weight_norm's weight_g, weight_v)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach()  # nn.Linear's default initialisation
        self.weight_v = nn.Parameter(v.clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x):
        return nn.functional.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True))


class DINOHead(nn.Module):
    """MLP (3 layers, GELU, optional BN) to a bottleneck, L2 normalisation, weight-normalised last layer."""

    def __init__(self, in_dim, args):
        super().__init__()
        dims = [in_dim, args.hidden_dim, args.hidden_dim, args.bottleneck_dim]
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers += ([nn.BatchNorm1d(d_out)] if args.head_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(args.bottleneck_dim, args.out_dim)
        self.last_layer.weight_g.requires_grad = not args.norm_last_layer

    def forward(self, x):
        return self.last_layer(nn.functional.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    """Trunk + head over a list of crops: consecutive crops of one size share a trunk pass, the head runs once."""

    def __init__(self, trunk, head):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, crops):
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            features.append(self.trunk(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))


class DINO(nn.Module):
    """Student (trained) and teacher (EMA of the student, no stochastic depth), and the centre C."""

    def __init__(self, args):
        super().__init__()
        trunk = models.build_trunk(args.arch, args.cifar_stem)
        vit = models.family_of(trunk) == "vit"
        if vit:
            init_vit_as_dino(trunk)
        self.student = MultiCropWrapper(trunk, DINOHead(trunk.feature_dim, args))
        self.teacher = copy.deepcopy(self.student)  # starts equal to the student
        for p in self.teacher.parameters():
            p.requires_grad = False
        if vit and args.drop_path_rate:
            add_drop_path(self.student.trunk, args.drop_path_rate)
        self.register_buffer("center", torch.zeros(1, args.out_dim))

    @property
    def trunk(self):
        return self.teacher.trunk  # DINO evaluates (and releases) the teacher

    def forward(self, crops):
        """Student outputs of every crop [n_crops * n, K], teacher outputs of the two global crops [2n, K]."""
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2])
        return self.student(crops), teacher_out

    @torch.no_grad()
    def update_teacher(self, m):
        for p_t, p_s in zip(self.teacher.parameters(), self.student.parameters()):
            p_t.mul_(m).add_(p_s.detach(), alpha=1 - m)

    @torch.no_grad()
    def update_center(self, teacher_out, momentum):
        """C <- m C + (1 - m) mean of the teacher outputs over the global batch (Eq. 4)."""
        teacher_out = teacher_out if teacher_out.dtype == torch.float64 else teacher_out.float()
        batch_center = dist.all_reduce_mean(teacher_out.mean(dim=0, keepdim=True))
        self.center.mul_(momentum).add_(batch_center.to(self.center.dtype), alpha=1 - momentum)


# ----------------------------------------------------------------------------- loss

def dino_loss(student_out, teacher_out, center, n_crops, student_temp, teacher_temp):
    """Cross-entropy between the centred, sharpened teacher distribution of each global crop and the student
    distribution of every other crop, averaged over the images and then over the 2 * (n_crops - 1) pairs
    (DINOLoss). Float32 even under autocast."""
    student_out, teacher_out = [x if x.dtype == torch.float64 else x.float() for x in (student_out, teacher_out)]
    log_p_student = nn.functional.log_softmax(student_out / student_temp, dim=-1).chunk(n_crops)
    p_teacher = nn.functional.softmax((teacher_out - center.to(teacher_out.dtype)) / teacher_temp, dim=-1)
    p_teacher = p_teacher.detach().chunk(2)
    total, terms = 0.0, 0
    for t, q in enumerate(p_teacher):
        for s, log_p in enumerate(log_p_student):
            if s == t:  # a crop is not compared with itself
                continue
            total = total + (-q * log_p).sum(dim=-1).mean()
            terms += 1
    return total / terms


# ----------------------------------------------------------------------------- training

def cosine_schedule(step, total_steps, base, final, warmup_steps=0, start=0.0):
    """DINO's cosine_scheduler at one step: np.linspace(start, base, warmup) during the warmup, then
    final + (base - final) (1 + cos(pi i / (total - warmup))) / 2 (optim.warmup_cosine with the endpoint)."""
    return optim.warmup_cosine(step, total_steps, warmup_steps, base, final, start, endpoint=True)


def teacher_temperature(epoch, args):
    """np.linspace(warm-up temperature, temperature, warm-up epochs) per epoch, then the temperature."""
    n = args.warmup_teacher_temp_epochs
    if epoch >= n:
        return args.teacher_temp
    return args.warmup_teacher_temp + (args.teacher_temp - args.warmup_teacher_temp) * epoch / max(1, n - 1)


def build_optimizer(model, args):
    """Two groups (DINO's get_params_groups): weights (the scheduled weight decay) and biases + norms (none)."""
    params = [(n, p) for n, p in model.student.named_parameters() if p.requires_grad]
    groups = [dict(params=[p for n, p in params if not n.endswith(".bias") and p.ndim > 1]),
              dict(params=[p for n, p in params if n.endswith(".bias") or p.ndim <= 1], weight_decay=0.0)]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=args.weight_decay)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=args.momentum, weight_decay=args.weight_decay)
    groups[0]["lars"], groups[1]["lars"] = True, False  # DINO's LARS: 1-D parameters neither decayed nor adapted
    return optim.LARS(groups, lr=0.0, momentum=args.momentum, weight_decay=args.weight_decay, decayed_norm=True)


def clip_gradients(model, clip):
    """DINO's clip_gradients: each parameter's gradient scaled to norm `clip` when above it (not the total)."""
    for p in model.parameters():
        if p.grad is not None:
            coef = clip / (torch.linalg.vector_norm(p.grad) + 1e-6)
            p.grad.mul_(torch.clamp(coef, max=1.0))


def train(args, runtime):
    if args.local_crops < 0:
        raise ValueError(f"--local-crops must be 0 or more, got {args.local_crops}.")
    if not (0 < args.student_temp and 0 < args.teacher_temp and 0 < args.warmup_teacher_temp):
        raise ValueError("--student-temp, --teacher-temp and --warmup-teacher-temp must be positive.")
    if args.warmup_teacher_temp_epochs > args.epochs:
        raise ValueError(f"--warmup-teacher-temp-epochs {args.warmup_teacher_temp_epochs} is longer than --epochs "
                         f"{args.epochs}.")
    n_crops = 2 + args.local_crops
    views_recipe = view_recipe(args)
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("dino", args, runtime)
    loader = run.loader(None, views_recipe)
    model, core = run.wrap(DINO(args), sync_bn=args.sync_bn)
    optimizer, scaler = build_optimizer(core, args), run.grad_scaler()
    run.resume(core, optimizer, scaler)  # the model's state includes the teacher and the centre

    # ---- the method: edit here
    peak_lr = optim.scaled_lr(args.lr, run.global_batch)
    warmup_steps = round(args.warmup_epochs * run.steps_per_epoch)
    frozen_steps = round(args.freeze_last_layer * run.steps_per_epoch)
    run.start(f"{n_crops} crops, {args.optimizer}, peak lr {peak_lr:.4g}, teacher temperature "
              f"{args.warmup_teacher_temp} -> {args.teacher_temp}, ops backend {ops.backend(run.device)}")
    model.train()
    for epoch in run.epochs():
        temperature = teacher_temperature(epoch, args)
        for crops, indices in run.batches(loader):
            lr = cosine_schedule(run.step, run.total_steps, peak_lr, args.min_lr, warmup_steps)
            wd = cosine_schedule(run.step, run.total_steps, args.weight_decay, args.weight_decay_end)
            optim.set_lr(optimizer, lr)
            optimizer.param_groups[0]["weight_decay"] = wd  # only the weights are decayed
            with run.autocast():
                student_out, teacher_out = model(crops)
            loss = dino_loss(student_out, teacher_out, core.center, n_crops, args.student_temp, temperature)
            mean_loss = run.sync(loss)
            optimizer.zero_grad(set_to_none=True)
            if run.finite_loss(mean_loss, lr, crops):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                if args.clip_grad:
                    clip_gradients(core.student, args.clip_grad)
                if run.step < frozen_steps:  # the last layer learns only after --freeze-last-layer epochs
                    for p in core.student.head.last_layer.parameters():
                        p.grad = None
                if run.finite_grads(core, mean_loss, lr, scaler, crops):
                    scaler.step(optimizer)
                    core.update_center(teacher_out, args.center_momentum)
                    core.update_teacher(cosine_schedule(run.step, run.total_steps, args.momentum_teacher, 1.0))
                scaler.update()
            run.log(loss=mean_loss.item(), lr=lr, wd=wd, teacher_temp=temperature)
    return run.finish()


def main(argv=None):
    return launch(train, Args, PRESETS, __doc__, argv)


if __name__ == "__main__":
    cli.run(main)

"""Backbones: torchvision classification models as trunks, the CIFAR stem, and feature taps.

`--arch` takes any torchvision ResNet (resnet*, wide_resnet*, resnext*), RegNet (regnet_x_*,
regnet_y_*), ConvNeXt (convnext_*) or Vision Transformer (vit_b_16, vit_b_32, vit_l_16, vit_l_32,
vit_h_14), plus `vit_ti_16` and `vit_s_16`, which torchvision lacks: torchvision's
VisionTransformer with DINO's sizes (ViT-Ti/16: width 192, 12 layers, 3 heads, MLP 768; ViT-S/16:
width 384, 12 layers, 6 heads, MLP 1536; 16-px patches, position embeddings for 224 px).

A trunk is the torchvision model without its last Linear layer, under torchvision's parameter
names; `trunk(x)` is the pooled feature [B, trunk.feature_dim]:

    ResNet, RegNet   the last stage, global-average-pooled (`fc` is an identity)
    ConvNeXt         avgpool, then the classifier's LayerNorm2d and Flatten (`classifier.2` is an identity)
    ViT              the class token after the final LayerNorm `encoder.ln` (`heads` is an identity)

Every trunk also has `.arch`, `.cifar_stem` and `.feature_dim`. The CIFAR stem (a 3x3 stride-1
`conv1`, no max-pool) exists for ResNets only; asking another family for it is an error, and
`zero_init_residual` (torchvision's ResNet option) leaves other families as torchvision builds them.
Initialisation is torchvision's: for a seed, a trunk starts from the weights
`torchvision.models.<arch>()` would draw (ConvNeXt keeps torchvision's stochastic depth, 0.1 for
convnext_tiny). A ViT trunk takes images of any size whose sides are multiples of its patch size
(224 px, multi-crop's 96 px, CIFAR's 32 px): its position embeddings are resized to the image's
patch grid as DINO does (`interpolate_pos_embedding`).

`trunk_state_dict` adds back an all-zero classifier (`fc` for ResNet and RegNet, `classifier.2`
for ConvNeXt, `heads.head` for ViT) so that `torchvision.models.<arch>().load_state_dict(ckpt["trunk"])`
loads strictly (ImageNet stem); CIFAR-stem trunks load into `build_trunk(arch, True)`, and
vit_ti_16 / vit_s_16 into `torchvision.models.VisionTransformer` with the sizes above
(`vit_config(arch)`, 1000 classes).

Feature taps (`features`, and common/features.py's `taps` for the eval scripts' `--layers`),
each [B, dim]:

    ResNet    conv1 (after the max-pool), res2..res5 (global-average-pooled), pooled (= res5)
    RegNet    stem, stage1..stage4 (global-average-pooled), pooled (= stage4)
    ConvNeXt  stem, stage1..stage4 (global-average-pooled, before any norm), pooled (= trunk(x))
    ViT       cls (= pooled = trunk(x)); patch_mean, the mean of the patch tokens after the final
              LayerNorm; cls_last4, DINO's linear-probe feature for ViT-S (eval_linear.py
              --n_last_blocks 4): the class tokens of the last 4 blocks' outputs, each through the
              final LayerNorm, concatenated (4 x width); cls_avgpool, DINO's feature for ViT-B
              (--n_last_blocks 1 --avgpool_patchtokens true): cls and patch_mean interleaved as
              DINO's reshape leaves them (2 x width)
"""
import functools
import math

import torch
import torch.nn as nn
import torchvision

TAPS = ("conv1", "res2", "res3", "res4", "res5", "pooled")  # ResNet
FAMILY_TAPS = {
    "resnet": TAPS,
    "regnet": ("stem", "stage1", "stage2", "stage3", "stage4", "pooled"),
    "convnext": ("stem", "stage1", "stage2", "stage3", "stage4", "pooled"),
    "vit": ("cls", "patch_mean", "cls_last4", "cls_avgpool", "pooled"),
}
# the classifier each family's trunk drops, and trunk_state_dict adds back as zeros
CLASSIFIER = {"resnet": "fc", "regnet": "fc", "convnext": "classifier.2", "vit": "heads.head"}
PREFIXES = {"resnet": ("resnet", "wide_resnet", "resnext"), "regnet": ("regnet_",), "convnext": ("convnext_",),
            "vit": ("vit_",)}
# ViTs torchvision lacks, with DINO's sizes (vision_transformer.py's vit_tiny / vit_small, patch 16)
DINO_VITS = {"vit_ti_16": dict(num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768),
             "vit_s_16": dict(num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)}


def all_taps():
    """Every family's taps, in order, each once."""
    return list(dict.fromkeys(name for taps in FAMILY_TAPS.values() for name in taps))


def _torchvision_names():
    return torchvision.models.list_models(module=torchvision.models)


def resnet_names():
    return arch_names("resnet")


def arch_names(family=None):
    """Every `--arch` choice (of one family if given), sorted."""
    names = set(_torchvision_names()) | set(DINO_VITS)
    families = [family] if family else list(PREFIXES)
    return sorted(n for n in names if any(n.startswith(PREFIXES[f]) for f in families))


def family_of(arch):
    """'resnet', 'regnet', 'convnext' or 'vit' for an --arch name or a trunk (DDP-wrapped or not)."""
    if not isinstance(arch, str):
        trunk = getattr(arch, "module", arch)
        kinds = {"resnet": torchvision.models.ResNet, "regnet": torchvision.models.RegNet,
                 "convnext": torchvision.models.ConvNeXt, "vit": torchvision.models.VisionTransformer}
        return next((f for f, kind in kinds.items() if isinstance(trunk, kind)), None) or \
            family_of(getattr(trunk, "arch", ""))
    return next((f for f, prefixes in PREFIXES.items() if arch.startswith(prefixes)), None)


class _MetaTensors(torch.overrides.TorchFunctionMode):
    """New tensors without a device are made on "meta" (no memory, no random draws), except torch.arange and
    torch.tensor, with which RegNet's constructor computes its widths."""

    FACTORIES = {torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.eye, torch.rand,
                 torch.randn}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def meta_trunk(arch):
    """`build_trunk(arch)` on meta tensors: its names and shapes, without memory or a random draw."""
    with torch.random.fork_rng(devices=[]), _MetaTensors():
        return build_trunk(arch)


@functools.lru_cache(maxsize=None)
def trunk_shapes(arch):
    """{name: shape} of `build_trunk(arch)`'s state dict (from `meta_trunk`, once per architecture)."""
    return {k: v.shape for k, v in meta_trunk(arch).state_dict().items()}


@functools.lru_cache(maxsize=None)
def vit_config(arch):
    """The keyword arguments of torchvision.models.VisionTransformer that build `arch` (1000 classes)."""
    if arch in DINO_VITS:
        return dict(image_size=224, patch_size=16, **DINO_VITS[arch])
    with torch.random.fork_rng(devices=[]), _MetaTensors():  # only to read torchvision's sizes
        model = torchvision.models.get_model(arch, weights=None)
    return dict(image_size=model.image_size, patch_size=model.patch_size, num_layers=len(model.encoder.layers),
                num_heads=model.encoder.layers[0].num_heads, hidden_dim=model.hidden_dim, mlp_dim=model.mlp_dim,
                dropout=model.dropout, attention_dropout=model.attention_dropout,
                representation_size=model.representation_size, norm_layer=model.norm_layer)


def interpolate_pos_embedding(pos_embedding, grid):
    """Position embeddings [1, 1 + n*n, D] for a patch grid (rows, columns): DINO's interpolate_pos_encoding.

    The class token's embedding is kept; the patch embeddings, laid out as the square n x n grid
    they were made for, are resized bicubically (align_corners=False, no antialiasing) with the
    scale factors (rows + 0.1) / n and (columns + 0.1) / n, as DINO's vision_transformer.py does
    (the 0.1 keeps floor(n * scale) from falling one short), and flattened back row by row.
    The grid they were made for is returned unchanged (DINO: same patch count and a square image).
    One difference: DINO floors the grid of images whose sides are not multiples of the patch
    size; `VisionTransformerTrunk` refuses them instead.
    """
    n = math.isqrt(pos_embedding.shape[1] - 1)
    rows, cols = grid
    if (rows, cols) == (n, n):
        return pos_embedding
    dim = pos_embedding.shape[-1]
    patch = pos_embedding[:, 1:].reshape(1, n, n, dim).permute(0, 3, 1, 2)
    patch = nn.functional.interpolate(patch, scale_factor=((rows + 0.1) / n, (cols + 0.1) / n), mode="bicubic")
    if tuple(patch.shape[-2:]) != (rows, cols):
        raise ValueError(f"interpolating the {n}x{n} position embeddings gave {tuple(patch.shape[-2:])}, "
                         f"not the {rows}x{cols} patch grid.")
    return torch.cat([pos_embedding[:, :1], patch.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)


class VisionTransformerTrunk(torchvision.models.VisionTransformer):
    """torchvision's VisionTransformer without `heads`, for images of any size that its patches tile.

    Parameter names are torchvision's (conv_proj, class_token, encoder.pos_embedding,
    encoder.layers.encoder_layer_<i>, encoder.ln). torchvision's forward asserts the image size
    it was built for; this one resizes the position embeddings to the image's patch grid.
    """

    def __init__(self, **config):
        super().__init__(**config)
        self.heads = nn.Identity()

    def tokens(self, images):
        """[B, 1 + rows*cols, D]: the class token and the patch embeddings, plus position embeddings."""
        n, _, h, w = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"{getattr(self, 'arch', 'the ViT')} needs images whose sides are multiples of its "
                             f"{p}-px patches, got {h}x{w}.")
        x = self.conv_proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.encoder.dropout(x + interpolate_pos_embedding(self.encoder.pos_embedding, (h // p, w // p)))

    def last_blocks(self, images, n=1):
        """The last `n` encoder layers' outputs, each through the final LayerNorm (DINO's get_intermediate_layers)."""
        x, out = self.tokens(images), []
        layers = list(self.encoder.layers)
        for i, layer in enumerate(layers):
            x = layer(x)
            if i >= len(layers) - n:
                out.append(self.encoder.ln(x))
        return out

    def forward(self, images):
        return self.encoder.ln(self.encoder.layers(self.tokens(images)))[:, 0]


def build_trunk(arch, cifar_stem=False, zero_init_residual=False):
    """A torchvision model without its classifier (module docstring).

    ResNets only: `cifar_stem` makes conv1 3x3 with stride 1 and drops the max-pool (another family
    refuses it); `zero_init_residual` zeroes each residual branch's last BatchNorm (torchvision's
    option; other families ignore it and keep torchvision's initialisation).
    """
    family = family_of(arch) if isinstance(arch, str) else None
    if family is None or arch not in arch_names(family):
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(arch_names())}.")
    if family != "resnet" and cifar_stem:
        raise ValueError(f"--cifar-stem exists for ResNets only, not {arch} (after --preset cifar, add "
                         f"--no-cifar-stem).")
    if family == "resnet":
        trunk = torchvision.models.get_model(arch, weights=None, zero_init_residual=zero_init_residual)
        trunk.feature_dim = trunk.fc.in_features
        trunk.fc = nn.Identity()
        if cifar_stem:  # He et al. 2016 / SimCLR's CIFAR variant: keep 32x32 resolution in the stem
            trunk.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            trunk.maxpool = nn.Identity()
    elif family == "regnet":
        trunk = torchvision.models.get_model(arch, weights=None)
        trunk.feature_dim = trunk.fc.in_features
        trunk.fc = nn.Identity()
    elif family == "convnext":
        trunk = torchvision.models.get_model(arch, weights=None)
        trunk.feature_dim = trunk.classifier[2].in_features
        trunk.classifier[2] = nn.Identity()
    else:
        trunk = VisionTransformerTrunk(**vit_config(arch))
        trunk.feature_dim = trunk.hidden_dim
    trunk.arch, trunk.cifar_stem = arch, cifar_stem
    return trunk


def trunk_state_dict(trunk):
    """The trunk's weights under plain torchvision names, with a zero classifier for strict loading."""
    trunk = getattr(trunk, "module", trunk)
    state = {k: v.detach().cpu().clone() for k, v in trunk.state_dict().items()}
    classifier = CLASSIFIER[family_of(trunk)]
    state[f"{classifier}.weight"] = torch.zeros(1000, trunk.feature_dim)
    state[f"{classifier}.bias"] = torch.zeros(1000)
    return state


def load_trunk_state(trunk, state):
    """Load a `trunk_state_dict` back (the zero classifier is dropped); raises ValueError if it does not fit."""
    classifier = CLASSIFIER[family_of(trunk)] + "."
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    own = trunk.state_dict()
    problems = [f"{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                for k, v in state.items() if k in own and v.shape != own[k].shape]
    if not problems:
        result = trunk.load_state_dict(state, strict=False)
        problems = [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    if problems:
        raise ValueError(f"the checkpoint's trunk does not fit {trunk.arch}: {', '.join(problems[:5])}"
                         + (" ..." if len(problems) > 5 else "") + ".")


def _pool(x):
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def features(trunk, images, layers=("pooled",)):
    """Features of `images` at the requested taps (module docstring), each flattened to [B, dim].

    conv1/res2..res5 (and the other families' stages) are global-average-pooled feature maps;
    `pooled` equals trunk(images). VISSL's larger pooling tables for linear probes come with
    common/features.py.
    """
    trunk = getattr(trunk, "module", trunk)
    family = family_of(trunk)
    valid = FAMILY_TAPS[family]
    unknown = [name for name in layers if name not in valid]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown} for {getattr(trunk, 'arch', family)}; choose from "
                         f"{', '.join(valid)}.")
    if family == "vit":
        return _vit_features(trunk, images, layers)
    order = _STAGE_NAMES[family]
    maps = _stage_maps(trunk, images, max(order.index(order[-1] if name == "pooled" else name) for name in layers))
    out = {name: _pool(maps[name]) for name in layers if name != "pooled"}
    if "pooled" in layers:
        last = maps[order[-1]]
        out["pooled"] = trunk.classifier(trunk.avgpool(last)) if family == "convnext" else _pool(last)
    return {name: out[name] for name in layers}


_STAGE_NAMES = {"resnet": ("conv1", "res2", "res3", "res4", "res5"), "regnet": FAMILY_TAPS["regnet"][:5],
                "convnext": FAMILY_TAPS["convnext"][:5]}


def _stage_maps(trunk, images, deepest):
    """{stage name: [B, C, h, w]} of a ConvNet trunk's stem and stages, up to the stage numbered `deepest`."""
    family = family_of(trunk)
    if family == "resnet":
        stem, stages = (lambda x: trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))), \
            (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)
    elif family == "regnet":
        stem, stages = trunk.stem, tuple(trunk.trunk_output)
    else:  # convnext: features = [stem, stage 1, downsample, stage 2, downsample, stage 3, downsample, stage 4]
        blocks = list(trunk.features)
        stem, stages = blocks[0], (blocks[1], nn.Sequential(*blocks[2:4]), nn.Sequential(*blocks[4:6]),
                                   nn.Sequential(*blocks[6:8]))
    order = _STAGE_NAMES[family]
    x = stem(images)
    maps = {order[0]: x}
    for name, stage in zip(order[1:deepest + 1], stages):
        x = maps[name] = stage(x)
    return maps


def feature_maps(trunk, images):
    """Three feature maps [B, C, h, w] for dense heads, finest first: a ConvNet's last three stages (ResNet
    res3-res5, RegNet and ConvNeXt stage2-stage4); a ViT's patch tokens on the patch grid after a third, two
    thirds and all of its blocks, each through the final LayerNorm."""
    trunk = getattr(trunk, "module", trunk)
    if family_of(trunk) != "vit":
        maps = _stage_maps(trunk, images, 4)
        return [maps[name] for name in _STAGE_NAMES[family_of(trunk)][2:]]
    rows, cols = images.shape[-2] // trunk.patch_size, images.shape[-1] // trunk.patch_size
    x, out = trunk.tokens(images), []
    layers = list(trunk.encoder.layers)
    picks = {len(layers) // 3 - 1, 2 * len(layers) // 3 - 1, len(layers) - 1}
    for i, layer in enumerate(layers):
        x = layer(x)
        if i in picks:
            patches = trunk.encoder.ln(x)[:, 1:]
            out.append(patches.transpose(1, 2).reshape(len(x), -1, rows, cols))
    return out


def _vit_features(trunk, images, layers):
    n = 4 if "cls_last4" in layers else 1
    blocks = trunk.last_blocks(images, n)
    last = blocks[-1]
    out = {}
    for name in layers:
        if name in ("cls", "pooled"):
            out[name] = last[:, 0]
        elif name == "patch_mean":
            out[name] = last[:, 1:].mean(dim=1)
        elif name == "cls_last4":
            out[name] = torch.cat([x[:, 0] for x in blocks], dim=-1)
        else:  # cls_avgpool: DINO's torch.cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), -1).reshape(B, -1)
            out[name] = torch.stack([last[:, 0], last[:, 1:].mean(dim=1)], dim=-1).flatten(1)
    return out


def mlp(dims, batch_norm=True, last_bn=False):
    """Linear-BN-ReLU blocks between `dims` (SimCLR/MoCo v2 heads), the last one linear."""
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(d_in, d_out, bias=not (batch_norm and (not last or last_bn))))
        if batch_norm and (not last or last_bn):
            layers.append(nn.BatchNorm1d(d_out))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)

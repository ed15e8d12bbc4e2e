"""Backbones: torchvision ResNets as trunks, the CIFAR stem, and feature taps.

A trunk is a torchvision ResNet whose `fc` is an identity, so `trunk(x)` is the pooled
res5 feature and its parameter names are torchvision's. `trunk_state_dict` adds back
an all-zero `fc` so `torchvision.models.<arch>().load_state_dict(ckpt["trunk"])`
loads strictly (ImageNet stem); CIFAR-stem trunks load into `build_trunk(arch, True)`.
"""
import torch
import torch.nn as nn
import torchvision

TAPS = ("conv1", "res2", "res3", "res4", "res5", "pooled")


def resnet_names():
    return sorted(n for n in torchvision.models.list_models(module=torchvision.models)
                  if n.startswith(("resnet", "wide_resnet", "resnext")))


def build_trunk(arch, cifar_stem=False, zero_init_residual=False):
    """A torchvision ResNet without its classifier; `cifar_stem` uses a 3x3 stride-1 conv1, no max-pool."""
    if arch not in resnet_names():
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(resnet_names())}.")
    trunk = torchvision.models.get_model(arch, weights=None, zero_init_residual=zero_init_residual)
    trunk.feature_dim = trunk.fc.in_features
    trunk.fc = nn.Identity()
    if cifar_stem:  # He et al. 2016 / SimCLR's CIFAR variant: keep 32x32 resolution in the stem
        trunk.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        trunk.maxpool = nn.Identity()
    trunk.arch, trunk.cifar_stem = arch, cifar_stem
    return trunk


def trunk_state_dict(trunk):
    """The trunk's weights under plain torchvision names, with a zero `fc` for strict loading."""
    trunk = getattr(trunk, "module", trunk)
    state = {k: v.detach().cpu().clone() for k, v in trunk.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, trunk.feature_dim)
    state["fc.bias"] = torch.zeros(1000)
    return state


def load_trunk_state(trunk, state):
    """Load a `trunk_state_dict` back (the zero fc is dropped); raises ValueError if it does not fit."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = trunk.state_dict()
    problems = [f"{k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
                for k, v in state.items() if k in own and v.shape != own[k].shape]
    if not problems:
        result = trunk.load_state_dict(state, strict=False)
        problems = [f"missing {k}" for k in result.missing_keys] + [f"unexpected {k}" for k in result.unexpected_keys]
    if problems:
        raise ValueError(f"the checkpoint's trunk does not fit {trunk.arch}: {', '.join(problems[:5])}"
                         + (" ..." if len(problems) > 5 else "") + ".")


def features(trunk, images, layers=("pooled",)):
    """Features of `images` at the requested taps, each flattened to [B, dim].

    conv1/res2..res5 are global-average-pooled feature maps (the pooled res5 equals
    trunk(images)); VISSL's larger pooling tables for linear probes come with eval_linear.
    """
    unknown = [name for name in layers if name not in TAPS]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; choose from {', '.join(TAPS)}.")
    trunk = getattr(trunk, "module", trunk)
    order = ("conv1", "res2", "res3", "res4", "res5")
    deepest = max(order.index("res5" if name == "pooled" else name) for name in layers)
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(images))))
    stages = {"conv1": x}
    for name, stage in zip(order[1:deepest + 1], (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)):
        x = stages[name] = stage(x)
    return {name: torch.flatten(nn.functional.adaptive_avg_pool2d(stages["res5" if name == "pooled" else name], 1), 1)
            for name in layers}


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

"""Trunk weights out of any checkpoint: ours, torchvision, VISSL, MoCo, SwAV, DeepCluster-v2, DINO.

Every public SSL checkpoint stores a torchvision-style trunk (a ResNet, or another family of
common/models.py) under some nesting and some key prefix; DINO's ViTs use timm's names, which
are renamed to torchvision's (`dino_vit_to_torchvision`). `trunk_state(ckpt)` finds the nested
state dict (or follows `--state-dict-key`, a dotted path as VISSL's WEIGHTS_INIT.STATE_DICT_KEY_NAME),
strips `--remove-prefix` and adds `--append-prefix` (VISSL's REMOVE_PREFIX / APPEND_PREFIX),
and otherwise detects the prefix as the one in front of the most torchvision trunk
names (`module.encoder_q.`, `module.`, `backbone.`, `_feature_blocks.`, ...).
Where it looks, in order:

    ours                {"trunk": ..., "method": ...}
    VISSL               {"classy_state_dict": {"base_model": {"model": {"trunk": {"_feature_blocks.conv1.weight"}}}}}
    DINO (full)         {"teacher": {"backbone.conv1.weight", "head.mlp..."}, "student": {"module.backbone..."}}
    MoCo / SwAV / DC-v2 {"state_dict": {"module.encoder_q.conv1.weight" | "module.conv1.weight", ...}}
    other               {"model": {...}} or a plain state dict (torchvision, DINO's released backbone)

`family_of_state(state)` tells the family from the names and `infer_arch(state, candidates)`
the first architecture whose tensors all match. `load_into(trunk, state)` loads it strictly and
reports missing and unexpected keys; a trunk that does not load is refused with one sentence.
"""
import collections
import re

import torch

from common.checkpoint import CheckpointError

# Where public checkpoints nest their weights, tried in this order when no key is given.
NESTINGS = (("trunk",), ("classy_state_dict", "base_model", "model", "trunk"), ("teacher",),
            ("state_dict",), ("model",), ("module",))
MOMENTUM_COPIES = ("encoder_k", "momentum", "target", "student")
IGNORED_MISSING = ("num_batches_tracked",)  # old checkpoints predate this BatchNorm buffer


def _is_state_dict(obj):
    return isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())


def _flatten(tree, prefix=""):
    """VISSL nests trunk/heads dicts; flatten {a: {b: t}} to {"a.b": t}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value
    return flat


def find_state_dict(ckpt, state_dict_key=None):
    """(flat state dict of tensors, where it was found) inside a loaded checkpoint object."""
    if state_dict_key:
        node = ckpt
        for part in state_dict_key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise CheckpointError(f"--state-dict-key {state_dict_key}: the checkpoint has no {part!r} there "
                                      f"(keys: {', '.join(list(node)[:8]) if isinstance(node, dict) else type(node).__name__}).")
            node = node[part]
        if not isinstance(node, dict):
            raise CheckpointError(f"--state-dict-key {state_dict_key} leads to a {type(node).__name__}, not a state dict.")
        return _flatten(node), state_dict_key
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"the checkpoint is a {type(ckpt).__name__}, not a dict of weights.")
    if _is_state_dict(ckpt):
        return ckpt, "top level"
    for path in NESTINGS:
        node = ckpt
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and _flatten(node):
            return _flatten(node), ".".join(path)
    flat = _flatten(ckpt)
    if not flat:
        raise CheckpointError(f"the checkpoint holds no tensors (top-level keys: {', '.join(list(ckpt)[:8])}).")
    return flat, "top level (flattened)"


def detect_prefix(state, trunk_names):
    """The key prefix in front of the most trunk parameter names ('' for plain torchvision)."""
    counts = collections.Counter()
    for key in state:
        for name in trunk_names:
            if key.endswith(name) and (len(key) == len(name) or key[-len(name) - 1] == "."):
                counts[key[:-len(name)]] += 1
                break
    if not counts:
        return ""
    best = max(counts.values())
    tied = [p for p, c in counts.items() if c == best]  # MoCo's encoder_q/encoder_k tie: take the query encoder
    return next((p for p in tied if not any(m in p for m in MOMENTUM_COPIES)), tied[0])


def trunk_state(ckpt, trunk_names, state_dict_key=None, remove_prefix=None, append_prefix=None):
    """({torchvision name: tensor}, description) of the trunk weights inside a checkpoint object."""
    state, where = find_state_dict(ckpt, state_dict_key)
    if remove_prefix:
        state = {k[len(remove_prefix):] if k.startswith(remove_prefix) else k: v for k, v in state.items()}
    if append_prefix:
        state = {append_prefix + k: v for k, v in state.items()}
    prefix = detect_prefix(state, trunk_names)
    selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    where = f"{where}, prefix {prefix!r}" if prefix else where
    if "cls_token" in selected and "pos_embed" in selected:
        selected, where = dino_vit_to_torchvision(selected), f"{where}, DINO ViT names"
    return selected, where


# DINO's vision_transformer.py (timm's names) -> torchvision's VisionTransformer; same tensors, same layout
# (qkv is [q; k; v] as MultiheadAttention's in_proj, each split into heads the same way).
_DINO_VIT = (("cls_token", "class_token"), ("pos_embed", "encoder.pos_embedding"),
             ("patch_embed.proj.", "conv_proj."), ("norm.", "encoder.ln."), ("head.", "heads.head."))
_DINO_BLOCK = (("norm1.", "ln_1."), ("attn.qkv.weight", "self_attention.in_proj_weight"),
               ("attn.qkv.bias", "self_attention.in_proj_bias"), ("attn.proj.", "self_attention.out_proj."),
               ("norm2.", "ln_2."), ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.3."))


def dino_vit_names(depth):
    """The parameter names of a DINO (timm-style) ViT of `depth` blocks."""
    block = [f"blocks.{i}.{part}{leaf}" for i in range(depth) for part in ("norm1.", "attn.proj.", "norm2.", "mlp.fc1.",
                                                                             "mlp.fc2.") for leaf in ("weight", "bias")]
    return ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            *block, *(f"blocks.{i}.attn.qkv.{leaf}" for i in range(depth) for leaf in ("weight", "bias"))]


def dino_vit_to_torchvision(state):
    """Rename a DINO ViT's weights to torchvision's VisionTransformer names (other keys are kept as they are)."""
    out = {}
    for key, value in state.items():
        new = key
        match = re.match(r"blocks\.(\d+)\.(.*)$", key)
        if match:
            index, rest = match.groups()
            for old, renamed in _DINO_BLOCK:
                if rest.startswith(old):
                    new = f"encoder.layers.encoder_layer_{index}.{renamed}{rest[len(old):]}"
                    break
        else:
            for old, renamed in _DINO_VIT:
                if key == old or (old.endswith(".") and key.startswith(old)):
                    new = renamed + key[len(old):]
                    break
        out[new] = value
    return out


def load_into(trunk, state, source="the checkpoint"):
    """Load `state` into `trunk`; returns {"missing": [...], "unexpected": [...]} (heads, fc: ignored).

    Raises CheckpointError when a trunk parameter is missing or has the wrong shape.
    """
    own = trunk.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = sorted(k for k in state if k not in own)
    fatal = [k for k in missing if not k.endswith(IGNORED_MISSING)]
    if wrong or fatal:
        detail = (f"shape mismatch: {', '.join(wrong[:3])}" if wrong else
                  f"{len(fatal)} of {len(own)} trunk tensors missing, e.g. {', '.join(fatal[:3])}")
        raise CheckpointError(f"the trunk in {source} does not load into {getattr(trunk, 'arch', 'the trunk')} "
                              f"({detail}); check --arch, --state-dict-key and --remove-prefix.")
    trunk.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return {"missing": missing, "unexpected": unexpected}


def family_of_state(state):
    """The trunk family (common/models.py) whose torchvision names a state dict uses; 'resnet' if none."""
    if "class_token" in state or "encoder.pos_embedding" in state:
        return "vit"
    if any(k.startswith("trunk_output.") for k in state):
        return "regnet"
    if any(k.startswith("features.") and k.endswith(".layer_scale") for k in state):
        return "convnext"
    return "resnet"


def infer_arch(state, candidates):
    """The first architecture in `candidates` whose trunk tensors all appear in `state` with equal shapes,
    and none of whose modules has more tensors in `state` (a deeper model of the same widths)."""
    from common import models

    for arch in candidates:
        own = models.trunk_shapes(arch)
        modules = {k.split(".")[0] for k in own}
        classifier = models.CLASSIFIER[models.family_of(arch)] + "."
        body = {k for k in state if k.split(".")[0] in modules and not k.startswith(classifier)
                and not k.endswith(IGNORED_MISSING)}
        own = {k: v for k, v in own.items() if not k.endswith(IGNORED_MISSING)}
        if body <= set(own) and all(k == "conv1.weight" or (k in state and state[k].shape == v)  # stem may vary
                                    for k, v in own.items()):
            return arch
    return None

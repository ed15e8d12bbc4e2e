"""Frozen-trunk features for the eval scripts: load any trunk, extract taps once, cache them.

`load_trunk(weights, arch, cifar_stem, ...)` builds a trunk (common/models.py: a torchvision
ResNet, RegNet, ConvNeXt or ViT) from `random`, one of our training checkpoints (its `trunk`,
arch and stem), or any foreign checkpoint (torchvision, VISSL, MoCo, SwAV, DeepCluster-v2, DINO,
whose ViTs are renamed to torchvision's names; common/foreign.py).
`extract(...)` runs the frozen trunk over a dataset in eval mode (each rank takes a
strided shard; results are gathered in dataset order, so torchrun splits the work).

Taps (`--layers`) of ResNets: `conv1` (after the max-pool), `res2`..`res5` (global average pooled),
`pooled` (= `res5avg`, the trunk's output), `head` (the checkpoint's MLP projection head
on the pooled feature: Linear/BatchNorm1d/ReLU stacks saved as `head.`, `projection_head.`
or `projector.`, as our scripts and SwAV / DeepCluster-v2 save them), and `vissl-conv1`..`vissl-res5`: VISSL's
linear-probe pooling table for ResNet-50 at 224 px (LINEAR_EVAL_FEAT_POOL_OPS_MAP:
conv1 AvgPool(10, 10, 4) -> 6x6, res2 AvgPool(16, 8) -> 6x6, res3 AvgPool(13, 5) -> 4x4,
res4 AvgPool(8, 3) -> 3x3, res5 AvgPool(6, 1) -> 2x2, flattened). On feature maps smaller
than VISSL's kernel (small images) the map is adaptively average-pooled to the same grid.
Other families have their own taps (common/models.py's docstring) besides `pooled` and `head`:
RegNet and ConvNeXt `stem`, `stage1`..`stage4`; ViTs `cls`, `patch_mean`, and DINO's linear-probe
features `cls_last4` (ViT-S) and `cls_avgpool` (ViT-B).

`--precise-bn N` (every eval script) first re-estimates every BatchNorm layer's running
statistics on N training images under the eval transform ("precise BN", Wu & Johnson 2021,
"Rethinking 'Batch' in BatchNorm", Sec. 3): a trunk trained on other inputs than the
images it embeds (Jigsaw's tiles, PIRL's patches, another resolution) is then compared
on its weights rather than on stale statistics. Off (0) by default.

Cached features (`--save-features PATH` in every eval script, read back with
`--features PATH`) are one torch.save'd dict:

    {"format": "ssl-features-v1", "layers": [names],
     "train_features": {layer: float32 [N_train, D_layer]}, "train_labels": int64 [N_train] or [N_train, C],
     "test_features":  {layer: float32 [N_test, D_layer]},  "test_labels":  int64 [N_test] or [N_test, C],
     "meta": {"weights", "arch", "image_size", "train_data", "test_data", ...}}

Multi-label targets are N x C in {1, 0, -1} (present, absent, difficult/ignored).
"""
import torch
import torch.nn as nn
import torchvision.transforms as T

from common import checkpoint, dist, foreign, models

FORMAT = "ssl-features-v1"
STAGES = ("conv1", "res2", "res3", "res4", "res5")
# VISSL's LINEAR_EVAL_FEAT_POOL_OPS_MAP for ResNet-50: (kernel, stride, padding) and the grid it gives at 224 px.
VISSL_POOL = {"conv1": ((10, 10, 4), 6), "res2": ((16, 8, 0), 6), "res3": ((13, 5, 0), 4), "res4": ((8, 3, 0), 3),
              "res5": ((6, 1, 0), 2)}
LAYERS = STAGES + ("pooled", "res5avg", "head") + tuple(f"vissl-{s}" for s in STAGES)  # ResNet
HEAD_PREFIXES = ("head.", "projection_head.", "projector.", "module.projection_head.", "module.head.")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def eval_transform(image_size, resize_size=None, squash=False):
    """Resize the short side, centre-crop `image_size`, normalise; small images are used as they are.

    squash: VISSL's VOC07 SVM preprocessing, the short side resized, then the whole image to
    image_size x image_size (no crop)."""
    if resize_size is None:
        resize_size = image_size if image_size <= 64 else round(image_size * 256 / 224)
    bicubic = T.InterpolationMode.BICUBIC
    last = T.Resize((image_size, image_size), interpolation=bicubic) if squash else T.CenterCrop(image_size)
    return T.Compose([T.Resize(resize_size, interpolation=bicubic), last, T.ToTensor(), T.Normalize(MEAN, STD)])


def load_trunk(weights, arch=None, cifar_stem=None, state_dict_key=None, remove_prefix=None, append_prefix=None,
               with_head=False):
    """(trunk, info) from 'random', our checkpoint, or any foreign checkpoint (common/foreign.py).

    `arch`/`cifar_stem` default to what our checkpoint records, else to the first architecture
    of the checkpoint's family whose shapes fit (resnet50 first among ResNets) and a 3x3 conv1.
    `info` holds what was loaded, the missing/unexpected keys, and the training crop size when
    the checkpoint knows it.
    """
    info = {"weights": weights}
    if weights == "random":
        trunk = models.build_trunk(arch or "resnet50", bool(cifar_stem))
        return trunk, info
    ckpt = checkpoint.load(weights)
    ours = isinstance(ckpt, dict) and "trunk" in ckpt and "method" in ckpt and not state_dict_key
    if ours:
        if not isinstance(ckpt.get("arch", ""), str) or not isinstance(ckpt.get("cifar_stem", False), bool):
            raise checkpoint.CheckpointError(f"{weights}: its arch / cifar_stem entries are malformed.")
        arch = arch or ckpt.get("arch", "resnet50")
        cifar_stem = ckpt.get("cifar_stem", False) if cifar_stem is None else cifar_stem
        saved_args = ckpt.get("args")
        crops = saved_args.get("crops") if isinstance(saved_args, dict) else None
        if isinstance(crops, str):
            try:
                info["train_crop_size"] = int(crops.split(",")[0].split("x")[1])
            except (IndexError, ValueError):
                pass  # only a default for --image-size
        info["method"] = str(ckpt.get("method"))
    names = _trunk_names()
    state, info["found"] = foreign.trunk_state(ckpt, names, state_dict_key, remove_prefix, append_prefix)
    if cifar_stem is None:
        cifar_stem = "conv1.weight" in state and state["conv1.weight"].shape[-1] == 3
    if not arch:
        candidates = models.arch_names(foreign.family_of_state(state))
        first = ("resnet50", "vit_s_16", "vit_b_16")  # the most common first: the first fit is taken
        candidates = [n for n in first if n in candidates] + [n for n in candidates if n not in first]
        arch = foreign.infer_arch(state, candidates) or candidates[0]
    trunk = models.build_trunk(arch, bool(cifar_stem))
    report = foreign.load_into(trunk, state, weights)
    if with_head:
        trunk.eval_head = load_head(ckpt, weights)
    info.update(arch=arch, missing_keys=report["missing"], unexpected_keys=report["unexpected"])
    return trunk, info


def load_head(ckpt, source):
    """The MLP projection head stored beside the trunk, rebuilt as nn.Sequential (ReLU where an index has no weights)."""
    state, _ = foreign.find_state_dict(ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt)
    for prefix in HEAD_PREFIXES:
        layers = {}
        for key, value in state.items():
            if key.startswith(prefix) and key[len(prefix):].split(".")[0].isdigit():
                index, name = key[len(prefix):].split(".", 1)
                layers.setdefault(int(index), {})[name] = value
        if layers:
            break
    else:
        raise checkpoint.CheckpointError(f"{source} has no MLP head ({', '.join(HEAD_PREFIXES)}) for --layers head.")
    modules = []
    for index in range(max(layers) + 1):
        params = layers.get(index)
        if params is None:
            modules.append(nn.ReLU())
        elif "running_mean" in params:
            modules.append(nn.BatchNorm1d(len(params["running_mean"]), affine="weight" in params))
        elif params.get("weight") is not None and params["weight"].dim() == 2:
            modules.append(nn.Linear(params["weight"].shape[1], params["weight"].shape[0], bias="bias" in params))
        else:
            raise checkpoint.CheckpointError(f"{source}: head layer {index} is neither Linear nor BatchNorm1d.")
        if params is not None:
            modules[-1].load_state_dict(params)
    return nn.Sequential(*modules)


def _trunk_names():
    """Parameter names of one trunk per family (ResNet's first), and DINO's ViT names: what prefix detection counts."""
    names = []
    for arch in ("resnet18", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny", "vit_ti_16"):
        names += [n for n in models.trunk_shapes(arch) if n not in names]
    names += foreign.dino_vit_names(12)
    return [n for n in names if not n.endswith("num_batches_tracked")]


def layer_names(trunk):
    """The `--layers` taps of this trunk's family."""
    family = models.family_of(trunk)
    return LAYERS if family == "resnet" else models.FAMILY_TAPS[family] + ("head",)


def taps(trunk, images, layers=("pooled",)):
    """{layer: [B, dim]} features of `images` at the requested taps (see the module docstring)."""
    trunk = getattr(trunk, "module", trunk)
    valid = layer_names(trunk)
    unknown = [name for name in layers if name not in valid]
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown} for {getattr(trunk, 'arch', 'this trunk')}; choose from "
                         f"{', '.join(valid)}.")
    if "head" in layers and not hasattr(trunk, "eval_head"):
        raise ValueError("--layers head needs a checkpoint with a projection head (not 'random' or a bare trunk).")
    if valid is not LAYERS:  # RegNet, ConvNeXt, ViT: common/models.py's taps, and the head on `pooled`
        wanted = list(dict.fromkeys("pooled" if name == "head" else name for name in layers))
        out = models.features(trunk, images, wanted)
        return {name: trunk.eval_head(out["pooled"]) if name == "head" else out[name] for name in layers}
    stage_of = {name: ("res5" if name in ("pooled", "res5avg", "head") else name.removeprefix("vissl-"))
                for name in layers}
    deepest = max(STAGES.index(s) for s in stage_of.values())
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(images))))
    maps = {"conv1": x}
    for name, stage in zip(STAGES[1:deepest + 1], (trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4)):
        x = maps[name] = stage(x)
    out = {}
    for name in layers:
        fmap = maps[stage_of[name]]
        if name.startswith("vissl-"):
            (kernel, stride, padding), grid = VISSL_POOL[stage_of[name]]
            if min(fmap.shape[-2:]) >= kernel:
                pooled = nn.functional.avg_pool2d(fmap, kernel, stride, padding)
            else:
                pooled = nn.functional.adaptive_avg_pool2d(fmap, grid)
        else:
            pooled = nn.functional.adaptive_avg_pool2d(fmap, 1)
        out[name] = torch.flatten(pooled, 1)
        if name == "head":
            out[name] = trunk.eval_head(out[name])
    return out


def save_features(path, layers, train, test, meta):
    """Write the cache file described in the module docstring; train/test are (features dict, labels)."""
    payload = {"format": FORMAT, "layers": list(layers), "train_features": train[0], "train_labels": train[1],
               "test_features": test[0], "test_labels": test[1], "meta": meta}
    checkpoint.save_atomic(payload, path)


def load_features(path, layers=None):
    """Read a cache file: its format, and that every part has the type and shape the docstring gives.

    A cache file is input like any other: anything that does not fit (a foreign dict, a missing split,
    rows that disagree with the labels, non-finite features, labels out of range) is refused with one
    sentence. Floating-point features are returned as float32 and integer labels as int64.
    """
    payload = checkpoint.load(path)
    if not isinstance(payload, dict) or not isinstance(payload.get("format"), str) or payload["format"] != FORMAT:
        raise checkpoint.CheckpointError(f"{path} is not a features file of this project (written by --save-features).")
    stored = payload.get("layers")
    if not isinstance(stored, (list, tuple)) or not stored or not all(isinstance(n, str) for n in stored):
        raise checkpoint.CheckpointError(f"{path} is damaged: 'layers' is not a non-empty list of layer names.")
    missing = [name for name in (layers or ()) if name not in stored]
    if missing:
        raise checkpoint.CheckpointError(f"{path} has no features for layer(s) {missing}; it holds {list(stored)!r}.")
    if not isinstance(payload.get("meta"), dict):
        raise checkpoint.CheckpointError(f"{path} is damaged: 'meta' is not a dict.")
    out = dict(payload, layers=list(stored))
    widths = {}
    for split in ("train", "test"):
        feats, labels = payload.get(f"{split}_features"), payload.get(f"{split}_labels")
        if not isinstance(feats, dict):
            raise checkpoint.CheckpointError(f"{path} is damaged: '{split}_features' is not a dict of layer -> tensor.")
        labels = _labels_of(labels, f"{path}: '{split}_labels'")
        out[f"{split}_labels"], out[f"{split}_features"] = labels, dict(feats)
        for name in stored:
            x = feats.get(name)
            where = f"{path}: '{split}_features' of layer {name!r}"
            if not _plain_tensor(x) or not x.is_floating_point() or x.dim() != 2 or x.shape[1] < 1:
                raise checkpoint.CheckpointError(f"{where} is {_describe(x)}, not a floating-point [N, D] tensor.")
            if len(x) != len(labels):
                raise checkpoint.CheckpointError(f"{where} has {len(x)} rows but there are {len(labels)} labels.")
            if widths.setdefault(name, x.shape[1]) != x.shape[1]:
                raise checkpoint.CheckpointError(f"{where} is {x.shape[1]}-d but the train features are "
                                                 f"{widths[name]}-d.")
            if not torch.isfinite(x).all():
                raise checkpoint.CheckpointError(f"{where} holds NaN or infinite values.")
            out[f"{split}_features"][name] = x.float()
    train, test = out["train_labels"], out["test_labels"]
    if train.dim() != test.dim() or train.shape[1:] != test.shape[1:]:
        raise checkpoint.CheckpointError(f"{path} is damaged: train labels {tuple(train.shape)} and test labels "
                         f"{tuple(test.shape)} are not both class ids [N] or both N x C with the same C.")
    return out


def _plain_tensor(x):
    return isinstance(x, torch.Tensor) and x.layout == torch.strided and x.device.type == "cpu" and \
        not x.is_quantized and not x.is_complex()


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return "missing" if x is None else f"a {type(x).__name__}"


def _labels_of(labels, where):
    """int64 labels [N] (class ids >= 0) or [N, C] (in {1, 0, -1}), N >= 1, else one sentence."""
    if not _plain_tensor(labels) or labels.is_floating_point() or labels.dtype == torch.bool or \
            labels.dim() not in (1, 2) or len(labels) == 0 or (labels.dim() == 2 and labels.shape[1] == 0):
        raise checkpoint.CheckpointError(f"{where} is {_describe(labels)}, not integer class ids [N] or an N x C "
                                         f"label matrix.")
    labels = labels.long()
    if labels.dim() == 1 and bool((labels < 0).any()):
        raise checkpoint.CheckpointError(f"{where} holds negative class ids.")
    if labels.dim() == 2 and not bool(((labels >= -1) & (labels <= 1)).all()):
        raise checkpoint.CheckpointError(f"{where} holds values outside {{1, 0, -1}}.")
    return labels


def compute_or_load(args, runtime, train_set=None, test_set=None):
    """The features an eval script works on: from `args.features`, else extracted (and saved if asked).

    Returns the cache dict. `args` needs weights, arch, cifar_stem, state_dict_key, remove_prefix,
    append_prefix, layers, image_size, resize_size, precise_bn, batch_size, workers, seed, features,
    save_features.
    """
    if args.precise_bn < 0:
        raise ValueError(f"--precise-bn is a number of training images (0: off), got {args.precise_bn}.")
    if args.features:
        if args.precise_bn:
            raise ValueError("--precise-bn needs the trunk; cached --features were extracted with fixed statistics.")
        return load_features(args.features, args.layers)
    from common import data

    if not args.weights:
        raise ValueError("--weights is required (a checkpoint path, or 'random'), unless --features is given.")
    if train_set is None:
        if not args.train_data:
            raise ValueError("--train-data is required, unless --features is given.")
        train_set = data.build_split(args.train_data, "train")
        test_set = data.build_split(args.test_data or args.train_data, "test")
        for spec, split in ((args.train_data, train_set), (args.test_data or args.train_data, test_set)):
            if any(not isinstance(y, list) and y < 0 for y in data.labels_of(split)):
                raise ValueError(f"{spec} has images without a label; evaluation needs labelled data "
                                 f"(an ImageFolder, or 'path label' lines in a file list).")
    torch.manual_seed(args.seed)
    trunk, info = load_trunk(args.weights, args.arch or None, args.cifar_stem, args.state_dict_key or None,
                             args.remove_prefix or None, args.append_prefix or None, "head" in args.layers)
    image_size = args.image_size or info.get("train_crop_size", 224)
    squash = getattr(args, "squash", False)
    transform = eval_transform(image_size, args.resize_size or None, squash)
    kw = dict(batch_size=args.batch_size, workers=args.workers, device=runtime.device,
              precision=getattr(args, "precision", "auto"))
    if args.precise_bn:
        precise_bn(trunk, train_set, transform, args.precise_bn, seed=args.seed, **kw)
    train = extract(trunk, train_set, args.layers, transform, **kw)
    test = extract(trunk, test_set, args.layers, transform, **kw)
    meta = {"weights": args.weights, "arch": trunk.arch, "cifar_stem": trunk.cifar_stem, "image_size": image_size,
            **({"squash": True} if squash else {}),
            "precise_bn": min(args.precise_bn, len(train_set)),
            "train_data": args.train_data, "test_data": args.test_data or args.train_data,
            "missing_keys": info.get("missing_keys", []), "unexpected_keys": info.get("unexpected_keys", [])}
    if args.save_features and runtime.is_main:
        save_features(args.save_features, args.layers, train, test, meta)
    return {"format": FORMAT, "layers": list(args.layers), "train_features": train[0], "train_labels": train[1],
            "test_features": test[0], "test_labels": test[1], "meta": meta}


class _Images(torch.utils.data.Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return self.transform(image), torch.as_tensor(label), index


@torch.no_grad()
def precise_bn(trunk, dataset, transform, n_images, batch_size=256, workers=4, device="cpu", precision="auto", seed=0):
    """Re-estimate every BatchNorm's running mean and variance on `n_images` of `dataset` (Wu & Johnson 2021).

    The images (a seeded random subset, the same on every rank, so every rank ends with the same
    statistics) pass through the trunk in train mode with momentum None: each layer's running
    statistics become the average of its per-batch statistics. The weights are untouched.
    """
    trunk = getattr(trunk, "module", trunk)
    norms = [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n_images].tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(_Images(dataset, transform), chosen),
                                         batch_size=batch_size, num_workers=workers)
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    trunk.to(device).train()
    try:
        for images, _, _ in loader:
            with dist.autocast(torch.device(device), precision):
                taps(trunk, images.to(device, non_blocking=True), ("pooled",))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        trunk.eval()


@torch.no_grad()
def extract(trunk, dataset, layers, transform, batch_size=256, workers=4, device="cpu", precision="auto"):
    """{layer: [N, dim] float32 features}, labels [N] (or [N, C]): the whole dataset, in order, on every rank."""
    return extract_batches(trunk, _loader(dataset, transform, batch_size, workers, device), len(dataset), layers,
                           device, precision)


def _loader(dataset, transform, batch_size, workers, device):
    """This rank's strided shard of `dataset` as batches of (images, labels, dataset indices)."""
    shard = list(range(dist.rank(), len(dataset), dist.world_size()))
    return torch.utils.data.DataLoader(torch.utils.data.Subset(_Images(dataset, transform), shard),
                                       batch_size=batch_size, num_workers=workers,
                                       pin_memory=torch.device(device).type == "cuda")


def decode(dataset, image_size, batch_size=256, workers=4):
    """This rank's shard of `dataset` under eval_transform(image_size), held as uint8 pixels before the
    float conversion and normalisation: (images [n, 3, H, W] uint8, labels, dataset indices).
    `normalised(images)` gives back exactly eval_transform's tensors (ToTensor is uint8 / 255)."""
    resize_crop = eval_transform(image_size).transforms[:2]
    loader = _loader(dataset, T.Compose(resize_crop + [T.PILToTensor()]), batch_size, workers, "cpu")
    images, labels, indices = map(torch.cat, zip(*loader))
    return images, labels, indices


def normalised(images):
    """uint8 images [N, 3, H, W] -> eval_transform's float tensors (the same bits as ToTensor + Normalize)."""
    return T.Normalize(MEAN, STD)(images.float().div(255))


@torch.no_grad()
def extract_batches(trunk, batches, n, layers, device="cpu", precision="auto"):
    """extract() over given batches of (float images, labels, indices of an `n`-image dataset): this rank's
    shard; the shards are gathered in dataset order on every rank."""
    if precision == "auto":  # bf16 on GPU (the project's default), exact fp32 on CPU
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    trunk = trunk.to(device).eval()
    feats = {name: [] for name in layers}
    labels, indices = [], []
    for images, y, idx in batches:
        with dist.autocast(torch.device(device), precision):
            out = taps(trunk, images.to(device, non_blocking=True), layers)
        for name in layers:
            feats[name].append(out[name].float())
        labels.append(y.to(device))
        indices.append(idx.to(device))
    if dist.world_size() > 1:  # pad shards to equal length, gather, restore dataset order
        n = -(-n // dist.world_size())
        order = _pad(torch.cat(indices), n, -1)
        gathered_order = dist.gather(order)
        keep = gathered_order >= 0
        perm = torch.argsort(gathered_order[keep])
        feats = {name: dist.gather(_pad(torch.cat(f), n, 0))[keep][perm].cpu() for name, f in feats.items()}
        labels = dist.gather(_pad(torch.cat(labels), n, 0))[keep][perm].cpu()
        return feats, labels
    return {name: torch.cat(f).cpu() for name, f in feats.items()}, torch.cat(labels).cpu()


def _pad(t, n, value):
    if len(t) == n:
        return t
    pad = torch.full((n - len(t),) + tuple(t.shape[1:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


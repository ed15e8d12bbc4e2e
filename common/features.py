"""Frozen-trunk features for the eval scripts: load any trunk, extract taps once, cache them.

`load_trunk(weights, arch, cifar_stem)` builds a torchvision ResNet trunk from
`random`, one of our training checkpoints (its `trunk`, arch and stem), or a
torchvision-style state dict. `extract(...)` runs the frozen trunk over a dataset in
eval mode (each rank takes a strided shard; results are gathered in dataset order).
"""
import torch
import torchvision.transforms as T

from common import checkpoint, dist, models

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def eval_transform(image_size, resize_size=None):
    """Resize the short side, centre-crop `image_size`, normalise; small images are used as they are."""
    if resize_size is None:
        resize_size = image_size if image_size <= 64 else round(image_size * 256 / 224)
    return T.Compose([T.Resize(resize_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                      T.ToTensor(), T.Normalize(MEAN, STD)])


def load_trunk(weights, arch=None, cifar_stem=None):
    """(trunk, info) from 'random', our checkpoint, or a plain torchvision state dict.

    `arch`/`cifar_stem` default to what our checkpoint records, else resnet50 / False.
    `info` holds what was loaded, and the training crop size when the checkpoint knows it.
    """
    info = {"weights": weights}
    if weights == "random":
        trunk = models.build_trunk(arch or "resnet50", bool(cifar_stem))
        return trunk, info
    ckpt = checkpoint.load(weights)
    if isinstance(ckpt, dict) and "trunk" in ckpt:  # one of ours
        arch = arch or ckpt.get("arch", "resnet50")
        cifar_stem = ckpt.get("cifar_stem", False) if cifar_stem is None else cifar_stem
        state = ckpt["trunk"]
        crops = (ckpt.get("args") or {}).get("crops")
        if crops:
            info["train_crop_size"] = int(crops.split(",")[0].split("x")[1])
        info["method"] = ckpt.get("method")
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        raise checkpoint.CheckpointError(f"{weights} is neither one of our checkpoints nor a plain state dict.")
    trunk = models.build_trunk(arch or "resnet50", bool(cifar_stem))
    models.load_trunk_state(trunk, state)
    return trunk, info


class _Images(torch.utils.data.Dataset):
    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return self.transform(image), label, index


@torch.no_grad()
def extract(trunk, dataset, layers, transform, batch_size=256, workers=4, device="cpu"):
    """{layer: [N, dim] float32 features}, labels [N]: the whole dataset, in order, on every rank."""
    shard = list(range(dist.rank(), len(dataset), dist.world_size()))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(_Images(dataset, transform), shard),
                                         batch_size=batch_size, num_workers=workers,
                                         pin_memory=torch.device(device).type == "cuda")
    trunk = trunk.to(device).eval()
    feats = {name: [] for name in layers}
    labels, indices = [], []
    for images, y, idx in loader:
        out = models.features(trunk, images.to(device, non_blocking=True), layers)
        for name in layers:
            feats[name].append(out[name].float())
        labels.append(y.to(device))
        indices.append(idx.to(device))
    if dist.world_size() > 1:  # pad shards to equal length, gather, restore dataset order
        n = -(-len(dataset) // dist.world_size())
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


"""Weighted k-nearest-neighbour classification, and the online kNN monitor of the training scripts.

`weighted_knn` is eval_knn.py's protocol (Wu et al. 2018, Sec. 3.4; DINO's k = 20, T = 0.07).
`KnnMonitor` runs it during pretraining (`--eval-every N` epochs): the current trunk's pooled
features of at most `--eval-bank` training images (a class-balanced, seeded subset, centre-cropped
without augmentation) are the bank, and those of at most `--eval-size` labelled held-out images
(`--eval-data`, default the test split of `--data`) are classified, exactly as eval_knn.py would
score a checkpoint of that step on the same images (under torchrun every process scores its share
with rank 0's BatchNorm statistics, those a checkpoint holds). The images are decoded, resized and
cropped once, at the first evaluation, and kept as uint8 pixels (2,000 images at 224 px are 0.3 GB;
above CACHE_BYTES per process they are decoded again at every evaluation), so each later evaluation
is only the trunk's forward passes. It does not change training: the
trunk's modules keep their train/eval modes, BatchNorm statistics are not updated (eval mode) and
each process's own are put back, and the
RNG states (torch, CUDA, Python, NumPy) are restored afterwards, so the losses are the same bits
with the monitor on or off.
"""
import random
import time
from pathlib import Path

import numpy as np
import torch

from common import data, dist, features

CACHE_BYTES = 2 ** 30  # per process: decoded bank and held-out images are kept up to this size


@torch.no_grad()
def weighted_knn(train_features, train_labels, test_features, test_labels, ks, temperature,
                 test_chunk=1024, train_chunk=65536):
    """Top-1/top-5 accuracy (%) for every k in `ks` of the weighted kNN vote.

    Features need not be normalised (they are, here). Labels may be any integers: they
    are mapped to 0..C-1 over the union of train and test labels. Top-5 looks at the
    min(5, k) classes with the most votes, as DINO's knn_classifier: k neighbours vote
    for k classes at most. Every k must be at most the number of training images.
    """
    train_features = torch.nn.functional.normalize(train_features.float(), dim=1)
    test_features = torch.nn.functional.normalize(test_features.float(), dim=1)
    classes, mapped = torch.unique(torch.cat([train_labels, test_labels]), return_inverse=True)
    train_y, test_y = mapped[:len(train_labels)], mapped[len(train_labels):]
    n_classes, max_k = len(classes), max(ks)
    if max_k > len(train_features):
        raise ValueError(f"k={max_k} neighbours asked for, but there are only {len(train_features)} training "
                         f"images.")
    correct = {k: torch.zeros(2, dtype=torch.long) for k in ks}
    for start in range(0, len(test_features), test_chunk):
        queries = test_features[start:start + test_chunk]
        best_sim = torch.full((len(queries), 0), -2.0, device=queries.device)
        best_idx = torch.zeros((len(queries), 0), dtype=torch.long, device=queries.device)
        for t0 in range(0, len(train_features), train_chunk):  # running top-k over training chunks
            sims = queries @ train_features[t0:t0 + train_chunk].t()
            sims, idx = sims.topk(min(max_k, sims.shape[1]), dim=1)
            best_sim, order = torch.cat([best_sim, sims], 1).topk(min(max_k, best_sim.shape[1] + sims.shape[1]), 1)
            best_idx = torch.cat([best_idx, idx + t0], 1).gather(1, order)
        weights = (best_sim / temperature).exp()
        neighbour_labels = train_y[best_idx]
        truth = test_y[start:start + test_chunk]
        for k in ks:
            votes = torch.zeros(len(queries), n_classes, device=queries.device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
            # top-5 counts at most k classes: k neighbours vote for k classes at most (DINO's knn_classifier)
            ranked = votes.topk(min(5, n_classes, k), dim=1).indices
            correct[k][0] += (ranked[:, 0] == truth).sum().cpu()
            correct[k][1] += (ranked == truth[:, None]).any(dim=1).sum().cpu()
    n = len(test_features)
    return {k: {"top1": 100.0 * c[0].item() / n, "top5": 100.0 * c[1].item() / n} for k, c in correct.items()}


# ----------------------------------------------------------------------------- the online monitor

K, TEMPERATURE = 20, 0.07  # eval_knn.py's default (DINO's protocol)
HELD_OUT_BUILTIN = {"cifar10-mini": "cifar10-mini@test", "cifar10": "cifar10@test", "cifar100": "cifar100@test",
                    "fashion-mnist": "fashion-mnist@test"}


def default_held_out(spec):
    """The labelled held-out images that go with training data `spec`, or None: a built-in's test split, a
    folder's `val`/`test` beside its `train` (for --data ROOT or --data ROOT/train)."""
    if spec in HELD_OUT_BUILTIN:
        return HELD_OUT_BUILTIN[spec]
    path = Path(spec)
    if not path.is_dir():
        return None
    for root in ([path] if (path / "train").is_dir() else []) + ([path.parent] if path.name == "train" else []):
        for split in ("val", "test"):
            if (root / split).is_dir():
                return str(root / split)
    return None


def balanced_subset(dataset, n, seed):
    """At most n images of `dataset`, a seeded class-balanced choice (all of them when n >= its size)."""
    if n >= len(dataset):
        return dataset
    labels = np.asarray(data.labels_of(dataset))
    keep = data.fraction_indices(labels, n / len(dataset), seed)
    keep = keep[np.random.default_rng(seed).permutation(len(keep))[:n]] if len(keep) > n else keep
    return torch.utils.data.Subset(dataset, np.sort(keep).tolist())


def _require_labels(dataset, what):
    labels = data.labels_of(dataset)
    if any(isinstance(y, list) or y < 0 for y in labels):
        raise ValueError(f"--eval-every needs single-label images, and {what} has images without one (give "
                         f"--eval-data a labelled set, or --eval-every 0).")


class KnnMonitor:
    """kNN top-1 of a trunk on fixed bank and held-out images (see the module docstring)."""

    def __init__(self, args, train_images, image_size, device, precision):
        spec = args.eval_data or default_held_out(args.data)
        if not spec:
            raise ValueError(f"--eval-every needs labelled held-out images, and --data {args.data} has no test split "
                             f"beside it: pass --eval-data (a folder, a file list or SPEC@SPLIT), or --eval-every 0.")
        if args.eval_bank < 1 or args.eval_size < 1:
            raise ValueError(f"--eval-bank and --eval-size must be positive, got {args.eval_bank} and "
                             f"{args.eval_size}.")
        held_out = data.build_split(spec, "test")
        _require_labels(train_images, f"--data {args.data}")
        _require_labels(held_out, f"--eval-data {spec}")
        self.spec = spec
        self.bank = balanced_subset(train_images, args.eval_bank, args.seed)
        if len(self.bank) < K:
            raise ValueError(f"--eval-every's kNN votes over {K} neighbours, and its bank has {len(self.bank)} "
                             f"training images: pass --eval-bank {K} or more (and train on at least {K} images).")
        self.queries = balanced_subset(held_out, args.eval_size, args.seed)
        self.image_size, self.transform = image_size, features.eval_transform(image_size)
        self.kw = dict(batch_size=min(256, max(args.batch_size, 1)), workers=min(args.workers, 4), device=device,
                       precision=precision)
        pixels = (len(self.bank) + len(self.queries)) / dist.world_size() * 3 * image_size ** 2
        self.decoded = {} if pixels <= CACHE_BYTES else None  # {"bank"/"queries": (uint8 images, labels, indices)}

    def describe(self):
        return f"online kNN (k={K}, T={TEMPERATURE}, {self.image_size} px): {len(self.bank)} training images as " \
               f"the bank, {len(self.queries)} of {self.spec}"

    @torch.no_grad()
    def __call__(self, trunk):
        """{"knn_top1", "knn_top5", "knn_seconds"} of `trunk` now; training state untouched. Every process
        calls it (the images are split among them)."""
        started = time.perf_counter()
        modes = [(m, m.training) for m in trunk.modules()]
        # every process scores with rank 0's BatchNorm statistics (the checkpoint's), then gets its own back
        buffers = [b for b in trunk.buffers() if b.is_floating_point()]
        own = [b.clone() for b in buffers] if dist.world_size() > 1 else []
        for b in buffers if own else []:
            dist.broadcast(b, 0)
        rng = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
               torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        try:
            bank, bank_y = self._features(trunk, "bank")
            queries, query_y = self._features(trunk, "queries")
            device = self.kw["device"]
            result = weighted_knn(bank["pooled"].to(device), bank_y.to(device), queries["pooled"].to(device),
                                  query_y.to(device), (K,), TEMPERATURE)[K]
        finally:
            for m, training in modes:
                m.training = training
            for b, saved in zip(buffers if own else [], own):
                b.copy_(saved)
            torch.set_rng_state(rng[0])
            random.setstate(rng[1])
            np.random.set_state(rng[2])
            if rng[3] is not None:
                torch.cuda.set_rng_state_all(rng[3])
        dist.barrier()
        return {"knn_top1": round(result["top1"], 3), "knn_top5": round(result["top5"], 3),
                "knn_seconds": round(time.perf_counter() - started, 2)}

    def _features(self, trunk, which):
        """Pooled features and labels of the bank or the queries: from the decoded pixels when they are kept."""
        dataset = getattr(self, which)
        if self.decoded is None:
            return features.extract(trunk, dataset, ("pooled",), self.transform, **self.kw)
        if which not in self.decoded:
            self.decoded[which] = features.decode(dataset, self.image_size, self.kw["batch_size"], self.kw["workers"])
        images, labels, indices = self.decoded[which]
        size = self.kw["batch_size"]
        batches = ((features.normalised(images[i:i + size]), labels[i:i + size], indices[i:i + size])
                   for i in range(0, len(images), size))
        return features.extract_batches(trunk, batches, len(dataset), ("pooled",), self.kw["device"],
                                        self.kw["precision"])

"""Weighted k-nearest-neighbour evaluation of a frozen trunk.

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
CVPR 2018 (Sec. 3.4), with DINO's protocol (Caron et al. 2021): features are
L2-normalised, each test image takes its k most cosine-similar training images,
neighbour j votes for its class with weight exp(s_j / T), and the class with the
largest total wins. One top-(max k) search serves every k; test and training
features are processed in chunks, so no full similarity matrix is ever built.

    python eval_knn.py --weights runs/simclr/checkpoint-00012345.pth --train-data /imagenet/train --test-data /imagenet/val
    python eval_knn.py --weights random --arch resnet18 --train-data cifar10-mini
    torchrun --nproc_per_node=8 eval_knn.py --weights ckpt.pth --train-data ... --test-data ...
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import cli, data, dist, features


@dataclass
class Args:
    weights: str = field(default="", metadata={"help": "checkpoint path, or 'random' for a random-init trunk"})
    arch: str = field(default="", metadata={"help": "trunk architecture (default: the checkpoint's, else resnet50)"})
    cifar_stem: bool = field(default=None, metadata={"help": "3x3 stem (default: the checkpoint's)"})
    train_data: str = ""
    test_data: str = field(default="", metadata={"help": "default: the test split of --train-data"})
    layers: tuple[str, ...] = ("pooled",)
    k: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    report_k: int = 20  # the k whose accuracy is the headline top1/top5
    image_size: int = field(default=0, metadata={"help": "centre-crop size (0: the checkpoint's crop size, else 224)"})
    resize_size: int = field(default=0, metadata={"help": "short-side resize (0: image-size, or x256/224 above 64 px)"})
    batch_size: int = 256
    workers: int = 4
    device: str = "auto"
    seed: int = 0  # initialises the trunk for --weights random
    output: str = ""  # also write the JSON result here


@torch.no_grad()
def weighted_knn(train_features, train_labels, test_features, test_labels, ks, temperature,
                 test_chunk=1024, train_chunk=65536):
    """Top-1/top-5 accuracy (%) for every k in `ks` of the weighted kNN vote.

    Features need not be normalised (they are, here). Labels may be any integers: they
    are mapped to 0..C-1 over the union of train and test labels.
    """
    train_features = torch.nn.functional.normalize(train_features.float(), dim=1)
    test_features = torch.nn.functional.normalize(test_features.float(), dim=1)
    classes, mapped = torch.unique(torch.cat([train_labels, test_labels]), return_inverse=True)
    train_y, test_y = mapped[:len(train_labels)], mapped[len(train_labels):]
    n_classes, max_k = len(classes), min(max(ks), len(train_features))
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
            kk = min(k, max_k)
            votes = torch.zeros(len(queries), n_classes, device=queries.device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            ranked = votes.topk(min(5, n_classes), dim=1).indices
            correct[k][0] += (ranked[:, 0] == truth).sum().cpu()
            correct[k][1] += (ranked == truth[:, None]).any(dim=1).sum().cpu()
    n = len(test_features)
    return {k: {"top1": 100.0 * c[0].item() / n, "top5": 100.0 * c[1].item() / n} for k, c in correct.items()}


def main(argv=None):
    args = cli.parse_args(Args, None, argv, description=__doc__.split("\n")[0])
    if not args.weights:
        raise ValueError("--weights is required (a checkpoint path, or 'random').")
    if not args.train_data:
        raise ValueError("--train-data is required.")
    if any(k < 1 for k in args.k) or args.report_k not in args.k:
        raise ValueError(f"--k must be positive and include --report-k {args.report_k}, got {list(args.k)}.")
    runtime = dist.setup(args.device)
    started = time.time()
    try:
        train_set = data.build_dataset(args.train_data, "train")
        test_set = data.build_dataset(args.test_data or args.train_data, "test")
        torch.manual_seed(args.seed)
        trunk, info = features.load_trunk(args.weights, args.arch or None, args.cifar_stem)
        image_size = args.image_size or info.get("train_crop_size", 224)
        transform = features.eval_transform(image_size, args.resize_size or None)
        extract = dict(batch_size=args.batch_size, workers=args.workers, device=runtime.device)
        train_feats, train_labels = features.extract(trunk, train_set, args.layers, transform, **extract)
        test_feats, test_labels = features.extract(trunk, test_set, args.layers, transform, **extract)
        results = {}
        for layer in args.layers:
            results[layer] = weighted_knn(train_feats[layer].to(runtime.device), train_labels.to(runtime.device),
                                          test_feats[layer].to(runtime.device), test_labels.to(runtime.device),
                                          args.k, args.temperature)
        headline = results[args.layers[0]][args.report_k]
        summary = {"top1": round(headline["top1"], 3), "top5": round(headline["top5"], 3), "k": args.report_k,
                   "layer": args.layers[0], "temperature": args.temperature, "weights": args.weights,
                   "arch": trunk.arch, "image_size": image_size, "n_train": len(train_set), "n_test": len(test_set),
                   "per_k": {layer: {str(k): {m: round(v, 3) for m, v in r.items()} for k, r in res.items()}
                             for layer, res in results.items()},
                   "seconds": round(time.time() - started, 1)}
        if runtime.is_main:
            if args.output:
                Path(args.output).parent.mkdir(parents=True, exist_ok=True)
                Path(args.output).write_text(json.dumps(summary) + "\n")
            print(json.dumps(summary), flush=True)
        return summary
    finally:
        dist.cleanup()


if __name__ == "__main__":
    cli.run(main)

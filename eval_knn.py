"""Weighted k-nearest-neighbour evaluation of a frozen trunk.

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
CVPR 2018 (Sec. 3.4), with DINO's protocol (Caron et al. 2021): features are
L2-normalised, each test image takes its k most cosine-similar training images,
neighbour j votes for its class with weight exp(s_j / T), and the class with the
largest total wins. One top-(max k) search serves every k; test and training
features are processed in chunks, so no full similarity matrix is ever built; any test
set size (even 1 image) and any label ids work. Presets: `dino` (k = 20, T = 0.07, the
default), `vissl` and `lightly` (k = 200, T = 0.1).

`--fewshot fixed|variable` runs Meta-Dataset's episodic evaluation (Triantafillou et al.,
ICLR 2020) on the test features instead: fixed 5-way 5-shot 15-query episodes, or its
variable-way / variable-shot sampler; a prototypical classifier (Snell et al. 2017) on
L2-normalised features; mean accuracy +- 1.96 std / sqrt(episodes) over seeded episodes.

    python eval_knn.py --weights runs/simclr/checkpoint-00012345.pth --train-data /imagenet/train --test-data /imagenet/val
    python eval_knn.py --weights random --arch resnet18 --train-data cifar10-mini --save-features f.pth
    python eval_knn.py --features f.pth --preset vissl --layers pooled res4
    python eval_knn.py --features f.pth --fewshot variable --episodes 600
    python eval_knn.py --weights ckpt.pth --train-data cifar10-mini --show-neighbours neighbours.png
    python eval_knn.py --weights ckpt.pth --train-data cifar10-mini --show-clusters clusters.png --clusters 50
    torchrun --nproc_per_node=8 eval_knn.py --weights ckpt.pth --train-data ... --test-data ...
"""
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import checkpoint, cli, data, dist, features, grids, ops
from common.knn import weighted_knn

PRESETS = {"dino": {"k": (10, 20, 100, 200), "report_k": 20, "temperature": 0.07, "_doc": "DINO: k=20, T=0.07"},
           "vissl": {"k": (200,), "report_k": 200, "temperature": 0.1, "_doc": "VISSL: k=200, T=0.1"},
           "lightly": {"k": (200,), "report_k": 200, "temperature": 0.1, "_doc": "lightly: k=200, T=0.1"}}


@dataclass
class Args:
    weights: str = field(default="", metadata={"help": "checkpoint (any format), or 'random' for a random-init trunk"})
    arch: str = field(default="", metadata={"help": "trunk architecture (default: the checkpoint's, else inferred)"})
    cifar_stem: bool = field(default=None, metadata={"help": "3x3 stem (default: the checkpoint's)"})
    state_dict_key: str = field(default="", metadata={"help": "dotted path of the weights inside the checkpoint"})
    remove_prefix: str = ""
    append_prefix: str = ""
    train_data: str = field(default="", metadata={"help": "SPEC or SPEC@SPLIT; default split train"})
    test_data: str = field(default="", metadata={"help": "default: the test split of --train-data"})
    features: str = field(default="", metadata={"help": "cached features file (from --save-features): skip the trunk"})
    save_features: str = ""
    layers: tuple[str, ...] = ("pooled",)
    k: tuple[int, ...] = (10, 20, 100, 200)  # neighbour counts, all from one top-k search
    temperature: float = 0.07  # the votes are exp(cosine similarity / T)
    report_k: int = 20  # the k whose accuracy is the headline top1/top5
    image_size: int = field(default=0, metadata={"help": "centre-crop size (0: the checkpoint's crop size, else 224)"})
    resize_size: int = field(default=0, metadata={"help": "short-side resize (0: image-size, or x256/224 above 64 px)"})
    precise_bn: int = field(default=0, metadata={"help": "re-estimate BatchNorm statistics on this many training "
                                                          "images before extracting (0: the checkpoint's)"})
    batch_size: int = 256  # images per forward pass when extracting
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0  # initialises the trunk for --weights random, and seeds the few-shot episodes
    fewshot: str = field(default="off", metadata={"choices": ["off", "fixed", "variable"]})  # prototype few-shot episodes instead of kNN
    episodes: int = 600  # seeded few-shot episodes (Meta-Dataset protocol)
    way: int = 5  # classes per episode (--fewshot fixed)
    shot: int = 5  # support images per class (--fewshot fixed)
    query: int = 15  # query images per class
    output: str = ""  # also write the JSON result here
    show_neighbours: str = field(default="", metadata={
        "help": "also draw a PNG: --show-queries test images (seeded), each with its --show-k nearest training "
                "images, framed green (same label) or red"})
    show_queries: int = field(default=8, metadata={"help": "test images (rows) in the --show-neighbours grid"})
    show_k: int = field(default=8, metadata={"help": "nearest training images shown for each"})
    show_clusters: str = field(default="", metadata={
        "help": "also draw a PNG of the largest clusters of the training images, one row each: size, label "
                "purity, and the members nearest the cluster's mean feature"})
    clusters: int = field(default=0, metadata={
        "help": "for --show-clusters: spherical k-means of the features into N clusters (0: the checkpoint's own: "
                "ClusterFit's or DeepCluster-v2's pseudo-labels, or SwAV's prototypes with --layers head)"})
    show_rows: int = field(default=8, metadata={"help": "clusters (rows, the largest first) in the --show-clusters grid"})
    show_per_row: int = field(default=8, metadata={"help": "member images shown for each"})


# ---------------------------------------------------------------- Meta-Dataset few-shot episodes
def fixed_episode(labels_by_class, way, shot, query, g):
    """(support idx, support y, query idx, query y) of an N-way K-shot Q-query episode."""
    eligible = [c for c, idx in enumerate(labels_by_class) if len(idx) >= shot + query]
    if len(eligible) < way:
        raise ValueError(f"only {len(eligible)} classes have {shot + query} test images; {way}-way episodes "
                         f"need {way}.")
    chosen = torch.tensor(eligible)[torch.randperm(len(eligible), generator=g)[:way]]
    return _split([labels_by_class[c] for c in chosen.tolist()], [shot] * way, [query] * way, g)


def variable_episode(labels_by_class, g, max_way=50, max_support=500, max_query=10):
    """Meta-Dataset's variable-way variable-shot episode (Triantafillou et al. 2020, Sec. 3.2)."""
    eligible = [c for c, idx in enumerate(labels_by_class) if len(idx) >= 2]
    if len(eligible) < 5:
        raise ValueError(f"variable-way episodes need at least 5 test classes with 2 images, got {len(eligible)}.")
    way = int(torch.randint(5, min(max_way, len(eligible)) + 1, (1,), generator=g))
    chosen = torch.tensor(eligible)[torch.randperm(len(eligible), generator=g)[:way]].tolist()
    sizes = torch.tensor([len(labels_by_class[c]) for c in chosen], dtype=torch.float64)
    query = int(min(max_query, int((0.5 * sizes).floor().min())))
    beta = float(1 - torch.rand((), generator=g, dtype=torch.float64))  # U(0, 1]
    support = int(min(max_support, (beta * (sizes - query).clamp_max(100)).ceil().sum()))
    alpha = torch.empty(way, dtype=torch.float64).uniform_(math.log(0.5), math.log(2), generator=g)
    ratio = alpha.exp() * sizes
    shots = ((ratio / ratio.sum() * (support - way)).floor() + 1).clamp_max(sizes - query).long().tolist()
    return _split([labels_by_class[c] for c in chosen], shots, [query] * way, g)


def _split(members, shots, queries, g):
    s_idx, s_y, q_idx, q_y = [], [], [], []
    for y, (idx, shot, query) in enumerate(zip(members, shots, queries)):
        picked = idx[torch.randperm(len(idx), generator=g)[:shot + query]]
        s_idx.append(picked[:shot]), q_idx.append(picked[shot:])
        s_y.append(torch.full((shot,), y)), q_y.append(torch.full((query,), y))
    return torch.cat(s_idx), torch.cat(s_y), torch.cat(q_idx), torch.cat(q_y)


def prototype_accuracy(feats, support, support_y, query, query_y):
    """Top-1 (%) of the nearest class mean (squared Euclidean) on L2-normalised features."""
    way = int(support_y.max()) + 1
    prototypes = torch.zeros(way, feats.shape[1], dtype=feats.dtype, device=feats.device)
    prototypes.index_add_(0, support_y.to(feats.device), feats[support])
    prototypes /= torch.bincount(support_y, minlength=way).to(feats)[:, None]
    predicted = torch.cdist(feats[query], prototypes).argmin(1)
    return 100 * (predicted.cpu() == query_y).float().mean().item()


def fewshot(feats, labels, mode, episodes, way=5, shot=5, query=15, seed=0):
    """{"mean", "ci95", "accuracies"}: ci95 = 1.96 * std / sqrt(episodes), std over episodes (ddof 0)."""
    feats = torch.nn.functional.normalize(feats.float(), dim=1)
    _, mapped = torch.unique(labels, return_inverse=True)
    labels_by_class = [torch.nonzero(mapped == c).flatten() for c in range(int(mapped.max()) + 1)]
    g = torch.Generator().manual_seed(seed)
    accuracies = []
    for _ in range(episodes):
        episode = fixed_episode(labels_by_class, way, shot, query, g) if mode == "fixed" else \
            variable_episode(labels_by_class, g)
        accuracies.append(prototype_accuracy(feats, *episode))
    acc = torch.tensor(accuracies, dtype=torch.float64)
    return {"mean": acc.mean().item(), "ci95": 1.96 * acc.std(unbiased=False).item() / math.sqrt(len(acc)),
            "accuracies": accuracies}


def checkpoint_clusters(args, train_features):
    """The training images' clusters that the checkpoint itself holds ([N] int64, -1 for none), see --clusters."""
    if args.weights == "random" or not args.weights:
        raise ValueError("--show-clusters with --clusters 0 needs a checkpoint that holds clusters; give --clusters N "
                         "to cluster the features with k-means.")
    ckpt = checkpoint.load(args.weights)
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    n = len(train_features)
    if isinstance(ckpt.get("pseudo_labels"), torch.Tensor):  # ClusterFit: the clusters its trunk was trained on
        assign = ckpt["pseudo_labels"].long().flatten()
    elif isinstance(ckpt.get("labels"), torch.Tensor) and ckpt["labels"].dim() == 2:  # DeepCluster-v2: head 0's
        assign = ckpt["labels"][0].long()
    elif isinstance(ckpt.get("prototypes"), torch.Tensor):  # SwAV: each image's best prototype
        if args.layers[0] != "head":
            raise ValueError("SwAV's prototypes live in its projection space: add --layers head (or give "
                             "--clusters N to cluster the trunk's features).")
        prototypes = torch.nn.functional.normalize(ckpt["prototypes"].float(), dim=1)
        if prototypes.shape[1] != train_features.shape[1]:
            raise ValueError(f"the checkpoint's prototypes are {prototypes.shape[1]}-d, the head features "
                             f"{train_features.shape[1]}-d.")
        assign = (torch.nn.functional.normalize(train_features.float(), dim=1) @ prototypes.t()).argmax(1)
    else:
        raise ValueError(f"{args.weights} holds no clusters (ClusterFit or DeepCluster-v2 pseudo-labels, SwAV "
                         f"prototypes): give --clusters N to cluster the features with k-means.")
    if len(assign) != n:
        raise ValueError(f"the checkpoint's clusters label {len(assign)} images but --train-data has {n}: give the "
                         f"training run's --data (and --data-fraction's subset), or --clusters N.")
    return assign


def show_clusters(args, train_features, train_labels, train_set, runtime):
    if args.clusters:
        if args.clusters > len(train_features):
            raise ValueError(f"--clusters {args.clusters} is more than the {len(train_features)} training images.")
        _, assign = ops.kmeans(train_features.to(runtime.device), args.clusters, n_iters=20, spherical=True,
                               seed=args.seed)
        source = f"spherical k-means, {args.clusters} clusters"
    else:
        assign = checkpoint_clusters(args, train_features)
        source = "the checkpoint's clusters"
    if not runtime.is_main:
        return
    rows = grids.largest_clusters(train_features, assign.cpu(), train_labels, args.show_rows, args.show_per_row)
    size = grids.cluster_grid(train_set, rows, args.show_clusters)
    print(f"wrote {args.show_clusters} ({size[0]}x{size[1]} px: the {len(rows)} largest of {source}, "
          f"{args.layers[0]} features)", file=sys.stderr, flush=True)


def main(argv=None):
    args = cli.parse_args(Args, PRESETS, argv, description=__doc__.split("\n")[0])
    cli.check_output_file(args.output)
    if not args.features and not args.weights:
        raise ValueError("--weights is required (a checkpoint path, or 'random'), unless --features is given.")
    if not args.features and not args.train_data:
        raise ValueError("--train-data is required, unless --features is given.")
    if any(k < 1 for k in args.k) or args.report_k not in args.k:
        raise ValueError(f"--k must be positive and include --report-k {args.report_k}, got {list(args.k)}.")
    if args.fewshot != "off" and (args.episodes < 1 or min(args.way, args.shot, args.query) < 1):
        raise ValueError("--episodes, --way, --shot and --query must be positive.")
    if args.show_neighbours or args.show_clusters:
        if not args.train_data:
            raise ValueError("--show-neighbours and --show-clusters need the images: give --train-data.")
        if min(args.show_queries, args.show_k, args.show_rows, args.show_per_row) < 1 or args.clusters < 0:
            raise ValueError("--show-queries, --show-k, --show-rows, --show-per-row must be positive and --clusters "
                             "not negative.")
        for path in (args.show_neighbours, args.show_clusters):
            cli.check_output_file(path)
    runtime = dist.setup(args.device)
    started = time.time()
    try:
        train_set = test_set = None
        if args.show_neighbours or args.show_clusters:
            train_set = data.build_split(args.train_data, "train")
            test_set = data.build_split(args.test_data or args.train_data, "test")
        cache = features.compute_or_load(args, runtime, train_set, test_set)
        layer = args.layers[0]
        if (args.show_neighbours or args.show_clusters) and (
                len(cache["train_features"][layer]) != len(train_set) or
                len(cache["test_features"][layer]) != len(test_set)):
            raise ValueError("--show-neighbours/--show-clusters: the cached --features were not extracted from "
                             "these --train-data/--test-data images.")
        if args.show_clusters:  # every process: k-means may run distributed
            show_clusters(args, cache["train_features"][layer], cache["train_labels"], train_set, runtime)
        if args.show_neighbours and runtime.is_main:
            chosen = grids.pick_queries(len(test_set), args.show_queries, args.seed)
            idx, _ = grids.nearest(cache["train_features"][layer], cache["test_features"][layer][chosen], args.show_k)
            size = grids.neighbour_grid(test_set, chosen, train_set, idx.tolist(), args.show_neighbours)
            print(f"wrote {args.show_neighbours} ({size[0]}x{size[1]} px: {len(chosen)} queries x "
                  f"{idx.shape[1]} neighbours, {layer} features)", file=sys.stderr, flush=True)
        if not runtime.is_main:
            return None
        device = runtime.device
        train_labels, test_labels = cache["train_labels"], cache["test_labels"]
        if train_labels.dim() != 1:
            raise ValueError("kNN needs single-label data; use eval_svm.py for N x C multi-label targets.")
        meta = cache["meta"]
        common_fields = {"layer": args.layers[0], "weights": meta.get("weights"), "arch": meta.get("arch"),
                         "image_size": meta.get("image_size"), "n_train": len(train_labels), "n_test": len(test_labels)}
        if args.fewshot != "off":
            results = {layer: fewshot(cache["test_features"][layer].to(device), test_labels, args.fewshot,
                                      args.episodes, args.way, args.shot, args.query, args.seed)
                       for layer in args.layers}
            head = results[args.layers[0]]
            summary = {"top1": round(head["mean"], 3), "ci95": round(head["ci95"], 3), "fewshot": args.fewshot,
                       "episodes": args.episodes, **common_fields,
                       "per_layer": {k: {"mean": round(r["mean"], 3), "ci95": round(r["ci95"], 3)}
                                     for k, r in results.items()}}
            if args.fewshot == "fixed":
                summary.update(way=args.way, shot=args.shot, query=args.query)
        else:
            n_train = len(train_labels)
            if args.report_k > n_train:
                raise ValueError(f"--report-k {args.report_k} is more neighbours than the {n_train} training images.")
            ks = [k for k in args.k if k <= n_train]
            skipped = [k for k in args.k if k > n_train]
            if skipped:
                print(f"k={', '.join(map(str, skipped))} left out: only {n_train} training images.", file=sys.stderr)
            results = {}
            for layer in args.layers:
                results[layer] = weighted_knn(cache["train_features"][layer].to(device), train_labels.to(device),
                                              cache["test_features"][layer].to(device), test_labels.to(device),
                                              ks, args.temperature)
            headline = results[args.layers[0]][args.report_k]
            summary = {"top1": round(headline["top1"], 3), "top5": round(headline["top5"], 3), "k": args.report_k,
                       "temperature": args.temperature, **common_fields,
                       "per_k": {layer: {str(k): {m: round(v, 3) for m, v in r.items()} for k, r in res.items()}
                                 for layer, res in results.items()}}
            if skipped:
                summary["k_left_out"] = skipped
        summary["seconds"] = round(time.time() - started, 1)
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(summary) + "\n")
        print(json.dumps(summary), flush=True)
        return summary
    finally:
        dist.cleanup()


if __name__ == "__main__":
    cli.run(main)

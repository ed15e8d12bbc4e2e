"""Linear SVM evaluation of a frozen trunk: VISSL's VOC07 / Places205 low-shot SVM benchmark, batched.

Goyal et al., "Scaling and Benchmarking Self-Supervised Visual Representation Learning",
ICCV 2019, as VISSL runs it (svm_trainer / svm_low_shot_trainer): features L2-normalised,
one-vs-rest linear SVMs with squared hinge loss and L2 penalty (liblinear's primal,
bias as a regularised feature), positives weighted 2:1, the cost of each class chosen by
3-fold cross-validated average precision (sklearn's StratifiedKFold folds and its
average_precision scorer, as VISSL's cross_val_score) over C in {0.01, ..., 1000}, then
the model refit on all of train. Multi-label targets are N x C in {1, 0, -1}: -1
(difficult) is left out at test and is a negative in training unless --difficult ignore.
Metrics: mean AP (VOC all-point interpolated, as VISSL) and, for single-label data, top-1
of the argmax (a test image of a class that train lacks counts as wrong).

--low-shot is VISSL's low-shot benchmark: for each k, --low-shot-samples draws of
training rows (multi-label: per class k positives and (C - 1) k negatives; single-label:
k images of every class), an SVM per class and cost on each draw, and the cost whose test
mAP averaged over the draws is best (VISSL's aggregate_stats; the mean, population std,
min and max over the draws at that cost are reported, and top-1 beside mAP for
single-label data). That choice looks at the test set; --low-shot-cost cv instead chooses
each class's cost by cross-validation on the draw (k folds at most; --one-shot-cost at
k = 1). A k that the data cannot supply is left out with a message, as VISSL skips it.
Images go through features.eval_transform: the short side resized, then a centre crop, as
every evaluation here; --squash gives VISSL's VOC07 configs' preprocessing (Resize 256, then
the whole image to 224 x 224).

Unlike VISSL's one liblinear call per (class, cost, fold), every SVM of the sweep is one
column of one batched problem: min_W 0.5 |w_p|^2 + C_p sum_i s_ip max(0, 1 - y_ip x_i.w_p)^2,
solved by Newton's method with preconditioned conjugate gradients (Chapelle 2007; the
primal solver of liblinear) using only matrix products, on GPU when present.

    python eval_svm.py --weights ckpt.pth --train-data voc07.train.txt --test-data voc07.test.txt --image-size 224 \
        --squash
    python eval_svm.py --weights random --arch resnet18 --train-data cifar10-mini --image-size 32 --save-features f.pth
    python eval_svm.py --features f.pth --low-shot          # k = 1..96 positives per class, 5 draws
"""
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import cli, data, dist, features

VOC07_COSTS = (0.01, 0.1, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 50.0, 100.0, 1000.0)
LOW_SHOT_K = (1, 2, 4, 8, 16, 32, 64, 96)


@dataclass
class Args:
    weights: str = field(default="", metadata={"help": "checkpoint (any format) or 'random'; not needed with --features"})
    arch: str = field(default="", metadata={"help": "trunk architecture (default: the checkpoint's / inferred)"})
    cifar_stem: bool = field(default=None, metadata={"help": "3x3 stem (default: the checkpoint's)"})
    state_dict_key: str = field(default="", metadata={"help": "dotted path of the weights inside the checkpoint"})
    remove_prefix: str = ""
    append_prefix: str = ""
    train_data: str = field(default="", metadata={"help": "dataset (SPEC or SPEC@SPLIT); default split train"})
    test_data: str = field(default="", metadata={"help": "default: the test split of --train-data"})
    train_labels: str = field(default="", metadata={"help": "N x C label file (.npy or text) replacing the dataset's"})
    test_labels: str = ""  # N x C label file (.npy or text) replacing the test set's
    features: str = field(default="", metadata={"help": "cached features file (from --save-features): skip the trunk"})
    save_features: str = ""
    layers: tuple[str, ...] = ("pooled",)
    costs: tuple[float, ...] = VOC07_COSTS  # the SVM costs C tried per class (VISSL's VOC07 sweep)
    cv_folds: int = 3  # cross-validation folds that choose each class's cost by AP
    positive_weight: float = 2.0  # VISSL's cls_weight {1: 2, -1: 1}
    difficult: str = field(default="negative", metadata={"choices": ["negative", "ignore"],
                                                           "help": "how -1 (difficult) labels are trained"})
    normalize: bool = True  # L2-normalise the features (VISSL's normalize: True)
    low_shot: bool = False  # the low-shot benchmark: k positives per class, --low-shot-samples draws
    low_shot_k: tuple[int, ...] = LOW_SHOT_K  # positives per class
    low_shot_samples: int = 5  # independent draws per k
    low_shot_cost: str = field(default="best-test", metadata={
        "choices": ["best-test", "cv"],
        "help": "best-test: VISSL's choice, per k the cost with the best test mAP averaged over the draws; cv: per "
                "class by cross-validation on the draw's training rows (the test set is not looked at)"})
    one_shot_cost: float = field(default=1.0, metadata={"help": "--low-shot-cost cv: the cost at k=1, where no fold "
                                                                "can be held out"})
    newton_iters: int = 40  # Newton steps of the batched squared-hinge solver
    tol: float = 1e-4  # relative gradient norm at which the solver stops
    image_size: int = field(default=0, metadata={"help": "centre-crop size (0: the checkpoint's crop size, else 224)"})
    resize_size: int = 0
    squash: bool = field(default=False, metadata={"help": "VISSL's VOC07 preprocessing: after the short-side resize, "
                                                          "the whole image to image-size x image-size, no crop"})
    precise_bn: int = field(default=0, metadata={"help": "re-estimate BatchNorm statistics on this many training "
                                                          "images before extracting (0: the checkpoint's)"})
    batch_size: int = 256  # images per forward pass when extracting
    workers: int = 4
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0  # initialises the trunk for --weights random, draws the low-shot samples
    output: str = ""


# ---------------------------------------------------------------- the batched squared-hinge SVM solver
def _pcg(hvp, rhs, precondition, max_iters, rel_tol):
    """Solve H x = rhs column by column (all columns at once) by preconditioned conjugate gradients."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = precondition(r)
    p, rz = z, (r * z).sum(0)
    target = rel_tol * rhs.norm(dim=0)
    for _ in range(max_iters):
        hp = hvp(p)
        alpha = rz / (p * hp).sum(0).clamp_min(1e-30)
        x += alpha * p
        r -= alpha * hp
        if (r.norm(dim=0) <= target).all():
            break
        z = precondition(r)
        rz_new = (r * z).sum(0)
        p = z + (rz_new / rz.clamp_min(1e-30)) * p
        rz = rz_new
    return x


@torch.no_grad()
def train_svms(x, signs, weights, costs, newton_iters=40, tol=1e-4, cg_iters=50):
    """Weights [D+1, P] (bias last) of P linear squared-hinge SVMs sharing the inputs `x` [N, D].

    Column p minimises 0.5 |w|^2 + costs[p] * sum_i weights[i, p] * max(0, 1 - signs[i, p] * [x_i, 1].w)^2,
    i.e. liblinear's L2-regularised L2-loss SVC (sklearn LinearSVC, intercept_scaling=1) with
    per-sample weights (class weights; 0 leaves a row out of that SVM: other folds, ignored labels).
    Newton-CG with an exact line search; the preconditioner is I + a_p X^T X in X^T X's eigenbasis,
    a_p the mean curvature weight of column p.
    """
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
    gram_values, gram_vectors = torch.linalg.eigh(x.t() @ x / len(x))
    c = torch.as_tensor(costs, dtype=x.dtype, device=x.device)
    result = torch.zeros(x.shape[1], signs.shape[1], dtype=x.dtype, device=x.device)
    columns = torch.arange(signs.shape[1], device=x.device)  # the columns still being optimised
    w, scores = result.clone(), torch.zeros_like(signs)
    c_weights = 2 * c * weights  # the loss's curvature weight of each (row, column)
    first_norm = None
    for _ in range(newton_iters):
        slack = (1 - signs * scores).clamp_min_(0)
        curvature = c_weights * (slack > 0)  # generalised Hessian: I + X^T diag(curvature) X
        grad = w - x.t() @ (curvature * signs * slack)
        grad_norm = grad.norm(dim=0)
        first_norm = grad_norm if first_norm is None else first_norm
        done = grad_norm <= tol * first_norm
        if done.any():  # retire converged columns so later iterations only pay for the rest
            result[:, columns[done]] = w[:, done]
            keep = ~done
            if not keep.any():
                return result
            columns, w, scores, signs, c_weights, curvature, grad, first_norm = (
                columns[keep], w[:, keep], scores[:, keep], signs[:, keep], c_weights[:, keep], curvature[:, keep],
                grad[:, keep], first_norm[keep])
        scale = curvature.mean(0) * len(x)

        def precondition(r):
            return gram_vectors @ ((gram_vectors.t() @ r) / (1 + scale * gram_values[:, None]))

        step = _pcg(lambda v: v + x.t() @ (curvature * (x @ v)), -grad, precondition, cg_iters, 0.1)
        # Exact line search on the piecewise-quadratic objective along `step` (1-D Newton from t = 1).
        step_scores = x @ step
        margin_step = signs * step_scores
        t = torch.ones(len(columns), dtype=x.dtype, device=x.device)
        wd, dd = (w * step).sum(0), (step * step).sum(0)
        for _ in range(10):
            slack_t = (1 - signs * scores - t * margin_step).clamp_min_(0)
            on = c_weights * (slack_t > 0)
            d1 = wd + t * dd - (on * margin_step * slack_t).sum(0)
            d2 = dd + (on * margin_step * margin_step).sum(0)
            new_t = (t - d1 / d2.clamp_min(1e-30)).clamp_min(0)
            moved = (new_t - t).abs().max()
            t = new_t
            if moved < 1e-6:
                break
        w += t * step
        scores += t * step_scores
    result[:, columns] = w
    return result


def average_precision(scores, positive, include, interpolated=True):
    """AP of every column: scores, positive, include are [N, P].

    interpolated: VOC's all-point interpolated AP (VISSL's test metric, evaluate.py); else
    sklearn's average_precision_score (VISSL's cross-validation scorer): sum over the distinct
    scores, highest first, of the recall gained there times the precision there. Rows with
    include=False are left out (difficult at test, training rows in cross-validation).
    Columns without a positive get NaN.
    """
    masked = scores.masked_fill(~include, -float("inf"))
    order = masked.argsort(dim=0, descending=True)
    pos = (positive & include).gather(0, order).to(scores.dtype)
    neg = (~positive & include).gather(0, order).to(scores.dtype)
    tp, fp = pos.cumsum(0), neg.cumsum(0)
    precision = tp / (tp + fp).clamp_min(1)
    n_pos = pos.sum(0)
    if interpolated:
        envelope = precision.flip(0).cummax(0).values.flip(0)  # max precision at any higher recall
        total = (envelope * pos).sum(0)
    else:  # one term per run of equal scores, at its last row: the precision after the whole run
        sorted_scores = masked.gather(0, order)
        last = torch.ones_like(pos, dtype=torch.bool)
        last[:-1] = sorted_scores[1:] != sorted_scores[:-1]
        tp_at = torch.where(last, tp, torch.zeros_like(tp))
        gained = tp_at - torch.cat([torch.zeros_like(tp[:1]), tp_at.cummax(0).values[:-1]])
        total = (gained * precision * last).sum(0)
    return total / n_pos.where(n_pos > 0, torch.full_like(n_pos, float("nan")))


def stratified_folds(positive, n_folds):
    """Fold id of every row, as sklearn's StratifiedKFold(n_folds) without shuffling: [N] int64.

    Like sklearn, the classes are numbered in order of first appearance: the first row's class
    is class 0, whose share of each fold is counted first."""
    folds = torch.empty(len(positive), dtype=torch.long)
    y = positive.long().cpu()
    if len(y) and y[0] == 1:
        y = 1 - y
    ordered = torch.sort(y).values
    for value in (0, 1):
        members = torch.nonzero(y == value).flatten()
        allocation = torch.tensor([int((ordered[i::n_folds] == value).sum()) for i in range(n_folds)])
        folds[members] = torch.arange(n_folds).repeat_interleave(allocation)
    return folds


def sweep(x, targets, train_rows, costs, n_folds, positive_weight, newton_iters=40, tol=1e-4, max_columns=None,
          every_cost=False):
    """Cross-validate the cost of every class and refit: VISSL's SVM trainer for all classes at once.

    targets: [N, C] bool (positive); train_rows: [N, C] bool (the rows each class's SVM trains on).
    Returns (W [D+1, C] refit with each class's chosen cost, chosen costs [C], cv AP [C, len(costs)]);
    with every_cost, W is [D+1, C, len(costs)]: the refit at every cost. n_folds = 1: no
    cross-validation, the first cost is "chosen".
    The columns (fold or refit) x class x cost are solved in one batched problem (chunked by class
    so that N x columns stays under `max_columns` x N).
    """
    n, n_classes = targets.shape
    k = len(costs)
    max_columns = max_columns or max(1, (1 << 27) // max(n, 1))
    classes_per_chunk = max(1, max_columns // ((n_folds + 1) * k))
    weights_out, chosen, cv_ap = [], [], []
    for c0 in range(0, n_classes, classes_per_chunk):
        cls = torch.arange(c0, min(n_classes, c0 + classes_per_chunk))
        fold_of = torch.full((n, len(cls)), -1, dtype=torch.long, device=x.device)
        for j, c in enumerate(cls.tolist()):
            rows = torch.nonzero(train_rows[:, c]).flatten()
            if n_folds > 1:
                fold_of[rows, j] = stratified_folds(targets[rows, c], n_folds).to(x.device)
        # Columns ordered (split, class, cost); split n_folds is the refit on all training rows.
        pos = targets[:, cls].to(x.device)
        signs = (pos.float() * 2 - 1).to(x.dtype)
        class_weight = torch.where(pos, positive_weight, 1.0).to(x.dtype) * train_rows[:, cls].to(x.device)
        splits = range(n_folds + 1) if n_folds > 1 else [n_folds]
        col_signs, col_weights, col_costs = [], [], []
        for split in splits:
            keep = (fold_of != split).to(x.dtype) if split < n_folds else torch.ones_like(class_weight)
            col_signs.append(signs.repeat_interleave(k, 1))
            col_weights.append((class_weight * keep).repeat_interleave(k, 1))
            col_costs.append(torch.tensor(costs, dtype=x.dtype).repeat(len(cls)))
        w = train_svms(x, torch.cat(col_signs, 1), torch.cat(col_weights, 1), torch.cat(col_costs).to(x.device),
                       newton_iters, tol)
        w = w.view(w.shape[0], len(splits), len(cls), k)
        if n_folds > 1:
            scores = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], 1) @ w[:, :n_folds].flatten(1)
            scores = scores.view(n, n_folds, len(cls), k)
            held_out = fold_of[:, None, :, None] == torch.arange(n_folds, device=x.device)[None, :, None, None]
            ap = average_precision(scores.flatten(1), pos[:, None, :, None].expand_as(scores).flatten(1),
                                   held_out.expand_as(scores).flatten(1), interpolated=False).view(n_folds, len(cls), k)
            mean_ap = ap.nan_to_num(0).mean(0)  # a fold without positives scores 0, as sklearn's scorer
            best = mean_ap.argmax(1)  # ties: the smallest cost
        else:
            mean_ap = torch.full((len(cls), k), float("nan"))
            best = torch.zeros(len(cls), dtype=torch.long)
        weights_out.append(w[:, -1] if every_cost else w[:, -1, torch.arange(len(cls)), best.to(w.device)])
        chosen.append(torch.tensor(costs, dtype=torch.float64)[best.cpu()])
        cv_ap.append(mean_ap.cpu())
    return torch.cat(weights_out, 1), torch.cat(chosen), torch.cat(cv_ap)


def evaluate(w, x_test, test_targets, test_include, single_label):
    """{"mAP": ..., "top1": ...} (%) of the one-vs-rest scores on test."""
    scores = torch.cat([x_test, torch.ones(len(x_test), 1, dtype=x_test.dtype, device=x_test.device)], 1) @ w
    ap = average_precision(scores, test_targets, test_include)
    result = {"mAP": 100 * ap.nanmean().item(), "ap_per_class": [round(100 * a, 3) for a in ap.tolist()]}
    if single_label:  # an image of a class that train lacks has no positive column: never right
        right = (scores.argmax(1) == test_targets.float().argmax(1)) & test_targets.any(1)
        result["top1"] = 100 * right.float().mean().item()
    return result


# ---------------------------------------------------------------- labels and protocols
def _load_label_file(path):
    """int64 class ids [N] (.npy) or an N x C matrix in {1, 0, -1} (.npy, or text with one row a line).

    np.load keeps allow_pickle off, so a label file is data only; anything that is not one of the two
    shapes above with integral values in range is refused with one sentence.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loadtxt warns on an empty file, which is refused below
            labels = np.load(path) if str(path).endswith(".npy") else np.loadtxt(path, ndmin=2)
    except OSError as e:
        raise data.DataError(f"label file {path} cannot be read ({e.strerror or type(e).__name__}).") from None
    except Exception as e:  # noqa: BLE001 - any parse failure of an untrusted file is one sentence
        raise data.DataError(f"label file {path} is not a .npy array or a text matrix of numbers "
                             f"({type(e).__name__}).") from None
    if not isinstance(labels, np.ndarray):  # e.g. a .npz archive
        getattr(labels, "close", lambda: None)()
        raise data.DataError(f"label file {path} does not hold one array.")
    if labels.dtype.kind not in "biuf" or labels.ndim not in (1, 2) or labels.size == 0:
        raise data.DataError(f"label file {path} holds a {labels.dtype} array of shape {labels.shape}, not "
                             f"class ids [N] or an N x C label matrix.")
    values = labels.astype(np.float64)
    if not np.isfinite(values).all() or (values != np.round(values)).any():
        raise data.DataError(f"label file {path} holds values that are not integers.")
    if labels.ndim == 2 and not np.isin(values, (-1, 0, 1)).all():
        raise data.DataError(f"label file {path} is an N x C matrix, so its values must be 1, 0 or -1 "
                             f"(present, absent, difficult).")
    if labels.ndim == 1 and ((values < 0).any() or (values >= 2**62).any()):
        raise data.DataError(f"label file {path} holds class ids that are negative or too large.")
    return torch.from_numpy(labels.astype(np.int64))  # exact: integral values below 2**62


def as_targets(labels, classes=None):
    """(targets [N, C] in {1, 0, -1}, single_label) from class ids [N] or an N x C label matrix."""
    if labels.dim() == 2:
        return labels.long(), False
    classes = classes if classes is not None else torch.unique(labels)
    return (labels[:, None] == classes[None, :]).long(), True


def low_shot_rows(targets, k, generator, single_label):
    """The training rows [N, C] of each class's SVM in one k-shot draw, sampled as VISSL does
    (create_low_shot_samples.py), or None when the data have too few images for k.

    Multi-label (VOC07): per class, k random positives and (C - 1) k random negatives (label 0);
    the class's other rows are left out. Single-label (Places205): k random images of every class,
    C k in all; every class's SVM trains on all of them, its own k as positives.
    """
    n_classes = targets.shape[1]

    def draw(candidates, n):
        return candidates[torch.randperm(len(candidates), generator=generator)[:n]]

    rows = torch.zeros_like(targets, dtype=torch.bool)
    for c in range(n_classes):
        positives, negatives = (torch.nonzero(targets[:, c] == v).flatten() for v in (1, 0))
        if len(positives) < k or (not single_label and len(negatives) < (n_classes - 1) * k):
            return None
        if single_label:
            rows[draw(positives, k)] = True
        else:
            rows[draw(positives, k), c] = True
            rows[draw(negatives, (n_classes - 1) * k), c] = True
    return rows


def low_shot_stats(runs, metric):
    """VISSL's summary of the draws at one k: mean, std (population), min, max; and the draws."""
    values = torch.tensor([r[metric] for r in runs], dtype=torch.float64)
    return {"metric": metric, "mean": round(values.mean().item(), 3),
            "std": round(values.std(correction=0).item(), 3), "min": round(values.min().item(), 3),
            "max": round(values.max().item(), 3), "runs": [round(v, 3) for v in values.tolist()]}


def low_shot_needs(single_label):
    return ("k images of every class are drawn" if single_label else
            "k positives (label 1) and (C - 1) k negatives (label 0) of every class are drawn")


def main(argv=None):
    args = cli.parse_args(Args, None, argv, description=__doc__.split("\n")[0])
    cli.check_output_file(args.output)
    if not args.costs or any(c <= 0 for c in args.costs):
        raise ValueError(f"--costs must be positive, got {list(args.costs)}.")
    if args.cv_folds < 1:
        raise ValueError(f"--cv-folds must be at least 1, got {args.cv_folds}.")
    runtime = dist.setup(args.device)
    started = time.time()
    try:
        cache = features.compute_or_load(args, runtime)
        if not runtime.is_main:
            return None
        train_labels = _load_label_file(args.train_labels) if args.train_labels else cache["train_labels"]
        test_labels = _load_label_file(args.test_labels) if args.test_labels else cache["test_labels"]
        if train_labels.dim() != test_labels.dim():
            raise ValueError("train and test labels must both be class ids or both be N x C label matrices.")
        classes = torch.unique(train_labels) if train_labels.dim() == 1 else None
        train_targets, single_label = as_targets(train_labels, classes)
        test_targets, _ = as_targets(test_labels, classes)
        if train_targets.shape[1] != test_targets.shape[1]:
            raise ValueError(f"train has {train_targets.shape[1]} classes/columns, test {test_targets.shape[1]}.")
        device = runtime.device
        train_rows = train_targets != -1 if args.difficult == "ignore" else torch.ones_like(train_targets, dtype=torch.bool)
        results = {}
        for layer in args.layers:
            x, x_test = cache["train_features"][layer].to(device), cache["test_features"][layer].to(device)
            if len(x) != len(train_targets) or len(x_test) != len(test_targets):
                raise ValueError(f"{len(x)}/{len(x_test)} train/test features but {len(train_targets)}/"
                                 f"{len(test_targets)} labels.")
            if args.normalize:
                x, x_test = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(x_test, dim=1)
            test_pos, test_include = (test_targets == 1).to(device), (test_targets != -1).to(device)
            if not args.low_shot:
                w, chosen, cv_ap = sweep(x, (train_targets == 1).to(device), train_rows.to(device), args.costs,
                                         args.cv_folds, args.positive_weight, args.newton_iters, args.tol)
                res = evaluate(w, x_test, test_pos, test_include, single_label)
                res["chosen_costs"] = chosen.tolist()
                results[layer] = res
                continue
            per_k = {}
            for k in args.low_shot_k:
                draws = [low_shot_rows(train_targets, k, torch.Generator().manual_seed(args.seed * 1000 + sample),
                                       single_label) for sample in range(args.low_shot_samples)]
                if draws[0] is None:
                    continue  # said once below
                runs = []  # per draw, per cost tried: the test metrics
                for rows in draws:
                    rows = (rows & train_rows).to(device)
                    if args.low_shot_cost == "best-test":
                        w = sweep(x, (train_targets == 1).to(device), rows, args.costs, 1, args.positive_weight,
                                  args.newton_iters, args.tol, every_cost=True)[0]
                        runs.append([evaluate(w[:, :, j], x_test, test_pos, test_include, single_label)
                                     for j in range(len(args.costs))])
                    else:
                        folds = min(args.cv_folds, k)
                        costs = args.costs if folds > 1 else (args.one_shot_cost,)
                        w = sweep(x, (train_targets == 1).to(device), rows, costs, folds, args.positive_weight,
                                  args.newton_iters, args.tol)[0]
                        runs.append([evaluate(w, x_test, test_pos, test_include, single_label)])
                mean_map = torch.tensor([[r["mAP"] for r in run] for run in runs]).mean(0)
                best = int(mean_map.argmax())  # ties: the smallest cost
                per_k[str(k)] = low_shot_stats([run[best] for run in runs], "mAP")
                if args.low_shot_cost == "best-test":
                    per_k[str(k)]["cost"] = args.costs[best]
                if single_label:
                    per_k[str(k)]["top1"] = low_shot_stats([run[best] for run in runs], "top1")
            skipped = [k for k in args.low_shot_k if str(k) not in per_k]
            if not per_k:
                raise ValueError(f"no --low-shot-k can be drawn: {low_shot_needs(single_label)}, and the smallest "
                                 f"--low-shot-k is {min(args.low_shot_k)}.")
            if skipped and layer == args.layers[0]:
                print(f"low-shot k={', '.join(map(str, skipped))} left out: {low_shot_needs(single_label)} for "
                      f"each.", file=sys.stderr)
            results[layer] = per_k
        head = results[args.layers[0]]
        summary = {"layer": args.layers[0], "weights": cache["meta"].get("weights"),
                   "n_train": len(train_targets), "n_test": len(test_targets), "classes": train_targets.shape[1]}
        if args.low_shot:
            summary["low_shot"] = {layer: r for layer, r in results.items()}
        else:
            summary.update({m: round(head[m], 3) for m in ("top1", "mAP") if m in head})
            summary["per_layer"] = {layer: {m: (round(v, 3) if isinstance(v, float) else v) for m, v in r.items()}
                                    for layer, r in results.items()}
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

"""Wall time of the batched evaluation heads against scikit-learn on the same cached features; prints JSON.

    OMP_NUM_THREADS=1 python bench/bench_eval.py --features f.pth --n-train 2000

SVM: eval_svm's sweep (all classes x VOC07 costs x 3 CV folds + refit, one batched solve) against
VISSL's loop of LinearSVC fits (same costs, same folds, class weight 2:1, AP scoring, refit).
Linear: eval_linear's cached sweep (52 heads, 100 epochs, chosen on val, refit) against one
sklearn LogisticRegression fit; and the batched L-BFGS logistic regression over 16 values of C
against 16 sklearn fits (same standardised features).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval_linear  # noqa: E402
import eval_svm  # noqa: E402
from common import cli, dist  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", required=True)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--costs", type=float, nargs="+", default=list(eval_svm.VOC07_COSTS))
    parser.add_argument("--skip-sklearn-svm", action="store_true")
    parser.add_argument("--lbfgs-iters", type=int, default=300)
    opts = parser.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.svm import LinearSVC

    cache = torch.load(opts.features, weights_only=False)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(cache["train_labels"]), generator=g)[:opts.n_train]
    x = torch.nn.functional.normalize(cache["train_features"]["pooled"][idx], dim=1)
    y = cache["train_labels"][idx]
    xt = torch.nn.functional.normalize(cache["test_features"]["pooled"], dim=1)
    yt = cache["test_labels"]
    targets, _ = eval_svm.as_targets(y)
    test_targets, _ = eval_svm.as_targets(yt, torch.unique(y))
    out = {"n_train": len(x), "n_test": len(xt), "dim": x.shape[1], "costs": opts.costs,
           "threads": torch.get_num_threads()}

    t0 = time.perf_counter()
    w, chosen, _ = eval_svm.sweep(x, targets == 1, torch.ones_like(targets, dtype=torch.bool), opts.costs, 3, 2.0)
    out["svm_ours_s"] = round(time.perf_counter() - t0, 2)
    res = eval_svm.evaluate(w, xt, test_targets == 1, test_targets != -1, True)
    out["svm_ours"] = {"top1": round(res["top1"], 3), "mAP": round(res["mAP"], 3), "chosen": chosen.tolist()}

    if not opts.skip_sklearn_svm:
        t0 = time.perf_counter()
        xn, columns, sk_chosen = x.numpy(), [], []
        for c in range(targets.shape[1]):
            yc = np.where(targets[:, c].numpy() == 1, 1, -1)
            folds = eval_svm.stratified_folds(torch.from_numpy(yc == 1), 3).numpy()
            best = (-1, None)
            for cost in opts.costs:
                aps = []
                for f in range(3):
                    svm = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, tol=1e-4, max_iter=2000).fit(
                        xn[folds != f], yc[folds != f])
                    aps.append(average_precision_score(yc[folds == f], svm.decision_function(xn[folds == f])))
                if np.mean(aps) > best[0]:
                    best = (np.mean(aps), cost)
            svm = LinearSVC(C=best[1], class_weight={1: 2, -1: 1}, tol=1e-4, max_iter=2000).fit(xn, yc)
            columns.append(np.r_[svm.coef_[0], svm.intercept_])
            sk_chosen.append(best[1])
        out["svm_sklearn_s"] = round(time.perf_counter() - t0, 2)
        res = eval_svm.evaluate(torch.tensor(np.stack(columns, 1), dtype=torch.float32), xt, test_targets == 1,
                                test_targets != -1, True)
        out["svm_sklearn"] = {"top1": round(res["top1"], 3), "mAP": round(res["mAP"], 3), "chosen": sk_chosen}
        out["svm_speedup"] = round(out["svm_sklearn_s"] / out["svm_ours_s"], 2)

    args = cli.parse_args(eval_linear.Args, None, ["--features", opts.features])
    sub = {**cache, "train_features": {"pooled": cache["train_features"]["pooled"][idx]}, "train_labels": y,
           "test_features": {"pooled": cache["test_features"]["pooled"]}}
    t0 = time.perf_counter()
    lin = eval_linear.run_probe(args, dist.Runtime(0, 1, 0, torch.device("cpu")), sub)
    out["linear_ours_s"] = round(time.perf_counter() - t0, 2)
    out["linear_ours"] = {k: lin[k] for k in ("top1", "heads", "lr", "weight_decay", "val_top1")}
    raw = cache["train_features"]["pooled"][idx].numpy()
    mean, std = raw.mean(0), raw.std(0) + 1e-6
    t0 = time.perf_counter()
    ref = LogisticRegression(C=1.0, max_iter=1000).fit((raw - mean) / std, y.numpy())
    out["sklearn_logreg_one_fit_s"] = round(time.perf_counter() - t0, 2)
    out["sklearn_logreg_top1"] = round(100 * ref.score((cache["test_features"]["pooled"].numpy() - mean) / std,
                                                       yt.numpy()), 3)
    # DINOv2's log_regression sweep: one batched L-BFGS over 16 values of C vs 16 sklearn fits
    cs = [float(c) for c in np.logspace(-4, 2, 16)]
    xs, xts = torch.from_numpy((raw - mean) / std), torch.from_numpy((cache["test_features"]["pooled"].numpy() - mean) / std)
    t0 = time.perf_counter()
    w, b = eval_linear.logistic_regression(xs, y, 10, cs, iters=opts.lbfgs_iters)
    out["logreg16_ours_s"] = round(time.perf_counter() - t0, 2)
    ours_acc = [100 * ((xts @ w[i] + b[i]).argmax(1) == yt).float().mean().item() for i in range(len(cs))]
    t0 = time.perf_counter()
    sk_acc = [100 * LogisticRegression(C=c, max_iter=1000).fit(xs.numpy(), y.numpy()).score(xts.numpy(), yt.numpy())
              for c in cs]
    out["logreg16_sklearn_s"] = round(time.perf_counter() - t0, 2)
    out["logreg16_max_abs_top1_diff"] = round(max(abs(a - b) for a, b in zip(ours_acc, sk_acc)), 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

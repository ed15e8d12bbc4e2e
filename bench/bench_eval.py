"""Wall time of the batched evaluation heads against scikit-learn on the same cached features; prints JSON.

    OMP_NUM_THREADS=1 python bench/bench_eval.py --features f.pth --n-train 2000

SVM: eval_svm's sweep (all classes x VOC07 costs x 3 CV folds + refit, one batched solve) against
VISSL's loop of LinearSVC fits (same costs, same folds, class weight 2:1, AP scoring, refit).
Linear: eval_linear's cached sweep (52 heads, 100 epochs, chosen on val, refit) against one
sklearn LogisticRegression fit; and the batched L-BFGS logistic regression over 16 values of C
against 16 sklearn fits (same standardised features).

`--accuracy FILE...` instead compares top-1 on the whole test set of each features file, for three
training-set sizes drawn from its train split (seeded): `small` (200 images per class), `vtab`
(1,000 images; also run as --protocol vtab, 800 fit + 200 val) and `full` (all of train).
Rows: eval_linear's default probe, its --logreg, and a tuned scikit-learn logistic regression
(standardised features, C chosen by 5-fold stratified cross-validation on the training set over a
log grid, or on one stratified 10% split from 20,000 images on, refit on all of it: LogisticRegressionCV).
`--out` writes the JSON with the command.

    OMP_NUM_THREADS=1 python bench/bench_eval.py --accuracy simclr.pth random.pth --out result.json
"""
import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval_linear  # noqa: E402
import eval_svm  # noqa: E402
from common import cli, dist  # noqa: E402


SKLEARN_CS = tuple(float(c) for c in np.logspace(-5, 2, 15))  # the tuned reference's log grid of C


def training_rows(labels, setting, seed=0):
    """Row indices of train for a setting: `small` 200 per class, `vtab` 1,000 at random, `full` all."""
    if setting == "full":
        return torch.arange(len(labels))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    if setting == "vtab":
        return order[:1000].sort().values
    return torch.cat([order[labels[order] == c][:200] for c in torch.unique(labels)]).sort().values


def sklearn_tuned(x, y, xt, yt, cs=SKLEARN_CS, folds=5, cv_below=eval_linear.Args.cv_below):
    """Standardise on train; LogisticRegressionCV (C by stratified k-fold accuracy, refit on all of train), lbfgs at
    scikit-learn's default tolerance. From `cv_below` training images on (where eval_linear also stops
    cross-validating) C is chosen on one stratified 10% split: 75 fits of 50,000 x 512 take hours on one core."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")  # 1.9's notices of renamed options
    x, xt = x.double().numpy(), xt.double().numpy()
    mean, std = x.mean(0), x.std(0) + 1e-6
    if len(x) < cv_below:
        cv = StratifiedKFold(folds, shuffle=True, random_state=0)
    else:
        cv, folds = StratifiedShuffleSplit(1, test_size=0.1, random_state=0), 1
    t0 = time.perf_counter()
    model = LogisticRegressionCV(Cs=list(cs), cv=cv, scoring="accuracy", max_iter=2000).fit((x - mean) / std, y.numpy())
    return {"top1": round(100 * model.score((xt - mean) / std, yt.numpy()), 3), "C": float(model.C_[0]),
            "folds": folds, "seconds": round(time.perf_counter() - t0, 1)}


def accuracy_table(opts):
    """Top-1 of our default probe, --logreg and tuned sklearn for every features file x setting."""
    out = {"command": "python " + " ".join(sys.argv), "threads": torch.get_num_threads(), "rows": []}
    runtime = dist.Runtime(0, 1, 0, torch.device("cpu"))
    for path in opts.accuracy:
        cache = torch.load(path, weights_only=False)
        for setting in opts.settings:
            rows = training_rows(cache["train_labels"], setting)
            sub = {**cache, "train_features": {"pooled": cache["train_features"]["pooled"][rows]},
                   "train_labels": cache["train_labels"][rows],
                   "test_features": {"pooled": cache["test_features"]["pooled"]}}
            row = {"features": Path(path).name, "weights": cache["meta"].get("weights"), "setting": setting,
                   "n_train": len(rows), "n_test": len(cache["test_labels"])}
            runs = [("default", ["--logreg"] if opts.logreg else [])]
            if setting == "vtab":
                runs.append(("vtab_protocol", ["--protocol", "vtab"]))
            for name, flags in runs:
                args = cli.parse_args(eval_linear.Args, None, ["--features", path, *flags])
                t0 = time.perf_counter()
                res = eval_linear.run_probe(args, runtime, sub)
                row[name] = {k: res[k] for k in ("top1", "lr", "weight_decay", "val_top1", "folds", "top1_std")
                             if k in res}
                row[name]["seconds"] = round(time.perf_counter() - t0, 1)
                if "logreg" in res:
                    row["logreg"] = res["logreg"]
            if opts.sklearn:
                row["sklearn_tuned"] = sklearn_tuned(sub["train_features"]["pooled"], sub["train_labels"],
                                                     sub["test_features"]["pooled"], cache["test_labels"])
                row["default_minus_sklearn"] = round(row["default"]["top1"] - row["sklearn_tuned"]["top1"], 3)
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    if opts.out:
        Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--features")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--costs", type=float, nargs="+", default=list(eval_svm.VOC07_COSTS))
    parser.add_argument("--skip-sklearn-svm", action="store_true")
    parser.add_argument("--lbfgs-iters", type=int, default=300)
    parser.add_argument("--accuracy", nargs="+", default=[], help="features files: the top-1 table instead")
    parser.add_argument("--settings", nargs="+", default=["small", "vtab", "full"], choices=["small", "vtab", "full"])
    parser.add_argument("--logreg", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sklearn", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="")
    opts = parser.parse_args()
    if opts.accuracy:
        return accuracy_table(opts)
    if not opts.features:
        parser.error("--features (or --accuracy) is required")
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

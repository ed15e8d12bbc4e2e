"""eval_knn / eval_svm / eval_linear against independent references, on real CIFAR-10 features.

Features: a seeded random-init ResNet-18 (ImageNet stem, 32 px) over 1,000 of cifar10-mini's
training images and 500 CIFAR-10 test images, computed once per session here (and cached to a
file for the command-line runs). References: float64 loops, scikit-learn (test-only).
"""
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import LinearSVC

import eval_knn
import eval_linear
import eval_svm
from common import data, features, models
from tests.helpers import last_json, run_script


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    torch.manual_seed(0)
    trunk = models.build_trunk("resnet18")
    transform = features.eval_transform(32)
    train_set = data.subset(data.build_dataset("cifar10-mini", "train"), 0.25, seed=0)
    test_set = data.subset(data.build_dataset("cifar10-test", "test"), 500 / 10000, seed=0)
    layers = ("pooled", "res4")
    train = features.extract(trunk, train_set, layers, transform, batch_size=250, workers=0)
    test = features.extract(trunk, test_set, layers, transform, batch_size=250, workers=0)
    path = tmp_path_factory.mktemp("feats") / "features.pth"
    features.save_features(path, layers, train, test, {"weights": "random", "arch": "resnet18", "image_size": 32})
    return {"path": path, "x": train[0]["pooled"], "y": train[1], "xt": test[0]["pooled"], "yt": test[1]}


# ---------------------------------------------------------------- kNN
def direct_knn_top1(x, y, xt, yt, k, t):
    """Per test image, float64: cosine similarities, top-k, exp(s/T) votes summed per class."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    xt = torch.nn.functional.normalize(xt.double(), dim=1)
    correct = 0
    for q, truth in zip(xt, yt.tolist()):
        sims = x @ q
        top = sims.argsort(descending=True)[:k]
        votes = {}
        for j in top.tolist():
            votes[y[j].item()] = votes.get(y[j].item(), 0.0) + math.exp(sims[j].item() / t)
        correct += max(votes, key=votes.get) == truth
    return 100 * correct / len(yt)


def test_knn_equals_a_direct_float64_computation(feats):
    y, yt = feats["y"] * 7 + 3, feats["yt"] * 7 + 3  # arbitrary label ids
    got = eval_knn.weighted_knn(feats["x"], y, feats["xt"], yt, (20, 200), 0.07, test_chunk=128, train_chunk=300)
    for k in (20, 200):
        assert got[k]["top1"] == pytest.approx(direct_knn_top1(feats["x"], y, feats["xt"], yt, k, 0.07), abs=1e-9)
    one = eval_knn.weighted_knn(feats["x"], y, feats["xt"][:1], yt[:1], (20,), 0.07)  # a 1-image test set
    assert one[20]["top1"] == direct_knn_top1(feats["x"], y, feats["xt"][:1], yt[:1], 20, 0.07)


def test_knn_top5_with_fewer_than_five_neighbours_and_too_large_k(feats):
    """Top-5 counts the min(5, k) best-voted classes (DINO's knn_classifier); k above the training set is refused."""
    x, y, xt, yt = feats["x"][:300], feats["y"][:300], feats["xt"][:100], feats["yt"][:100]
    got = eval_knn.weighted_knn(x, y, xt, yt, (1, 3, 5), 0.07)
    assert got[1]["top5"] == got[1]["top1"]
    xn, xtn = torch.nn.functional.normalize(x.double(), dim=1), torch.nn.functional.normalize(xt.double(), dim=1)
    for k in (3, 5):
        hits = 0
        for q, truth in zip(xtn, yt.tolist()):
            sims = xn @ q
            top = sims.argsort(descending=True)[:k]
            votes = torch.zeros(10, dtype=torch.float64).index_add_(0, y[top], (sims[top] / 0.07).exp())
            hits += truth in votes.argsort(descending=True)[:min(5, k)].tolist()
        assert got[k]["top5"] == pytest.approx(100 * hits / len(yt), abs=1e-9)
    with pytest.raises(ValueError, match="only 300 training images"):
        eval_knn.weighted_knn(x, y, xt, yt, (20, 301), 0.07)


def test_fewshot_episodes_and_confidence_interval(feats):
    result = eval_knn.fewshot(feats["xt"], feats["yt"], "fixed", 600, seed=3)
    acc = np.array(result["accuracies"])
    assert len(acc) == 600 and result["mean"] == pytest.approx(acc.mean())
    assert result["ci95"] == pytest.approx(1.96 * acc.std() / math.sqrt(600))
    assert result["mean"] > 20 + 5  # 5-way chance is 20%; random-init features measured ~31%
    by_class = [torch.nonzero(feats["yt"] == c).flatten() for c in range(10)]
    g = torch.Generator().manual_seed(0)
    s_idx, s_y, q_idx, q_y = eval_knn.fixed_episode(by_class, 5, 5, 15, g)
    assert len(s_idx) == 25 and len(q_idx) == 75 and not set(s_idx.tolist()) & set(q_idx.tolist())
    assert torch.bincount(s_y).tolist() == [5] * 5 and torch.bincount(q_y).tolist() == [15] * 5
    for _ in range(50):
        s_idx, s_y, q_idx, q_y = eval_knn.variable_episode(by_class, g)
        way = int(s_y.max()) + 1
        assert 5 <= way <= 10 and len(s_idx) <= 500 and torch.bincount(s_y, minlength=way).min() >= 1
        assert len(set(torch.bincount(q_y).tolist())) == 1 and not set(s_idx.tolist()) & set(q_idx.tolist())


# ---------------------------------------------------------------- SVM
def voc_ap_loop(scores, labels):
    """All-point interpolated AP (VOC 2010+), written as the VOC devkit does it."""
    order = np.argsort(-scores)
    tp = np.cumsum(labels[order] == 1)
    fp = np.cumsum(labels[order] == 0)
    rec, prec = tp / max(tp[-1], 1), tp / np.maximum(tp + fp, 1)
    mrec, mpre = np.r_[0, rec, 1], np.r_[0, prec, 0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def test_average_precision_and_folds_match_references():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=(200, 3)), rng.integers(0, 2, (200, 3))
    include = rng.random((200, 3)) > 0.2
    got = eval_svm.average_precision(torch.tensor(scores), torch.tensor(labels == 1), torch.tensor(include))
    for c in range(3):
        assert got[c].item() == pytest.approx(voc_ap_loop(scores[include[:, c], c], labels[include[:, c], c]))
    for first in (0, 1):  # sklearn numbers the classes by first appearance: both cases
        y = rng.integers(0, 2, 101)
        y[0] = first
        ours = eval_svm.stratified_folds(torch.tensor(y == 1), 3).numpy()
        for fold, (_, test) in enumerate(StratifiedKFold(3).split(np.zeros(len(y)), y)):
            assert set(np.flatnonzero(ours == fold)) == set(test)


def test_cross_validation_ap_is_sklearns_scorer():
    """VISSL scores the folds with sklearn's average_precision (not interpolated), ties taken together."""
    rng = np.random.default_rng(1)
    for trial in range(40):
        n = int(rng.integers(3, 80))
        y = rng.integers(0, 2, n)
        y[0] = 1
        s = np.round(rng.normal(size=n), trial % 3)  # 0 and 1 decimals: many ties
        include = rng.random(n) < 0.8
        include[0] = True
        got = eval_svm.average_precision(torch.tensor(s)[:, None], torch.tensor(y == 1)[:, None],
                                         torch.tensor(include)[:, None], interpolated=False)[0].item()
        assert got == pytest.approx(average_precision_score(y[include], s[include]), abs=1e-12)
    # the two APs differ where the interpolation lifts a precision: 1 + (2/3) vs 1 + (1/2) over 2 positives
    s, y = torch.tensor([[3.0], [2.0], [1.0], [0.0]]), torch.tensor([[True], [False], [False], [True]])
    every = torch.ones_like(y)
    assert eval_svm.average_precision(s, y, every, interpolated=False).item() == pytest.approx(0.75)
    assert eval_svm.average_precision(s, y, every).item() == pytest.approx(0.75)
    s2 = torch.tensor([[3.0], [2.0], [1.0], [0.5], [0.0]])
    y2 = torch.tensor([[True], [False], [True], [False], [True]])
    ones = torch.ones_like(y2)
    assert eval_svm.average_precision(s2, y2, ones, interpolated=False).item() == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert eval_svm.average_precision(s2, y2, ones).item() == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_svm_top1_counts_a_class_train_lacks_as_wrong():
    train_classes = torch.tensor([0, 1, 2])
    test_targets, _ = eval_svm.as_targets(torch.tensor([5, 5, 5, 1]), train_classes)
    w = torch.zeros(3, 3)
    w[-1, 0] = 1.0  # every image scores highest on class index 0 (the bias)
    x_test = torch.zeros(4, 2)
    result = eval_svm.evaluate(w, x_test, test_targets == 1, test_targets != -1, True)
    assert result["top1"] == 0.0
    w[-1] = torch.tensor([0.0, 1.0, 0.0])  # now class 1: the last image is right
    assert eval_svm.evaluate(w, x_test, test_targets == 1, test_targets != -1, True)["top1"] == 25.0


def test_squash_keeps_the_whole_image():
    """--squash (VISSL's VOC07 preprocessing): the whole image reaches the trunk; the centre crop loses the sides."""
    from PIL import Image
    pixels = np.zeros((256, 512, 3), dtype=np.uint8)
    pixels[:, :64] = 255  # a white band on the left eighth
    image = Image.fromarray(pixels)
    squashed = features.eval_transform(224, squash=True)(image)
    cropped = features.eval_transform(224)(image)
    assert squashed.shape == cropped.shape == (3, 224, 224)
    white = (1 - torch.tensor(features.MEAN)) / torch.tensor(features.STD)
    assert torch.allclose(squashed[:, :, :20].mean((1, 2)), white, atol=1e-3)  # the band: 224 / 8 = 28 columns
    assert cropped.max() < 0  # the crop of the 448 x 224 resized image starts at column 112: all black


def test_low_shot_draws_are_vissls():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 4  # 15 images of each of 4 classes
    targets, _ = eval_svm.as_targets(labels)
    rows = eval_svm.low_shot_rows(targets, 3, g, single_label=True)
    assert rows.all(1).sum() == 12 and (rows.any(1) == rows.all(1)).all()  # one set of 4 x 3 images for all SVMs
    assert torch.bincount(labels[rows[:, 0]], minlength=4).tolist() == [3] * 4
    assert eval_svm.low_shot_rows(targets, 16, g, single_label=True) is None
    multi = torch.from_numpy(np.random.default_rng(0).choice([1, 0, 0, 0, -1], size=(400, 5)))
    rows = eval_svm.low_shot_rows(multi, 4, g, single_label=False)
    for c in range(5):
        assert (multi[rows[:, c], c] == 1).sum() == 4 and (multi[rows[:, c], c] == 0).sum() == 16
        assert (multi[rows[:, c], c] != -1).all()
    assert eval_svm.low_shot_rows(multi, 60, g, single_label=False) is None  # 4 x 60 negatives: too few


def sklearn_svms(x, targets, c, train_rows=None):
    """One LinearSVC per class (VISSL's settings): weights [D+1, C] with the intercept last."""
    columns = []
    for k in range(targets.shape[1]):
        rows = slice(None) if train_rows is None else train_rows[:, k]
        svm = LinearSVC(C=c, class_weight={1: 2, -1: 1}, loss="squared_hinge", penalty="l2", dual=True,
                        tol=1e-4, max_iter=5000).fit(x[rows], np.where(targets[rows, k] == 1, 1, -1))
        columns.append(np.r_[svm.coef_[0], svm.intercept_])
    return torch.tensor(np.stack(columns, 1), dtype=torch.float32)


def test_svm_matches_sklearn_linearsvc_top1_and_map(feats):
    x = torch.nn.functional.normalize(feats["x"], dim=1)
    xt = torch.nn.functional.normalize(feats["xt"], dim=1)
    targets, _ = eval_svm.as_targets(feats["y"])
    test_targets, _ = eval_svm.as_targets(feats["yt"], torch.unique(feats["y"]))
    w, chosen, _ = eval_svm.sweep(x, targets == 1, torch.ones_like(targets, dtype=torch.bool), (1.0,), 1, 2.0)
    assert chosen.tolist() == [1.0] * 10
    ours = eval_svm.evaluate(w, xt, test_targets == 1, test_targets != -1, True)
    ref = eval_svm.evaluate(sklearn_svms(x.numpy(), targets.numpy(), 1.0), xt, test_targets == 1,
                            test_targets != -1, True)
    assert abs(ours["top1"] - ref["top1"]) <= 0.5 and abs(ours["mAP"] - ref["mAP"]) <= 0.5
    assert ours["top1"] > 20  # random-init features: measured ~33% (chance 10%)

    # multi-label N x C in {1, 0, -1}: a second positive class per image, some difficult labels left out at test
    rng = np.random.default_rng(0)
    def multi(y):
        t = (y[:, None] == torch.arange(10)).long()
        t[torch.arange(len(y)), (y + 1) % 10] = torch.from_numpy((rng.random(len(y)) < 0.5).astype(np.int64))
        t[torch.from_numpy(rng.random(t.shape) < 0.05)] = -1
        return t
    train_ml, test_ml = multi(feats["y"]), multi(feats["yt"])
    rows = train_ml != -1  # --difficult ignore
    w, _, _ = eval_svm.sweep(x, train_ml == 1, rows, (1.0,), 1, 2.0)
    ours = eval_svm.evaluate(w, xt, test_ml == 1, test_ml != -1, False)
    ref = eval_svm.evaluate(sklearn_svms(x.numpy(), train_ml.numpy(), 1.0, rows.numpy()), xt, test_ml == 1,
                            test_ml != -1, False)
    assert abs(ours["mAP"] - ref["mAP"]) <= 0.5


def test_svm_solver_reaches_the_liblinear_objective():
    """The batched Newton-CG solution is at least as good as liblinear's, for every cost of a sweep."""
    rng = np.random.default_rng(1)
    x = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(300, 20)), dtype=torch.float64), dim=1)
    y = torch.tensor(rng.integers(0, 2, 300) == 1)
    costs = (0.01, 1.0, 100.0)
    signs = (y.double() * 2 - 1)[:, None].repeat(1, 3)
    weights = torch.where(y, 2.0, 1.0).double()[:, None].repeat(1, 3)
    w = eval_svm.train_svms(x, signs, weights, torch.tensor(costs, dtype=torch.float64), tol=1e-8)
    x1 = torch.cat([x, torch.ones(300, 1, dtype=torch.float64)], 1)
    for p, c in enumerate(costs):
        ref = LinearSVC(C=c, class_weight={1: 2, 0: 1}, tol=1e-8, max_iter=100000).fit(x.numpy(), y.numpy())
        w_ref = torch.tensor(np.r_[ref.coef_[0], ref.intercept_])
        objective = lambda v: 0.5 * v @ v + c * (weights[:, 0] * (1 - signs[:, 0] * (x1 @ v)).clamp_min(0) ** 2).sum()  # noqa: E731
        assert objective(w[:, p]) <= objective(w_ref) * (1 + 1e-6)


def test_svm_cli_cross_validation_and_low_shot(feats):
    proc = run_script("eval_svm.py", "--features", feats["path"], "--costs", "0.1", "1", "10")
    result = last_json(proc.stdout)
    assert set(result["per_layer"]["pooled"]["chosen_costs"]) <= {0.1, 1.0, 10.0} and result["top1"] > 20
    proc = run_script("eval_svm.py", "--features", feats["path"], "--low-shot", "--low-shot-k", "1", "4",
                      "--low-shot-samples", "2", "--costs", "0.1", "1")
    low = last_json(proc.stdout)["low_shot"]["pooled"]
    for k in ("1", "4"):
        assert low[k]["metric"] == "mAP" and low[k]["cost"] in (0.1, 1.0) and len(low[k]["runs"]) == 2
        assert low[k]["mean"] == pytest.approx(np.mean(low[k]["runs"]), abs=1e-3)
        assert low[k]["std"] == pytest.approx(np.std(low[k]["runs"]), abs=1e-3)
        assert len(low[k]["top1"]["runs"]) == 2
    assert low["4"]["mean"] > low["1"]["mean"]
    proc = run_script("eval_svm.py", "--features", feats["path"], "--low-shot", "--low-shot-k", "2", "500",
                      "--low-shot-samples", "1", "--costs", "1", "--low-shot-cost", "cv")
    low = last_json(proc.stdout)["low_shot"]["pooled"]
    assert list(low) == ["2"] and "cost" not in low["2"] and "k=500 left out" in proc.stderr


# ---------------------------------------------------------------- linear probe
def test_lbfgs_logistic_regression_matches_sklearn(feats):
    mean, std = feats["x"].mean(0), feats["x"].std(0) + 1e-6
    x, xt = (feats["x"] - mean) / std, (feats["xt"] - mean) / std
    w, b = eval_linear.logistic_regression(x, feats["y"], 10, [0.01, 0.1], iters=500)
    for i, c in enumerate((0.01, 0.1)):
        ref = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(x.numpy(), feats["y"].numpy())
        ours = 100 * ((xt @ w[i] + b[i]).argmax(1) == feats["yt"]).float().mean().item()
        assert abs(ours - 100 * ref.score(xt.numpy(), feats["yt"].numpy())) <= 1.0


def test_batched_sgd_probe_matches_sklearn_at_matched_regularisation(feats):
    """SGD on mean CE + wd/2 |W|^2 (bias free) is sklearn's C * sum CE + |W|^2 / 2 with C = 1 / (wd N)."""
    from common import cli
    mean, std = feats["x"].mean(0), feats["x"].std(0) + 1e-6
    x, xt = (feats["x"] - mean) / std, (feats["xt"] - mean) / std
    wd = 1e-2
    args = cli.parse_args(eval_linear.Args, None, ["--epochs", "60", "--batch-size", "100", "--no-batch-norm"])
    everything = torch.zeros(len(x), 1, dtype=torch.bool)
    heads = eval_linear.train_heads(eval_linear.cached_batches({"f": x}, feats["y"], torch.arange(len(x)), everything,
                                                               100, 0, "cpu"),
                                    {"f": x.shape[1]}, 10, args, [0.1, 0.3], [wd, 0.0], len(x) // 100, "cpu")
    ours = eval_linear.head_top1(heads.export("f", 0), xt, feats["yt"])
    ref = LogisticRegression(C=1 / (wd * len(x)), max_iter=5000).fit(x.numpy(), feats["y"].numpy())
    assert abs(ours - 100 * ref.score(xt.numpy(), feats["yt"].numpy())) <= 1.0
    assert len(heads.grid) == 4


def test_linear_cli_protocols_and_saved_head(feats, tmp_path):
    common = ["--features", feats["path"], "--epochs", "5", "--lrs", "0.01", "0.1", "--weight-decays", "0", "1e-4",
              "--layers", "pooled", "res4"]
    result = last_json(run_script("eval_linear.py", *common, "--save-head", tmp_path / "head.pth").stdout)
    assert result["heads"] == 8 and result["layer"] in ("pooled", "res4") and result["folds"] == 5
    assert result["n_val"] == result["n_train"] == 1000 and result["n_fit"] == 800  # 5-fold CV below --cv-below
    assert result["top1"] > 20
    again = last_json(run_script("eval_linear.py", "--features", feats["path"], "--eval-only", "--head",
                                 tmp_path / "head.pth").stdout)
    assert again["top1"] == pytest.approx(result["top1"], abs=1e-6)
    vtab = last_json(run_script("eval_linear.py", *common, "--protocol", "vtab", "--vtab-seeds", "2").stdout)
    assert (vtab["n_fit"], vtab["n_val"], vtab["n_train"]) == (800, 200, 1000) and len(vtab["top1_runs"]) == 2
    frac = last_json(run_script("eval_linear.py", *common, "--protocol", "fraction", "--label-fraction", "0.1").stdout)
    assert frac["n_train"] == 100


def test_label_fraction_takes_the_same_number_from_every_class():
    """As SimCLR's 1% ImageNet list (12-13 images of every class), whatever the class sizes."""
    labels = np.repeat(np.arange(7), [732, 1300, 1300, 900, 1000, 1100, 30])
    rows = eval_linear.label_subset(labels, 0.01, seed=3)
    counts = np.bincount(labels[rows], minlength=7)
    assert len(rows) == 64 and sorted(counts.tolist()) == [9] * 6 + [10] and len(set(rows.tolist())) == 64  # 63.62
    rows = eval_linear.label_subset(labels, 0.1, seed=3)  # 636 = 7 x 90 + 6: six shares of 91, one of 90
    counts = np.bincount(labels[rows])
    assert counts[6] == 30 and set(counts[:6].tolist()) <= {90, 91} and counts[:6].sum() in (545, 546)
    assert np.array_equal(rows, eval_linear.label_subset(labels, 0.1, seed=3))
    assert not np.array_equal(rows, eval_linear.label_subset(labels, 0.1, seed=4))


@pytest.mark.parametrize("batch_size", [24, 7])
def test_precise_bn_running_statistics_are_the_average_of_batch_statistics(tiny_folder, batch_size):
    """bn1 after precise BN = the mean over batches of conv1's per-channel batch mean / unbiased variance
    (float64 truth); the weights and every BN's momentum are untouched and the trunk is left in eval mode."""
    torch.manual_seed(0)
    trunk = models.build_trunk("resnet18")
    for m in trunk.modules():  # stale statistics, as a trunk trained on other inputs would have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(5.0)
    weights = {k: v.clone() for k, v in trunk.state_dict().items() if "running" not in k and "num_batches" not in k}
    dataset = data.build_dataset(str(tiny_folder))
    transform = features.eval_transform(32)
    features.precise_bn(trunk, dataset, transform, 24, batch_size=batch_size, workers=0, seed=3)

    order = torch.randperm(24, generator=torch.Generator().manual_seed(3)).tolist()
    images = torch.stack([transform(dataset[i][0]) for i in order]).double()
    conv = torch.nn.functional.conv2d(images, trunk.conv1.weight.double(), stride=2, padding=3)
    batches = conv.split(batch_size)
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    variances = torch.stack([b.transpose(0, 1).flatten(1).var(dim=1) for b in batches]).mean(0)
    torch.testing.assert_close(trunk.bn1.running_mean.double(), means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trunk.bn1.running_var.double(), variances, rtol=1e-5, atol=1e-5)
    assert not trunk.training and all(m.momentum == 0.1 for m in trunk.modules()
                                      if isinstance(m, torch.nn.BatchNorm2d))
    assert all(torch.equal(v, trunk.state_dict()[k]) for k, v in weights.items())
    assert float(trunk.layer4[1].bn2.running_var.mean()) != 5.0  # the deepest layer was re-estimated too


def test_scripts_from_images_end_to_end_and_bad_input(tiny_folder, tmp_path):
    cached = tmp_path / "tiny.pth"
    base = ["--weights", "random", "--arch", "resnet18", "--image-size", "32", "--workers", "0",
            "--train-data", tiny_folder, "--test-data", tiny_folder]
    proc = run_script("eval_knn.py", *base, "--save-features", cached, "--layers", "pooled", "vissl-res4")
    knn = last_json(proc.stdout)
    assert knn["n_train"] == 24 and features.load_features(cached)["train_features"]["vissl-res4"].shape == (24, 2304)
    assert knn["k"] == 20 and knn["k_left_out"] == [100, 200] and list(knn["per_k"]["pooled"]) == ["10", "20"]
    assert "k=100, 200 left out: only 24 training images." in proc.stderr
    proc = run_script("eval_knn.py", "--features", cached, "--preset", "vissl", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --report-k 200 is more neighbours than the 24 training images.")
    linear = last_json(run_script("eval_linear.py", *base, "--augment", "--epochs", "2", "--batch-size", "8",
                                  "--lrs", "0.1", "--weight-decays", "0", "--val-fraction", "0.25",
                                  "--precise-bn", "16").stdout)
    assert 0 <= linear["top1"] <= 100
    for script, extra in (("eval_svm.py", ["--features", tmp_path / "missing.pth"]),
                          ("eval_linear.py", ["--features", cached, "--protocol", "vtab"]),
                          ("eval_knn.py", ["--features", cached, "--layers", "res2"]),
                          ("eval_knn.py", ["--features", cached, "--precise-bn", "16"])):
        proc = run_script(script, *extra, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_torchrun_extraction_equals_one_process(tiny_folder, tmp_path):
    """Two ranks each encode a strided shard; the gathered cache equals the single-process one, in order."""
    from tests.helpers import run_torchrun
    base = ["--weights", "random", "--arch", "resnet18", "--image-size", "32", "--workers", "0", "--device", "cpu",
            "--train-data", tiny_folder, "--test-data", tiny_folder, "--layers", "pooled", "res3"]
    run_script("eval_knn.py", *base, "--save-features", tmp_path / "one.pth")
    run_torchrun(2, "eval_knn.py", *base, "--save-features", tmp_path / "two.pth")
    one, two = features.load_features(tmp_path / "one.pth"), features.load_features(tmp_path / "two.pth")
    for split in ("train", "test"):
        assert torch.equal(one[f"{split}_labels"], two[f"{split}_labels"])
        for layer in ("pooled", "res3"):
            torch.testing.assert_close(one[f"{split}_features"][layer], two[f"{split}_features"][layer])

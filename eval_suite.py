"""A frozen trunk on a suite of end tasks: VTAB-1k, and pyVTAB's counting, pairs, segmentation and depth.

A suite is a text file with one task per line (`suites/vtab1k.txt` lists VTAB-1k's 19):

    # name        kind            folder           options
    caltech101    classification  caltech101       group=natural
    clevr_count   counting        clevr_count      train=train val=val
    nyu_depth     depth           nyu              image_size=224

`folder` is relative to `--data-root` (default: the suite file's folder). A task folder holds
its splits `train800`, `val200` and `test` (other names with `train=`/`val=`/`test=`), each a
list file `<split>.txt` of whitespace-separated lines with paths relative to the task folder,
or, for classification, an ImageFolder `<split>/<class>/<image>`:

    classification  path label          an integer class
    pairs           path_a path_b label two images (egomotion): their features concatenated
    regression      path value          a number
    counting        path count          an integer >= 0, predicted by regression and rounded
    segmentation    path mask           8-bit PNG of class indices, 255 = ignore
    depth           path depth          .npy float array in metres, or 16-bit PNG / depth_scale; 0 = none

Options: `group=` (the summary's group means, as VTAB's natural / specialized / structured),
`image_size=`, `resize=crop` (eval_linear.py's resize of the short side and centre crop) or
`resize=squash` (the whole image to image_size x image_size, as VTAB does), `depth_scale=`.
A new task is a folder and a line. scripts/vtab_from_tfds.py writes VTAB-1k's folders from
TensorFlow Datasets' files.

Protocol (VTAB-1k, Zhai et al. 2019): the trunk's features of every split are computed once
per task (`encode` item); hyper-parameters are chosen on val by heads trained on train (`sweep`);
the chosen setting is trained again on train + val with each seed and scored on test (`fit`).
Per kind:
- classification and pairs: eval_linear.py's grid of linear heads (BatchNorm -> FC, SGD, cosine,
  lr x weight decay x --layers trained in one pass), exactly its `--protocol vtab`: with the
  train split's rows first and val's next, the numbers are those of `eval_linear.py --features F
  --protocol vtab --vtab-order given`; top-1 (%).
- regression and counting: ridge regression on standardised features in float64, the exact
  minimiser for each of --ridge-lambdas (chosen on val: MAE, or the rounded count's accuracy);
  it has no randomness, so one fit. Metrics: MAE, and for counting the accuracy (%) of
  floor(prediction + 0.5).
- segmentation and depth (pyVTAB's pixelwise tasks): a small convolutional decoder on three
  feature maps of the trunk, the res3, res4 and res5 maps of a ResNet (RegNet and ConvNeXt:
  stage2-stage4; a ViT: its patch tokens after a third, two thirds and all of its blocks):
  1x1 projections to --decoder-width channels, upsampled to the finest grid and summed, 3x3
  conv-BN-ReLU, 1x1 to the outputs, bilinear to the image; AdamW over --dense-lrs for
  --dense-epochs with a cosine schedule; images and targets resized to image_size x image_size
  (bilinear / nearest). Segmentation: cross-entropy, mIoU
  (%, IoU of each class summed over the split, mean over classes that occur) and pixel accuracy;
  depth: the decoder predicts log depth (squared error over measured pixels), metrics RMSE,
  abs rel and delta1 (%, max(p/g, g/p) < 1.25) over every measured pixel of the split.
  pyVTAB hands its pixelwise heads five maps (the stem's and the four stages'); this decoder
  takes the three deepest, and like every task here chooses its setting on val before the
  seeded fits on train + val.

Runners. Every item is a file in `--work-dir` (common/workarea.py): any number of runners
share it, on one machine or many (a shared directory; a SLURM array runs the same command in
every task), and take items without collisions; a killed runner's item is taken again once its
heartbeat is stale (at once on the same machine); re-running the command resumes. The first
command fixes the evaluation (weights, suite, settings) in `plan.json`; other runners need only
`--work-dir`.

    python eval_suite.py --weights ckpt.pth --suite vtab1k --data-root /data/vtab-1k --work-dir work/vtab
    python eval_suite.py --work-dir work/vtab --device cuda:1          # a second runner
    python eval_suite.py --work-dir work/vtab --summary                # the table, and summary.json
"""
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import eval_linear
from common import checkpoint, cli, data, dist, features, models, workarea

ROOT = Path(__file__).resolve().parent
KINDS = ("classification", "pairs", "regression", "counting", "segmentation", "depth")
IMAGE_LEVEL = ("classification", "pairs", "regression", "counting")
OPTIONS = ("train", "val", "test", "group", "image_size", "resize", "depth_scale")
DENSE_MAPS = ("fine", "middle", "coarse")
IGNORE = 255


@dataclass
class Args:
    weights: str = field(default="", metadata={"help": "checkpoint (any format) or 'random'; fixed by the first "
                                                       "command on a work dir"})
    arch: str = ""
    cifar_stem: bool = None
    state_dict_key: str = ""
    remove_prefix: str = ""
    append_prefix: str = ""
    suite: str = field(default="", metadata={"help": "a suite file, or a name from suites/ (vtab1k)"})
    data_root: str = field(default="", metadata={"help": "the task folders' root (default: the suite file's folder)"})
    work_dir: str = field(default="", metadata={"help": "the work area every runner of this evaluation shares"})
    summary: bool = False  # print the table of what is finished and write summary.json, then stop
    seeds: int = 5  # seeds of every fit on train + val (ridge regression is exact: one fit)
    layers: tuple[str, ...] = ("pooled",)  # image-level taps swept by the linear heads
    image_size: int = field(default=0, metadata={"help": "crop size (0: the checkpoint's crop size, else 224); a "
                                                         "task's image_size= overrides it"})
    precise_bn: int = field(default=0, metadata={"help": "re-estimate BatchNorm statistics on this many of a "
                                                          "task's training images before encoding it (0: off)"})
    epochs: int = 100  # linear heads
    batch_size: int = 256  # linear heads, and encoding
    lrs: tuple[float, ...] = eval_linear.DINOV2_LRS  # linear heads, for a batch of 256
    weight_decays: tuple[float, ...] = (0.0, 1e-5, 1e-4, 5e-4, 1e-3, 1e-2, 0.1)  # linear heads
    ridge_lambdas: tuple[float, ...] = tuple(float(f"{x:.3g}") for x in np.logspace(-6, 2, 17))  # ridge penalties
    decoder_width: int = 64  # channels of the dense decoder
    dense_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # AdamW learning rates swept for dense tasks
    dense_epochs: int = 40  # epochs of every decoder (sweep and fits)
    dense_batch_size: int = 32  # maps per decoder step
    save_predictions: bool = False  # keep every fit's test predictions in <work-dir>/predictions/
    workers: int = 4  # data loading, per runner
    device: str = "auto"  # per runner: cpu, cuda, cuda:N
    precision: str = field(default="auto", metadata={"choices": ["auto", "fp32", "bf16", "fp16"]})
    heartbeat: float = 30.0  # seconds between a runner's heartbeats on its item
    stale_after: float = 300.0  # a claim without a heartbeat this long is taken again
    poll: float = 10.0  # seconds a runner waits for items that other runners hold
    output: str = ""  # --summary: also write the JSON here


RUNNER_ONLY = ("work_dir", "summary", "workers", "device", "heartbeat", "stale_after", "poll", "output")


# ---------------------------------------------------------------- the suite: tasks are data files
def read_suite(path, data_root=""):
    """[{name, kind, folder, train, val, test, group, image_size, depth_scale}] from a suite file.

    `path` is a file or the name of one in suites/. Anything that does not fit is one sentence
    naming the file and line.
    """
    if path and not Path(path).exists() and re.fullmatch(r"[A-Za-z0-9_-]+", path) and \
            (ROOT / "suites" / f"{path}.txt").is_file():
        if not data_root:
            raise ValueError(f"--suite {path} lists task folders by name: give --data-root, the folder that "
                             f"holds them.")
        path = ROOT / "suites" / f"{path}.txt"
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"suite {path} does not exist (a suite file, or one of: "
                         f"{', '.join(p.stem for p in sorted((ROOT / 'suites').glob('*.txt')))}).")
    root = Path(data_root) if data_root else path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"suite {path} is not a UTF-8 text file.") from None
    tasks = []
    for line_no, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{path}:{line_no}"
        if len(fields) < 3:
            raise ValueError(f"{where}: expected 'name kind folder [key=value ...]', got {line.strip()[:200]!r}.")
        name, kind, folder = fields[:3]
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", name):
            raise ValueError(f"{where}: a task name is letters, digits, '_' and '-', got {name!r}.")
        if kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {kind!r}; choose from {', '.join(KINDS)}.")
        if name in (t["name"] for t in tasks):
            raise ValueError(f"{where}: task {name!r} is listed twice.")
        task = {"name": name, "kind": kind, "folder": str((root / folder).resolve()), "train": "train800",
                "val": "val200", "test": "test", "group": "", "image_size": 0, "resize": "crop",
                "depth_scale": 1000.0}
        for option in fields[3:]:
            key, _, value = option.partition("=")
            if key not in OPTIONS or not value:
                raise ValueError(f"{where}: unknown option {option!r}; options are "
                                 f"{', '.join(o + '=' for o in OPTIONS)}.")
            try:
                task[key] = int(value) if key == "image_size" else float(value) if key == "depth_scale" else value
            except ValueError:
                raise ValueError(f"{where}: {key}= needs a number, got {value!r}.") from None
        if task["image_size"] < 0 or task["depth_scale"] <= 0 or task["resize"] not in ("crop", "squash"):
            raise ValueError(f"{where}: image_size= must be >= 0, depth_scale= > 0 and resize= crop or squash.")
        if not Path(task["folder"]).is_dir():
            raise ValueError(f"{where}: task {name}'s folder {task['folder']} does not exist.")
        tasks.append(task)
    if not tasks:
        raise ValueError(f"suite {path} lists no tasks.")
    return tasks


def read_split(task, split):
    """A dataset of the task's split: (PIL image, target) for image-level kinds, or (paths, targets) lists.

    Returns (kind-specific examples, description). Classification reads an ImageFolder or a
    file list through common/data.py; the other kinds' list files are read here, line by line.
    """
    folder, name = Path(task["folder"]), task[split]
    listed = folder / f"{name}.txt"
    if task["kind"] == "classification":
        if listed.is_file():
            return data.build_dataset(str(listed))
        if (folder / name).is_dir():
            return data.build_dataset(str(folder / name))
        raise ValueError(f"task {task['name']} has no {split} split: neither {listed} nor the folder "
                         f"{folder / name} exists.")
    if not listed.is_file():
        raise ValueError(f"task {task['name']} has no {split} split: {listed} does not exist.")
    width = 3 if task["kind"] == "pairs" else 2
    rows = []
    for line_no, line in enumerate(listed.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != width or "\x00" in line:
            raise ValueError(f"{listed}:{line_no}: a {task['kind']} line is "
                             f"{'path_a path_b label' if width == 3 else 'path ' + _target_name(task['kind'])}, "
                             f"got {line.strip()[:200]!r}.")
        paths = [str(folder / f) for f in fields[:width - 1]] if task["kind"] != "segmentation" and \
            task["kind"] != "depth" else [str(folder / fields[0])]
        target = fields[-1]
        try:
            if task["kind"] in ("pairs", "counting"):
                target = int(target)
                assert 0 <= target < 10**6
            elif task["kind"] == "regression":
                target = float(target)
                assert math.isfinite(target)
            else:
                target = str(folder / target)
        except (ValueError, AssertionError):
            raise ValueError(f"{listed}:{line_no}: the {_target_name(task['kind'])} must be "
                             f"{'an integer in [0, 10^6)' if task['kind'] != 'regression' else 'a finite number'}"
                             f", got {fields[-1][:50]!r}.") from None
        rows.append((paths, target))
    if not rows:
        raise ValueError(f"{listed} lists no examples.")
    return rows


def check_files(task, split, examples):
    """One sentence if a file a split lists does not exist."""
    if isinstance(examples, list):
        paths = [p for paths, target in examples for p in paths + ([target] if isinstance(target, str) else [])]
    else:
        paths = getattr(examples, "paths", [])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"task {task['name']}: {len(missing)} of the {len(paths)} files its {task[split]} split "
                         f"lists do not exist, e.g. {missing[0]}.")


def _target_name(kind):
    return {"pairs": "label", "regression": "value", "counting": "count", "segmentation": "mask",
            "depth": "depth"}.get(kind, "label")


# ---------------------------------------------------------------- encoding: features once per task
def load_trunk(plan):
    torch.manual_seed(0)
    trunk, info = features.load_trunk(plan["weights"], plan["arch"] or None, plan["cifar_stem"],
                                      plan["state_dict_key"] or None, plan["remove_prefix"] or None,
                                      plan["append_prefix"] or None)
    return trunk, info


def encode(task, plan, device, workers):
    """{split: {"features": {layer: [N, D]} or {stage: [N, C, h, w]}, "targets": ...}} and the meta."""
    trunk, info = load_trunk(plan)
    size = task["image_size"] or plan["image_size"] or info.get("train_crop_size", 224)
    kind, precision = task["kind"], plan["precision"]
    splits = {split: read_split(task, split) for split in ("train", "val", "test")}
    transform = features.eval_transform(size) if task["resize"] == "crop" else \
        T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                   T.Normalize(features.MEAN, features.STD)])
    kw = dict(batch_size=plan["batch_size"], workers=workers, device=device, precision=precision)
    if plan["precise_bn"]:
        first = splits["train"] if kind == "classification" else \
            data.ImageFiles([paths[0] for paths, _ in splits["train"]], [0] * len(splits["train"]), ["0"])
        features.precise_bn(trunk, first, transform, plan["precise_bn"], seed=0, **kw)
    out = {}
    for split, rows in splits.items():
        if kind == "classification":
            feats, labels = features.extract(trunk, rows, plan["layers"], transform, **kw)
            if labels.dim() != 1 or bool((labels < 0).any()):
                raise ValueError(f"task {task['name']}'s {split} split has images without one class label.")
            out[split] = {"features": feats, "targets": labels}
        elif kind in IMAGE_LEVEL:
            dtype = torch.float64 if kind == "regression" else torch.int64
            targets = torch.tensor([t for _, t in rows], dtype=dtype)
            parts = []
            for i in range(len(rows[0][0])):  # pairs: each image of the pair, then concatenated
                images = data.ImageFiles([paths[i] for paths, _ in rows], [0] * len(rows), ["0"])
                parts.append(features.extract(trunk, images, plan["layers"], transform, **kw)[0])
            out[split] = {"features": {k: torch.cat([p[k] for p in parts], 1) for k in plan["layers"]},
                          "targets": targets}
        else:
            out[split] = dense_maps(trunk, rows, task, size, device, precision, plan["batch_size"])
    return out, {"image_size": size, "arch": trunk.arch, "missing_keys": info.get("missing_keys", [])}


class _DenseExamples(torch.utils.data.Dataset):
    """(image resized to size x size and normalised, target resized by nearest neighbour) of a dense task."""

    def __init__(self, rows, task, size):
        self.images = data.ImageFiles([paths[0] for paths, _ in rows], [0] * len(rows), ["0"])
        self.targets, self.task, self.size = [target for _, target in rows], task, size

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = self.images[index][0].resize((self.size, self.size), Image.BILINEAR)
        target_path = self.targets[index]
        image = features.normalised(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None])[0]
        target = read_target(target_path, self.task)
        target = F.interpolate(target[None, None].float(), size=(self.size, self.size), mode="nearest")[0, 0]
        return image, target.to(torch.uint8 if self.task["kind"] == "segmentation" else torch.float32)


def read_target(path, task):
    """A segmentation mask (uint8 [H, W]) or a depth map (float [H, W] in metres) from a file a user gave."""
    where = f"task {task['name']}: {path}"
    if task["kind"] == "depth" and path.endswith(".npy"):
        try:
            depth = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{where} is not a readable .npy array ({type(e).__name__}).") from None
        if depth.ndim != 2 or depth.dtype.kind not in "fiu" or not np.isfinite(depth).all() or (depth < 0).any():
            raise ValueError(f"{where} must be a 2-d array of finite depths >= 0 (0: not measured).")
        return torch.from_numpy(depth.astype(np.float32))
    try:
        with Image.open(path) as img:
            array = np.asarray(img)
    except Exception as e:
        raise ValueError(f"{where} is not a readable image ({type(e).__name__}).") from None
    if array.ndim != 2:
        what = "class indices" if task["kind"] == "segmentation" else "16-bit depth"
        raise ValueError(f"{where} must be a single-channel image ({what}), got shape {array.shape}.")
    if task["kind"] == "segmentation":
        if array.dtype != np.uint8:
            raise ValueError(f"{where} must be an 8-bit mask of class indices (255: ignore), got {array.dtype}.")
        return torch.from_numpy(array.copy())
    return torch.from_numpy(array.astype(np.float32) / task["depth_scale"])


@torch.no_grad()
def dense_maps(trunk, rows, task, size, device, precision, batch_size):
    """{"features": {fine/middle/coarse: fp16 [N, C, h, w]}, "targets": [N, size, size]} of a dense task's split:
    common/models.py's feature_maps (ResNet res3-res5, RegNet and ConvNeXt stage2-stage4, a ViT's patch tokens
    after a third, two thirds and all of its blocks)."""
    loader = torch.utils.data.DataLoader(_DenseExamples(rows, task, size), batch_size=batch_size)
    trunk = trunk.to(device).eval()
    device = torch.device(device)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    maps, targets = {s: [] for s in DENSE_MAPS}, []
    for images, target in loader:
        with dist.autocast(device, precision):
            for name, fmap in zip(DENSE_MAPS, models.feature_maps(trunk, images.to(device))):
                maps[name].append(fmap.half().cpu())
        targets.append(target)
    return {"features": {k: torch.cat(v) for k, v in maps.items()}, "targets": torch.cat(targets)}


# ---------------------------------------------------------------- classification and pairs: linear heads
def linear_setup(feats, plan, layers, device):
    """train + val rows (train first) on `device`, class indices, the val mask, and the BatchNorm statistics of
    all rows."""
    x = {k: torch.cat([feats["train"]["features"][k], feats["val"]["features"][k]]).float().to(device)
         for k in layers}
    raw = torch.cat([feats["train"]["targets"], feats["val"]["targets"]])
    classes = torch.unique(raw)
    y = torch.searchsorted(classes, raw).to(device)
    held_out = (torch.arange(len(y)) >= len(feats["train"]["targets"]))[:, None].to(device)
    stats = {k: (v.mean(0), v.var(0, unbiased=False)) for k, v in x.items()}
    hp = SimpleNamespace(epochs=plan["epochs"], batch_size=plan["batch_size"], batch_norm=True, momentum=0.9)
    return x, y, classes, held_out, stats, hp


def linear_sweep(feats, plan, device):
    """Every head of lrs x weight decays x layers trained on train (seed 0), chosen on val: eval_linear's choice."""
    layers = plan["layers"]
    x, y, classes, held_out, stats, hp = linear_setup(feats, plan, layers, device)
    rows, steps = torch.arange(len(y)), max(math.ceil(len(y) / hp.batch_size), 1)
    heads = eval_linear.train_heads(eval_linear.cached_batches(x, y, rows, held_out, hp.batch_size, 0, device),
                                    {k: v.shape[1] for k, v in x.items()}, len(classes), hp, plan["lrs"],
                                    plan["weight_decays"], steps, device, 0, 1, stats)
    counts = torch.stack([(heads.correct(k, x[k], y) & held_out[:, :, None]).sum((0, 1)) for k in layers]).tolist()
    best_layer, best_head = eval_linear.choose(counts, heads.grid, layers)
    lr, wd = heads.grid[best_head]
    return {"layer": layers[best_layer], "lr": lr, "weight_decay": wd,
            "val": round(100 * counts[best_layer][best_head] / int(held_out.sum()), 3), "val_metric": "top1"}


def linear_fit(feats, plan, chosen, seed, device):
    """The chosen head trained on train + val with `seed` (eval_linear's refit), scored on test."""
    layer = chosen["layer"]
    x, y, classes, _, stats, hp = linear_setup(feats, plan, [layer], device)
    everything = torch.zeros(len(y), 1, dtype=torch.bool)
    steps = max(math.ceil(len(y) / hp.batch_size), 1)
    head = eval_linear.train_heads(eval_linear.cached_batches(x, y, torch.arange(len(y)), everything,
                                                              hp.batch_size, seed, device),
                                   {layer: x[layer].shape[1]}, len(classes), hp, [chosen["lr"]],
                                   [chosen["weight_decay"]], steps, device, seed, 1, stats).export(layer, 0)
    test_x, raw = feats["test"]["features"][layer].float(), feats["test"]["targets"]
    test_y = torch.searchsorted(classes, raw).clamp_max(len(classes) - 1)
    test_y[~torch.isin(raw, classes)] = -1  # classes never seen in train + val are never right
    xn = (test_x - head["mean"]) / torch.sqrt(head["var"] + 1e-5)  # eval_linear.head_top1's prediction
    predicted = (xn @ head["weight"] + head["bias"]).argmax(1)
    top1 = 100 * (predicted == test_y).float().mean().item() if len(test_y) else 0.0
    return {"top1": round(top1, 4)}, classes[predicted]


# ---------------------------------------------------------------- regression and counting: ridge
def ridge_paths(x, y, lambdas):
    """Ridge weights [L, D] and intercepts [L] minimising mean (x w + b - y)^2 + lambda |w|^2, all lambdas at once.

    float64; one eigendecomposition of the centred x^T x / n serves every lambda.
    """
    n = len(x)
    xm, ym = x.mean(0), y.mean()
    xc = x - xm
    evals, evecs = torch.linalg.eigh(xc.T @ xc / n)
    proj = evecs.T @ (xc.T @ (y - ym) / n)
    lam = torch.as_tensor(lambdas, dtype=x.dtype)
    w = (evecs[None] * (1 / (evals.clamp_min(0)[None] + lam[:, None]))[:, None, :]) @ proj
    return w, ym - w @ xm


def ridge_metrics(pred, target, kind):
    """{"mae"} and for counting {"count_accuracy"}: the percent of floor(pred + 0.5) equal to the count."""
    out = {"mae": float((pred - target).abs().mean())}
    if kind == "counting":
        out["count_accuracy"] = float(100 * (torch.floor(pred + 0.5) == target).double().mean())
    return out


def ridge_setup(feats, layer):
    x = torch.cat([feats["train"]["features"][layer], feats["val"]["features"][layer]]).double()
    y = torch.cat([feats["train"]["targets"], feats["val"]["targets"]]).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # standardised with the statistics of train + val
    return (x - mean) / std, y, mean, std


def ridge_sweep(feats, plan, kind):
    """Each layer x lambda fit on train, chosen on val (counting: the rounded accuracy, then MAE; else MAE)."""
    n_train, best = len(feats["train"]["targets"]), None
    for layer in plan["layers"]:
        x, y, _, _ = ridge_setup(feats, layer)
        w, b = ridge_paths(x[:n_train], y[:n_train], plan["ridge_lambdas"])
        for lam, wi, bi in zip(plan["ridge_lambdas"], w, b):  # lambdas ascend: ties go to the larger one
            m = ridge_metrics(x[n_train:] @ wi + bi, y[n_train:], kind)
            key = (m.get("count_accuracy", 0.0), -m["mae"])
            if best is None or key >= best[0]:
                best = (key, {"layer": layer, "lambda": lam, **{f"val_{k}": round(v, 6) for k, v in m.items()}})
    chosen = best[1]
    metric = "count_accuracy" if kind == "counting" else "mae"
    return {**chosen, "val": chosen[f"val_{metric}"], "val_metric": metric}


def ridge_fit(feats, chosen, kind):
    x, y, mean, std = ridge_setup(feats, chosen["layer"])
    w, b = ridge_paths(x, y, [chosen["lambda"]])
    test_x = (feats["test"]["features"][chosen["layer"]].double() - mean) / std
    pred = test_x @ w[0] + b[0]
    return {k: round(v, 6) for k, v in ridge_metrics(pred, feats["test"]["targets"].double(), kind).items()}, pred


# ---------------------------------------------------------------- segmentation and depth: a small decoder
class Decoder(nn.Module):
    """Three maps -> 1x1 projections, upsampled to the finest grid and summed -> 3x3 conv-BN-ReLU -> 1x1 ->
    bilinear to the image size."""

    def __init__(self, channels, outputs, width):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.Conv2d(width, outputs, 1))

    def forward(self, maps, size):
        grid = maps[0].shape[-2:]
        x = sum(F.interpolate(lat(m.float()), size=grid, mode="bilinear", align_corners=False)
                for lat, m in zip(self.lateral, maps))
        return F.interpolate(self.fuse(x), size=size, mode="bilinear", align_corners=False)


def n_seg_classes(feats):
    labels = torch.cat([feats[s]["targets"].flatten() for s in ("train", "val")])
    labels = labels[labels != IGNORE]
    if not len(labels):
        raise ValueError("a segmentation task's train and val masks are all 'ignore' (255).")
    return int(labels.max()) + 1


def train_decoder(maps, targets, kind, n_out, lr, plan, seed, device):
    """AdamW (wd 1e-4) with a per-step cosine schedule over plan['dense_epochs'] on cached maps."""
    torch.manual_seed(seed)
    decoder = Decoder([maps[s].shape[1] for s in DENSE_MAPS], n_out, plan["decoder_width"]).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=1e-4)
    n, bs = len(targets), plan["dense_batch_size"]
    steps_per_epoch = max(math.ceil(n / bs), 1)
    total, step = plan["dense_epochs"] * steps_per_epoch, 0
    for epoch in range(plan["dense_epochs"]):
        for chunk in eval_linear.epoch_batches(n, bs, seed, epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            out = decoder([maps[s][chunk].to(device) for s in DENSE_MAPS], targets.shape[-2:])
            loss = dense_loss(out, targets[chunk].to(device), kind)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return decoder.eval()


def dense_loss(out, target, kind):
    if kind == "segmentation":
        return F.cross_entropy(out, target.long(), ignore_index=IGNORE)
    valid = target > 0
    if not valid.any():
        return out.sum() * 0
    return (out[:, 0][valid] - target[valid].log()).pow(2).mean()


@torch.no_grad()
def dense_predict(decoder, maps, size, kind, device, batch_size=64):
    preds = []
    for i in range(0, len(maps[DENSE_MAPS[0]]), batch_size):
        out = decoder([maps[s][i:i + batch_size].to(device) for s in DENSE_MAPS], size)
        preds.append((out.argmax(1).to(torch.uint8) if kind == "segmentation" else out[:, 0].exp()).cpu())
    return torch.cat(preds)


def dense_metrics(pred, target, kind, n_classes=0):
    """Segmentation: mIoU and pixel accuracy (%) over the split; depth: RMSE, abs rel and delta1 (%) over the
    measured pixels."""
    if kind == "segmentation":
        valid = target != IGNORE
        t, p = target[valid].long(), pred[valid].long()
        n_classes = max(n_classes, int(t.max()) + 1 if len(t) else 0, int(p.max()) + 1 if len(p) else 0)
        confusion = torch.bincount(t * n_classes + p, minlength=n_classes * n_classes).view(
            n_classes, n_classes).double()  # rows: truth, columns: prediction
        right = torch.diag(confusion)
        union = confusion.sum(0) + confusion.sum(1) - right
        iou = right[union > 0] / union[union > 0]
        return {"miou": float(100 * iou.mean()), "pixel_accuracy": float(100 * right.sum() / max(len(t), 1))}
    valid = target > 0
    p, g = pred[valid].double(), target[valid].double()
    ratio = torch.maximum(p.clamp_min(1e-6) / g, g / p.clamp_min(1e-6))
    return {"rmse": float((p - g).pow(2).mean().sqrt()), "abs_rel": float(((p - g).abs() / g).mean()),
            "delta1": float(100 * (ratio < 1.25).double().mean())}


def dense_split(feats, names):
    maps = {s: torch.cat([feats[n]["features"][s] for n in names]) for s in DENSE_MAPS}
    return maps, torch.cat([feats[n]["targets"] for n in names])


def dense_sweep(feats, plan, kind, device):
    """One decoder per lr trained on train (seed 0), chosen on val (mIoU, or RMSE for depth)."""
    n_out = n_seg_classes(feats) if kind == "segmentation" else 1
    maps, targets = dense_split(feats, ["train"])
    val_maps, val_targets = dense_split(feats, ["val"])
    metric = "miou" if kind == "segmentation" else "rmse"
    best = None
    for lr in plan["dense_lrs"]:
        decoder = train_decoder(maps, targets, kind, n_out, lr, plan, 0, device)
        m = dense_metrics(dense_predict(decoder, val_maps, val_targets.shape[-2:], kind, device), val_targets,
                          kind, n_out)
        key = m[metric] if kind == "segmentation" else -m[metric]
        if best is None or key > best[0]:
            best = (key, {"lr": lr, "outputs": n_out, **{f"val_{k}": round(v, 6) for k, v in m.items()}})
    return {**best[1], "val": best[1][f"val_{metric}"], "val_metric": metric}


def dense_fit(feats, plan, chosen, kind, seed, device):
    maps, targets = dense_split(feats, ["train", "val"])
    decoder = train_decoder(maps, targets, kind, chosen["outputs"], chosen["lr"], plan, seed, device)
    test_maps, test_targets = dense_split(feats, ["test"])
    pred = dense_predict(decoder, test_maps, test_targets.shape[-2:], kind, device)
    return {k: round(v, 6) for k, v in dense_metrics(pred, test_targets, kind, chosen["outputs"]).items()}, pred


# ---------------------------------------------------------------- work items
METRIC = {"classification": "top1", "pairs": "top1", "regression": "mae", "counting": "count_accuracy",
          "segmentation": "miou", "depth": "rmse"}


def plan_items(plan):
    """(items in the order runners take them, needs(item)): encode -> sweep -> fit per seed, task by task."""
    items, needs = [], {}
    for task in plan["tasks"]:
        name = task["name"]
        seeds = 1 if task["kind"] in ("regression", "counting") else plan["seeds"]
        fits = [f"fit.{name}.seed{s}" for s in range(seeds)]
        items += [f"encode.{name}", f"sweep.{name}", *fits]
        needs[f"encode.{name}"], needs[f"sweep.{name}"] = [], [f"encode.{name}"]
        needs.update({f: [f"sweep.{name}"] for f in fits})
    return items, needs


class Runner:
    """Does one item of the plan: its features, sweep or fit. Keeps the last task's features in memory."""

    def __init__(self, plan, area, device, workers):
        self.plan, self.area, self.device, self.workers = plan, area, device, workers
        self.tasks = {t["name"]: t for t in plan["tasks"]}
        self.cached = (None, None)

    def features(self, name):
        if self.cached[0] != name:
            self.cached = (name, checkpoint.load(self.area.root / "features" / f"{name}.pth", trusted=False))
        return self.cached[1]["splits"]

    def __call__(self, item):
        step, name, *seed = item.split(".")
        task = self.tasks[name]
        kind = task["kind"]
        if step == "encode":
            splits, meta = encode(task, self.plan, self.device, self.workers)
            (self.area.root / "features").mkdir(exist_ok=True)
            checkpoint.save_atomic({"splits": splits, "meta": meta}, self.area.root / "features" / f"{name}.pth")
            self.cached = (None, None)
            return {**meta, **{f"n_{s}": len(v["targets"]) for s, v in splits.items()}}
        feats = self.features(name)
        if step == "sweep":
            if kind in ("classification", "pairs"):
                return linear_sweep(feats, self.plan, self.device)
            if kind in ("regression", "counting"):
                return ridge_sweep(feats, self.plan, kind)
            return dense_sweep(feats, self.plan, kind, self.device)
        seed = int(seed[0].removeprefix("seed"))
        chosen = self.area.result(f"sweep.{name}")
        if kind in ("classification", "pairs"):
            metrics, pred = linear_fit(feats, self.plan, chosen, seed, self.device)
        elif kind in ("regression", "counting"):
            metrics, pred = ridge_fit(feats, chosen, kind)
        else:
            metrics, pred = dense_fit(feats, self.plan, chosen, kind, seed, self.device)
        if self.plan["save_predictions"]:
            (self.area.root / "predictions").mkdir(exist_ok=True)
            checkpoint.save_atomic({"prediction": pred.cpu(), "target": feats["test"]["targets"]},
                                   self.area.root / "predictions" / f"{item}.pth")
        return {"seed": seed, "metrics": metrics}


# ---------------------------------------------------------------- the plan, and the summary
def make_plan(args):
    if not args.weights or not args.suite:
        raise ValueError("a new evaluation needs --weights and --suite (other runners of it need only --work-dir).")
    if args.seeds < 1 or args.epochs < 1 or args.dense_epochs < 1 or not args.lrs or not args.weight_decays or \
            not args.ridge_lambdas or not args.dense_lrs or not args.layers:
        raise ValueError("--seeds, --epochs and --dense-epochs must be positive and the sweeps' lists non-empty.")
    if args.weights != "random" and not Path(args.weights).is_file():
        raise ValueError(f"checkpoint {args.weights} does not exist.")
    plan = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k not in RUNNER_ONLY}
    plan.pop("preset", None)
    plan["weights"] = args.weights if args.weights == "random" else str(Path(args.weights).resolve())
    plan["tasks"] = read_suite(args.suite, args.data_root)
    for task in plan["tasks"]:  # every split is read now: a bad line or a missing file stops the start, not a runner
        for split in ("train", "val", "test"):
            check_files(task, split, read_split(task, split))
    plan["suite"] = str(args.suite)
    return plan


def open_plan(args, work_dir):
    """The plan of `work_dir`: written by the first command (exclusively), read and checked by the others."""
    path = work_dir / "plan.json"
    given = bool(args.weights or args.suite)
    plan = make_plan(args) if given else None  # the suite and every file it lists are read once
    if not path.exists():
        if not given:
            raise ValueError(f"{work_dir} holds no evaluation: start one with --weights and --suite.")
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = work_dir / f".plan.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(plan, indent=1) + "\n")
        try:
            os.link(tmp, path)  # the first of several runners started at once fixes the plan
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        stored = json.loads(path.read_text())
        assert isinstance(stored, dict) and isinstance(stored.get("tasks"), list)
    except (ValueError, AssertionError):
        raise ValueError(f"{path} is not a plan written by eval_suite.py.") from None
    if given and plan != stored:
        raise ValueError(f"{work_dir} holds another evaluation (other weights, suite or settings, see its "
                         f"plan.json): use a new --work-dir, or only --work-dir to join it.")
    return stored


def summarise(plan, area):
    """{"tasks": [{task, kind, metric, mean, std, n, chosen, ...}], "states": {...}, "mean_top1", groups}."""
    items, needs = plan_items(plan)
    states = area.states(items, needs.__getitem__)
    finished = area.finished()
    rows = []
    for task in plan["tasks"]:
        name, kind = task["name"], task["kind"]
        metric = METRIC[kind]
        fits = [area.result(i) for i in items if i.startswith(f"fit.{name}.") and i in finished]
        values = [f["metrics"][metric] for f in fits]
        sweep = area.result(f"sweep.{name}") if f"sweep.{name}" in finished else None
        row = {"task": name, "kind": kind, "group": task["group"], "metric": metric,
               "mean": round(float(np.mean(values)), 4) if values else None,
               "std": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else 0.0 if values else None,
               "n": len(values), "of": sum(1 for i in items if i.startswith(f"fit.{name}.")),
               "chosen": {k: v for k, v in (sweep or {}).items() if k not in ("item", "runner")} or None,
               "metrics": {k: round(float(np.mean([f["metrics"][k] for f in fits])), 4) for k in
                           (fits[0]["metrics"] if fits else {})}}
        rows.append(row)
    counts = {s: sum(1 for v in states.values() if v == s) for s in workarea.STATES}
    complete = [r for r in rows if r["n"] == r["of"] and r["metric"] in ("top1", "count_accuracy")]
    out = {"weights": plan["weights"], "suite": plan["suite"], "tasks": rows, "states": counts,
           "complete": counts["finished"] == len(items),
           "mean_top1": round(float(np.mean([r["mean"] for r in complete])), 4) if complete else None,
           "mean_top1_tasks": len(complete)}
    groups = sorted({r["group"] for r in complete if r["group"]})
    if groups:
        out["group_mean_top1"] = {g: round(float(np.mean([r["mean"] for r in complete if r["group"] == g])), 4)
                                  for g in groups}
    crashed = area.crashed()
    if crashed:
        out["crashed"] = {k: v for k, v in crashed.items() if states.get(k) == "crashed"}
    return out


def table(summary):
    lines = [f"{'task':<24} {'kind':<15} {'metric':<15} {'mean ± std':>17} {'seeds':>6}  chosen"]
    for r in summary["tasks"]:
        value = f"{r['mean']:.2f} ± {r['std']:.2f}" if r["mean"] is not None else "-"
        chosen = r["chosen"] or {}
        shown = " ".join(f"{k}={v}" for k, v in chosen.items() if k in ("layer", "lr", "weight_decay", "lambda"))
        lines.append(f"{r['task']:<24} {r['kind']:<15} {r['metric']:<15} {value:>17} {r['n']:>3}/{r['of']:<2}  "
                     f"{shown}")
    if summary["mean_top1"] is not None:
        lines.append(f"mean top-1 over {summary['mean_top1_tasks']} complete classification/counting tasks: "
                     f"{summary['mean_top1']:.2f}")
    for g, v in summary.get("group_mean_top1", {}).items():
        lines.append(f"  {g}: {v:.2f}")
    lines.append("items: " + ", ".join(f"{n} {s}" for s, n in summary["states"].items()))
    for item, error in summary.get("crashed", {}).items():
        lines.append(f"crashed: {item}: {error}")
    return "\n".join(lines)


def main(argv=None):
    args = cli.parse_args(Args, None, argv, description=__doc__.split("\n")[0])
    if not args.work_dir:
        raise ValueError("--work-dir is required: the folder every runner of this evaluation shares.")
    cli.check_output_file(args.output)
    work_dir = Path(args.work_dir)
    plan = open_plan(args, work_dir)
    area = workarea.WorkArea(work_dir, args.heartbeat, args.stale_after)
    items, needs = plan_items(plan)
    if args.summary:
        summary = summarise(plan, area)
        tmp = work_dir / f".summary.{area.runner}.tmp"
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, work_dir / "summary.json")
        if args.output:
            Path(args.output).write_text(json.dumps(summary, indent=1) + "\n")
        print(table(summary), flush=True)
        return summary
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device} was requested but no CUDA GPU is available.")
        torch.cuda.set_device(device)
    area.sync(items)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a preempted runner puts its item back
    started = time.time()
    states = area.loop(items, needs.__getitem__, Runner(plan, area, device, args.workers), args.poll,
                       log=lambda line: print(line, flush=True))
    left = {i: s for i, s in states.items() if s != "finished"}
    print(json.dumps({"runner": area.runner, "finished": len(items) - len(left), "items": len(items),
                      "not_finished": left, "seconds": round(time.time() - started, 1)}), flush=True)
    if left:
        raise SystemExit(1)
    return states


if __name__ == "__main__":
    cli.run(main)

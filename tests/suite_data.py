"""Synthetic end tasks with known answers for the eval_suite.py tests, and float64 reference metrics.

`write_suite(root)` writes six small task folders and a suite list `root/suite.txt` naming them, one
task of each kind eval_suite.py understands, and returns the ground truth of every example:

  cifar_classes       classification  CIFAR-10 images of the embedded cifar10-mini (train/val: disjoint
                                      parts of its train split, test: its test split), 10 classes
  shape_count         counting        1-5 filled squares and discs on a textured background; count = k
  shape_area          regression      one filled disc; value = disc pixels / image pixels, in [0, 1]
  shape_pairs         pairs           two crops of one textured canvas, the second shifted by one of
                                      SHIFTS (5 classes); label = index of the shift
  shape_segmentation  segmentation    classes 0 background, 1 square, 2 disc; in odd-numbered images
                                      the 1-px inner border of every shape is 255 (ignore)
  gradient_depth      depth           a gray smooth field g; depth = 1 + 4 g / 255 m, ~5% of pixels 0

Task folder layout (the contract eval_suite.py reads): for each split S a list `S.txt` with one
example per line, paths relative to the task folder: `path label` (classification, counting),
`path_a path_b label` (pairs), `path value` (regression), `path mask_path` (segmentation: mode "L"
PNG, 255 = ignore), `path depth_path` (depth: float32 .npy in metres, 0 = no measurement).
Images are RGB PNGs of image_size x image_size (CIFAR images are resized when image_size != 32).

Everything is drawn from numpy's default_rng seeded by (seed, task, split), so a task's files do
not depend on which other tasks or split sizes were asked for, and the same seed writes
byte-identical files.

The `ref_*` functions compute the metrics from their definitions in float64 with numpy only; each
docstring states the exact definition.
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPLITS = ("train", "val", "test")
KINDS = {
    "cifar_classes": "classification",
    "shape_count": "counting",
    "shape_area": "regression",
    "shape_pairs": "pairs",
    "shape_segmentation": "segmentation",
    "gradient_depth": "depth",
}
TASKS = tuple(KINDS)
N_CLASSES = {"cifar_classes": 10, "shape_pairs": 5, "shape_segmentation": 3}
IGNORE = 255
MAX_COUNT = 5
INVALID_DEPTH_FRACTION = 0.05


def shifts(image_size):
    """The 5 shifts of shape_pairs, label = index: (dy, dx) in pixels, s = image_size // 4.

    (dy, dx) is where the second crop's top-left corner lies relative to the first's: dy > 0 is
    further down (rows), dx > 0 further right (columns). Order: (0, 0), (+s, 0), (-s, 0), (0, +s), (0, -s).
    """
    s = image_size // 4
    return ((0, 0), (s, 0), (-s, 0), (0, s), (0, -s))


# ----------------------------------------------------------------------------------------------
# drawing


def _grid(size):
    """Row and column coordinates of a size x size image (pixel centres at integers)."""
    return np.mgrid[0:size, 0:size]


def _background(rng, size):
    """A dark textured RGB background (float64 in [0, 110]): a colour, a random ramp and noise."""
    yy, xx = _grid(size) / max(size - 1, 1)
    base = rng.uniform(20, 70, size=3)
    ramp = rng.uniform(-20, 20, size=(2, 3))
    img = base + yy[..., None] * ramp[0] + xx[..., None] * ramp[1]
    img = img + rng.normal(0, 8, size=(size, size, 3))
    return np.clip(img, 0, 110)


def _bright_colour(rng):
    """A random colour clearly brighter than _background: one channel >= 200, the others 0-255."""
    colour = rng.integers(0, 256, size=3)
    colour[rng.integers(3)] = rng.integers(200, 256)
    return colour


def _shape_mask(size, kind, cy, cx, extent):
    """Boolean mask of a filled square (side `extent`) or disc (diameter `extent`) centred at (cy, cx).

    The square covers rows/columns [c - extent // 2, c - extent // 2 + extent); the disc covers
    the pixels whose centre lies strictly within radius extent / 2 of (cy, cx).
    """
    yy, xx = _grid(size)
    if kind == "square":
        y0, x0 = cy - extent // 2, cx - extent // 2
        return (yy >= y0) & (yy < y0 + extent) & (xx >= x0) & (xx < x0 + extent)
    r = extent / 2
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def _dilate(mask):
    """The mask grown by one pixel in the 8-neighbourhood."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def _inner_border(mask):
    """Pixels of the mask with a 4-neighbour outside it (or on the image edge): its 1-px border."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _place_shapes(rng, size, kinds, min_extent, max_extent, tries=200):
    """Masks of shapes of the given kinds, at random places, kept apart by >= 1 pixel when practical.

    Each shape is tried at up to `tries` random positions; if none is free it goes at the last one
    (overlapping), so the number of shapes is always len(kinds).
    """
    occupied = np.zeros((size, size), bool)
    masks = []
    for kind in kinds:
        for _ in range(tries):
            extent = int(rng.integers(min_extent, max_extent + 1))
            lo, hi = extent // 2, size - (extent - extent // 2)
            cy, cx = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
            mask = _shape_mask(size, kind, cy, cx, extent)
            if not (mask & occupied).any():
                break
        occupied |= _dilate(mask)
        masks.append(mask)
    return masks


def _paint(img, masks, rng):
    """Fill each mask of img with a random bright colour (in place); returns img."""
    for mask in masks:
        img[mask] = _bright_colour(rng)
    return img


def _to_uint8(img):
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _smooth_field(rng, size):
    """A smooth random field in [lo, hi] (lo ~ U[0, .3], hi ~ U[.7, 1]): a ramp plus 2-4 Gaussian bumps."""
    yy, xx = _grid(size) / max(size - 1, 1)
    field = rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx
    for _ in range(int(rng.integers(2, 5))):
        cy, cx, sigma = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.4)
        field = field + rng.uniform(-1.5, 1.5) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
    field = (field - field.min()) / max(field.max() - field.min(), 1e-12)
    lo, hi = rng.uniform(0, 0.3), rng.uniform(0.7, 1)
    return lo + (hi - lo) * field


# ----------------------------------------------------------------------------------------------
# one example of each synthetic task; each returns (ground truth dict, {suffix: file content})


def _count_example(rng, size):
    """k ~ U{1..5} squares/discs (extent 3..max(4, size // 6)) on a textured background; count = k."""
    k = int(rng.integers(1, MAX_COUNT + 1))
    kinds = [("square", "disc")[int(b)] for b in rng.integers(0, 2, size=k)]
    masks = _place_shapes(rng, size, kinds, 3, max(4, size // 6))
    image = _to_uint8(_paint(_background(rng, size), masks, rng))
    return {"count": k, "image": image}


def _area_example(rng, size):
    """One disc of random diameter (size/8 .. 3 size/4); value = its pixel count / size**2."""
    masks = _place_shapes(rng, size, ["disc"], max(2, size // 8), max(3, 3 * size // 4))
    image = _to_uint8(_paint(_background(rng, size), masks, rng))
    return {"value": float(masks[0].sum()) / (size * size), "image": image}


def _pairs_example(rng, size):
    """Two size x size crops of one (size + 2s)^2 textured canvas with 4-8 shapes; label = shift index."""
    s = size // 4
    big = size + 2 * s
    n_shapes = int(rng.integers(4, 9))
    kinds = [("square", "disc")[int(b)] for b in rng.integers(0, 2, size=n_shapes)]
    masks = _place_shapes(rng, big, kinds, max(3, size // 8), max(4, size // 3))
    canvas = _to_uint8(_paint(_background(rng, big), masks, rng))
    label = int(rng.integers(len(shifts(size))))
    dy, dx = shifts(size)[label]
    image_a = canvas[s:s + size, s:s + size]
    image_b = canvas[s + dy:s + dy + size, s + dx:s + dx + size]
    return {"label": label, "shift": (dy, dx), "image_a": image_a.copy(), "image_b": image_b.copy()}


def _segmentation_example(rng, size, ignore_borders):
    """1-3 squares (class 1) / discs (class 2); mask = class per pixel, shape borders 255 if asked."""
    n = int(rng.integers(1, 4))
    kinds = [("square", "disc")[int(b)] for b in rng.integers(0, 2, size=n)]
    masks = _place_shapes(rng, size, kinds, max(4, size // 5), max(5, size // 2))
    image = _to_uint8(_paint(_background(rng, size), masks, rng))
    label = np.zeros((size, size), np.uint8)
    for kind, mask in zip(kinds, masks):
        label[mask] = 1 if kind == "square" else 2
    if ignore_borders:
        for mask in masks:
            label[_inner_border(mask)] = IGNORE
    return {"mask": label, "ignore_borders": bool(ignore_borders), "image": image}


def _depth_example(rng, size):
    """A gray smooth field g (uint8); depth = 1 + 4 g / 255 metres, ~5% of pixels set to 0 (invalid)."""
    gray = _to_uint8(255 * _smooth_field(rng, size))
    depth = 1.0 + 4.0 * gray.astype(np.float64) / 255.0
    depth[rng.random((size, size)) < INVALID_DEPTH_FRACTION] = 0.0
    return {"depth": depth.astype(np.float32), "image": np.repeat(gray[..., None], 3, axis=2)}


# ----------------------------------------------------------------------------------------------
# writing task folders


def _save_png(array, path):
    """Write a uint8 HxWx3 array as an RGB PNG, or a uint8 HxW array as a mode "L" PNG."""
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path)


def _cifar_examples(sizes, image_size, seed):
    """Class-balanced CIFAR-10 picks: train/val disjoint from cifar10-mini train, test from its test split."""
    from common import data

    rng = np.random.default_rng([seed, TASKS.index("cifar_classes")])
    pools = {"train": data.build_dataset("cifar10-mini", "train"), "test": data.build_dataset("cifar10-mini", "test")}
    order = {name: _balanced_order(np.asarray(data.labels_of(ds)), rng) for name, ds in pools.items()}
    n_train, n_val, n_test = sizes
    if n_train + n_val > len(order["train"]) or n_test > len(order["test"]):
        raise ValueError(f"cifar10-mini has {len(order['train'])} train and {len(order['test'])} test images")
    picks = {"train": ("train", order["train"][:n_train]),
             "val": ("train", order["train"][n_train:n_train + n_val]),
             "test": ("test", order["test"][:n_test])}
    out = {}
    for split, (pool, indices) in picks.items():
        examples = []
        for i in rng.permutation(indices):
            img, label = pools[pool][int(i)]
            if img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BICUBIC)
            examples.append({"label": int(label), "image": np.asarray(img.convert("RGB")),
                             "source": f"cifar10-mini/{pool}[{int(i)}]"})
        out[split] = examples
    return out


def _balanced_order(labels, rng):
    """All indices in a random order that cycles through the classes (each prefix is class-balanced)."""
    perm = rng.permutation(len(labels))
    rank = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        members = perm[labels[perm] == c]
        rank[members] = np.arange(len(members))
    position = np.empty(len(labels), np.int64)
    position[perm] = np.arange(len(labels))
    return np.lexsort((position, rank))


def _synthetic_examples(task, sizes, image_size, seed):
    """{split: [ground truth dicts]} of a shape/depth task, each split from its own seeded generator."""
    out = {}
    for split_id, (split, n) in enumerate(zip(SPLITS, sizes)):
        rng = np.random.default_rng([seed, TASKS.index(task), split_id])
        if task == "shape_count":
            out[split] = [_count_example(rng, image_size) for _ in range(n)]
        elif task == "shape_area":
            out[split] = [_area_example(rng, image_size) for _ in range(n)]
        elif task == "shape_pairs":
            out[split] = [_pairs_example(rng, image_size) for _ in range(n)]
        elif task == "shape_segmentation":
            out[split] = [_segmentation_example(rng, image_size, i % 2 == 1) for i in range(n)]
        else:
            out[split] = [_depth_example(rng, image_size) for _ in range(n)]
    return out


def _write_example(folder, split, i, kind, ex):
    """Write one example's files under folder/split, add their relative paths to ex; return its list line."""
    stem = f"{split}/{i:05d}"
    if kind == "pairs":
        ex["path_a"], ex["path_b"] = f"{stem}_a.png", f"{stem}_b.png"
        _save_png(ex["image_a"], folder / ex["path_a"])
        _save_png(ex["image_b"], folder / ex["path_b"])
        return f"{ex['path_a']} {ex['path_b']} {ex['label']}"
    ex["path"] = f"{stem}.png"
    _save_png(ex["image"], folder / ex["path"])
    if kind == "classification":
        return f"{ex['path']} {ex['label']}"
    if kind == "counting":
        return f"{ex['path']} {ex['count']}"
    if kind == "regression":
        return f"{ex['path']} {ex['value']!r}"
    if kind == "segmentation":
        ex["mask_path"] = f"{stem}_mask.png"
        _save_png(ex["mask"], folder / ex["mask_path"])
        return f"{ex['path']} {ex['mask_path']}"
    ex["depth_path"] = f"{stem}_depth.npy"
    np.save(folder / ex["depth_path"], ex["depth"])
    return f"{ex['path']} {ex['depth_path']}"


def write_task(root, task, sizes=(64, 32, 64), image_size=32, seed=0):
    """Write one task folder root/task (split lists train.txt, val.txt, test.txt and files); return its truth.

    Returns {"kind", "folder" (Path), "splits": {split: [example dicts]}} plus "n_classes" for
    classification, pairs and segmentation tasks. Example dicts hold the relative paths written
    ("path", or "path_a"/"path_b", "mask_path", "depth_path"), the pixels ("image" uint8 HxWx3, or
    "image_a"/"image_b") and the answer: "label" (+ "shift"), "count", "value", "mask" (uint8 HxW,
    255 = ignore) or "depth" (float32 HxW, 0 = invalid).
    """
    if task not in KINDS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    kind, folder = KINDS[task], Path(root) / task
    if task == "cifar_classes":
        splits = _cifar_examples(sizes, image_size, seed)
    else:
        splits = _synthetic_examples(task, sizes, image_size, seed)
    for split in SPLITS:
        (folder / split).mkdir(parents=True, exist_ok=True)
        lines = [_write_example(folder, split, i, kind, ex) for i, ex in enumerate(splits[split])]
        (folder / f"{split}.txt").write_text("".join(line + "\n" for line in lines))
    info = {"kind": kind, "folder": folder, "splits": splits}
    if task in N_CLASSES:
        info["n_classes"] = N_CLASSES[task]
    return info


def write_suite(root, sizes=(64, 32, 64), image_size=32, seed=0, tasks=None):
    """Write the tasks (default: all of TASKS) under root and the list root/suite.txt; return their truth.

    sizes = (train, val, test) example counts. suite.txt names each task as
    `name kind name train=train val=val test=test image_size=<image_size>`, after a comment and a
    blank line (which readers must skip). Returns {task: write_task(...)}.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tasks = TASKS if tasks is None else tuple(tasks)
    suite = {task: write_task(root, task, sizes, image_size, seed) for task in tasks}
    lines = ["# synthetic end tasks: name kind folder [key=value ...]", ""]
    lines += [f"{task} {KINDS[task]} {task} train=train val=val test=test image_size={image_size}" for task in tasks]
    (root / "suite.txt").write_text("\n".join(lines) + "\n")
    return suite


# ----------------------------------------------------------------------------------------------
# float64 reference metrics


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def _pooled(arrays):
    """One flat array from a sequence of arrays (or one array) of any shapes."""
    if isinstance(arrays, np.ndarray):
        return arrays.ravel()
    return np.concatenate([np.asarray(a).ravel() for a in arrays]) if len(arrays) else np.zeros(0)


def ref_top1(pred_labels, labels):
    """Top-1 accuracy in percent: 100 * (number of i with pred_labels[i] == labels[i]) / N."""
    pred, labels = np.asarray(pred_labels).ravel(), np.asarray(labels).ravel()
    if pred.shape != labels.shape or labels.size == 0:
        raise ValueError("pred_labels and labels must be non-empty and of equal length")
    return 100.0 * float(np.mean(pred == labels, dtype=np.float64))


def ref_mae(pred, target):
    """Mean absolute error: (1/N) * sum_i |pred[i] - target[i]|, in float64."""
    pred, target = _f64(pred).ravel(), _f64(target).ravel()
    if pred.shape != target.shape or target.size == 0:
        raise ValueError("pred and target must be non-empty and of equal length")
    return float(np.mean(np.abs(pred - target)))


def ref_count_accuracy(pred_values, counts):
    """Counting accuracy in percent: 100 * (number of i with floor(pred[i] + 0.5) == counts[i]) / N.

    floor(x + 0.5) rounds halves up (towards +inf): 2.5 -> 3, 2.4999 -> 2, -0.5 -> 0. For the
    non-negative predictions that matter here this is the same as rounding half away from zero
    (it differs from numpy's np.round, which rounds halves to even: np.round(2.5) == 2).
    """
    pred, counts = _f64(pred_values).ravel(), _f64(counts).ravel()
    if pred.shape != counts.shape or counts.size == 0:
        raise ValueError("pred_values and counts must be non-empty and of equal length")
    return 100.0 * float(np.mean(np.floor(pred + 0.5) == counts))


def _valid_pixels(pred_masks, gt_masks, ignore):
    pred, gt = _pooled(pred_masks).astype(np.int64), _pooled(gt_masks).astype(np.int64)
    if pred.shape != gt.shape:
        raise ValueError("pred_masks and gt_masks must have the same pixels")
    valid = gt != ignore
    return pred[valid], gt[valid]


def ref_miou(pred_masks, gt_masks, n_classes, ignore=255):
    """Mean intersection over union in percent, accumulated over the whole split.

    Pixels where gt == ignore are dropped from both prediction and ground truth. Over the remaining
    pixels of all images pooled, for each class c in 0..n_classes-1:
        I_c = #{pred == c and gt == c},  U_c = #{pred == c or gt == c},
    and mIoU = 100 * mean of I_c / U_c over the classes with U_c > 0 (nan if there is none).
    A predicted value outside 0..n_classes-1 is simply wrong: it adds to the union of the gt class only.
    pred_masks, gt_masks: sequences of integer arrays (one per image, matching shapes) or one array.
    """
    pred, gt = _valid_pixels(pred_masks, gt_masks, ignore)
    ious = []
    for c in range(n_classes):
        inter = float(np.sum((pred == c) & (gt == c), dtype=np.float64))
        union = float(np.sum((pred == c) | (gt == c), dtype=np.float64))
        if union > 0:
            ious.append(inter / union)
    return 100.0 * float(np.mean(ious)) if ious else float("nan")


def ref_pixel_accuracy(pred_masks, gt_masks, ignore=255):
    """Pixel accuracy in percent: 100 * #{pred == gt} / #{gt != ignore}, over the non-ignored pixels of all images.

    nan if every pixel is ignored.
    """
    pred, gt = _valid_pixels(pred_masks, gt_masks, ignore)
    return 100.0 * float(np.mean(pred == gt, dtype=np.float64)) if gt.size else float("nan")


def ref_depth_metrics(pred, gt, eps=1e-6):
    """Depth metrics over the valid pixels (gt > 0) of all images pooled; returns a dict of floats.

        rmse    = sqrt(mean((pred - gt)^2))                    (metres)
        abs_rel = mean(|pred - gt| / gt)
        delta1  = 100 * mean(max(p / gt, gt / p) < 1.25),  p = max(pred, eps)  (percent)

    The clamp p = max(pred, eps = 1e-6) is applied for delta1 only (so a zero or negative
    prediction is a finite ratio and counts as wrong); rmse and abs_rel use pred as given.
    gt <= 0 (and nan) marks pixels with no measurement; they are excluded. nan metrics if none is valid.
    pred, gt: sequences of HxW arrays (one per image, matching shapes) or one array.
    """
    pred, gt = _f64(_pooled(pred)), _f64(_pooled(gt))
    if pred.shape != gt.shape:
        raise ValueError("pred and gt must have the same pixels")
    valid = gt > 0
    pred, gt = pred[valid], gt[valid]
    if gt.size == 0:
        return {"rmse": float("nan"), "abs_rel": float("nan"), "delta1": float("nan")}
    p = np.maximum(pred, eps)
    return {"rmse": float(np.sqrt(np.mean((pred - gt) ** 2))),
            "abs_rel": float(np.mean(np.abs(pred - gt) / gt)),
            "delta1": 100.0 * float(np.mean(np.maximum(p / gt, gt / p) < 1.25))}


# ----------------------------------------------------------------------------------------------


def _self_check(suite):
    """Perfect answers score 100 / 0 on every generated task; prints one line per task."""
    for task, info in suite.items():
        examples = info["splits"]["test"]
        if info["kind"] in ("classification", "pairs"):
            truth = [e["label"] for e in examples]
            score = {"top1": ref_top1(truth, truth)}
            assert score["top1"] == 100.0
        elif info["kind"] == "counting":
            truth = [e["count"] for e in examples]
            score = {"count_acc": ref_count_accuracy(truth, truth), "mae": ref_mae(truth, truth)}
            assert score == {"count_acc": 100.0, "mae": 0.0}
        elif info["kind"] == "regression":
            truth = [e["value"] for e in examples]
            score = {"mae": ref_mae(truth, truth)}
            assert score["mae"] == 0.0 and all(0 < v < 1 for v in truth)
        elif info["kind"] == "segmentation":
            masks = [e["mask"] for e in examples]
            score = {"miou": ref_miou(masks, masks, info["n_classes"]), "pixel_acc": ref_pixel_accuracy(masks, masks)}
            assert score == {"miou": 100.0, "pixel_acc": 100.0}
        else:  # depth: the answer is a function of the image
            gt = [e["depth"] for e in examples]
            pred = [1 + 4 * e["image"][..., 0].astype(np.float64) / 255 for e in examples]
            score = ref_depth_metrics(pred, gt)
            assert score["rmse"] < 1e-6 and score["abs_rel"] < 1e-6 and score["delta1"] == 100.0
        print(f"{task:20s} {info['kind']:15s} " + " ".join(f"{k}={v:.4g}" for k, v in score.items()))


if __name__ == "__main__":
    import time

    if len(sys.argv) != 2:
        sys.exit("usage: python tests/suite_data.py OUTPUT_FOLDER   (writes a demo suite there)")
    start = time.perf_counter()
    demo = write_suite(sys.argv[1])
    print(f"wrote {Path(sys.argv[1]) / 'suite.txt'} ({len(demo)} tasks) in {time.perf_counter() - start:.1f} s")
    _self_check(demo)

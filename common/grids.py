"""Image grids of what a representation groups together (PNG, drawn with PIL).

neighbour_grid: one row per query image: the query (framed blue), then its k most cosine-similar
training images, framed green where their label is the query's and red where it is not, each
with its class name underneath.
cluster_grid: one row per cluster, the largest first: its size, label purity and majority class,
then the member images nearest the cluster's mean feature, framed green where their label is the
majority's and red where it is not.

It takes datasets of (PIL image, label) and index lists, so any checkpoint's features (through
the eval scripts' loading) can be shown; which images are shown is decided by the features and a
seed only, so a grid is the same every time for the same inputs.
"""
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

QUERY, RIGHT, WRONG = (40, 90, 220), (30, 170, 60), (215, 40, 40)
BORDER = 3  # frame width, pixels
LABEL_H = 12  # a line of text under each image


@torch.no_grad()
def nearest(bank_features, query_features, k):
    """(indices [Q, k], similarities [Q, k]) of each query's k most cosine-similar bank rows, best first."""
    bank = F.normalize(bank_features.float(), dim=1)
    queries = F.normalize(query_features.float(), dim=1)
    sims, idx = (queries @ bank.t()).topk(min(k, len(bank)), dim=1)
    return idx, sims


def pick_queries(n_images, n, seed):
    """n distinct image indices chosen by `seed` (all of them, in order, when n >= n_images)."""
    if n >= n_images:
        return list(range(n_images))
    return sorted(torch.randperm(n_images, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def _class_name(dataset, label):
    classes = getattr(dataset, "classes", None)
    while classes is None and hasattr(dataset, "dataset"):  # a Subset
        dataset = dataset.dataset
        classes = getattr(dataset, "classes", None)
    if classes is not None and 0 <= label < len(classes):
        return str(classes[label])
    return str(label)


def _cell(image, cell, frame, caption, font):
    """One image resized to cell x cell (nearest-neighbour: small images stay sharp) in a frame, captioned."""
    out = Image.new("RGB", (cell + 2 * BORDER, cell + 2 * BORDER + LABEL_H), (255, 255, 255))
    out.paste(Image.new("RGB", (cell + 2 * BORDER, cell + 2 * BORDER), frame), (0, 0))
    out.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (BORDER, BORDER))
    ImageDraw.Draw(out).text((BORDER, cell + 2 * BORDER), caption[:cell // 6], fill=(0, 0, 0), font=font)
    return out


def neighbour_grid(queries, query_indices, bank, neighbour_indices, path, cell=64):
    """Writes the grid to `path`; returns its size (width, height).

    queries, bank: datasets of (PIL image, label); query_indices [Q]; neighbour_indices [Q, k] into bank.
    """
    font = ImageFont.load_default()
    rows = []
    for qi, neighbours in zip(query_indices, neighbour_indices):
        image, label = queries[qi]
        cells = [_cell(image, cell, QUERY, _class_name(queries, label), font)]
        for ni in neighbours:
            n_image, n_label = bank[int(ni)]
            cells.append(_cell(n_image, cell, RIGHT if n_label == label else WRONG, _class_name(bank, n_label), font))
        rows.append(cells)
    w, h = rows[0][0].size
    gap = 2 * BORDER  # a white gap after the query column
    grid = Image.new("RGB", (w * len(rows[0]) + gap, h * len(rows)), (255, 255, 255))
    for r, cells in enumerate(rows):
        for c, im in enumerate(cells):
            grid.paste(im, (c * w + (gap if c else 0), r * h))
    grid.save(path)
    return grid.size


@torch.no_grad()
def largest_clusters(features, assignments, labels, rows, per_row):
    """The `rows` largest clusters (ties: the lower id): [{"cluster", "size", "purity", "majority", "members"}],
    members being the `per_row` images nearest the cluster's mean L2-normalised feature, nearest first.
    Images with a negative assignment (unassigned) are left out."""
    feats = F.normalize(features.float(), dim=1)
    assignments, labels = assignments.long(), torch.as_tensor(labels).long()
    valid = assignments >= 0
    sizes = torch.bincount(assignments[valid], minlength=1)
    order = sorted(range(len(sizes)), key=lambda c: (-int(sizes[c]), c))[:rows]
    out = []
    for c in order:
        if sizes[c] == 0:
            break
        members = torch.nonzero(assignments == c).flatten()
        centre = F.normalize(feats[members].mean(0), dim=0)
        nearest_first = members[torch.argsort(feats[members] @ centre, descending=True, stable=True)][:per_row]
        counts = torch.bincount(labels[members] - labels[members].min())
        majority = int(counts.argmax()) + int(labels[members].min())
        out.append({"cluster": c, "size": int(sizes[c]), "purity": float(counts.max()) / len(members),
                    "majority": majority, "members": nearest_first.tolist()})
    return out


def cluster_grid(dataset, clusters, path, cell=64):
    """Writes the rows of `largest_clusters` (over `dataset`'s images) to `path`; returns its size."""
    font = ImageFont.load_default()
    w, h = cell + 2 * BORDER, cell + 2 * BORDER + LABEL_H
    text_w = max(2 * w, 140)
    per_row = max(len(c["members"]) for c in clusters)
    grid = Image.new("RGB", (text_w + per_row * w, h * len(clusters)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, c in enumerate(clusters):
        y = r * h
        lines = [f"cluster {c['cluster']}", f"{c['size']} images", f"purity {100 * c['purity']:.0f}%",
                 _class_name(dataset, c["majority"])]
        for i, line in enumerate(lines):
            draw.text((4, y + 4 + 12 * i), line, fill=(0, 0, 0), font=font)
        for col, index in enumerate(c["members"]):
            image, label = dataset[index]
            frame = RIGHT if label == c["majority"] else WRONG
            grid.paste(_cell(image, cell, frame, _class_name(dataset, label), font), (text_w + col * w, y))
    grid.save(path)
    return grid.size

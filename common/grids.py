"""Image grids of what a representation groups together (PNG, drawn with PIL).

neighbour_grid: one row per query image: the query (framed blue), then its k most cosine-similar
training images, framed green where their label is the query's and red where it is not, each
with its class name underneath.

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

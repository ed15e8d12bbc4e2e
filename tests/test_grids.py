"""Image grids (common/grids.py, eval_knn.py --show-neighbours): layout, and the right images in the right frames."""
import math

import pytest
import torch
from PIL import Image

from common import grids
from tests.helpers import run_script


class Solid(torch.utils.data.Dataset):
    """Image i is a solid colour that encodes i; labels as given."""

    classes = ["even", "odd", "other"]

    def __init__(self, labels, offset=0):
        self.labels, self.offset = list(labels), offset

    def __len__(self):
        return len(self.labels)

    def colour(self, i):
        return ((self.offset + 37 * i) % 256, (11 * i) % 256, 200)

    def __getitem__(self, i):
        return Image.new("RGB", (8, 8), self.colour(i)), self.labels[i]


def angles(*degrees):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_nearest_orders_by_cosine_similarity():
    bank = angles(0, 90, 180, 270, 10)
    idx, sims = grids.nearest(bank * 3, angles(3, 181), 3)  # scale does not matter: cosine
    assert idx.tolist() == [[0, 4, 1], [2, 3, 1]]  # 181 degrees: 270 is 89 away, 90 is 91
    assert sims[0, 0] > sims[0, 2]


def test_pick_queries_is_seeded():
    assert grids.pick_queries(100, 5, 0) == grids.pick_queries(100, 5, 0)
    assert grids.pick_queries(100, 5, 0) != grids.pick_queries(100, 5, 1)
    assert grids.pick_queries(3, 5, 0) == [0, 1, 2]


def test_neighbour_grid_layout_and_frames(tmp_path):
    bank = Solid([0, 1, 0, 1, 2], offset=100)
    queries = Solid([0, 1])
    bank_features, query_features = angles(0, 90, 180, 270, 10), angles(3, 181)
    idx, _ = grids.nearest(bank_features, query_features, 3)
    cell = 20
    size = grids.neighbour_grid(queries, [0, 1], bank, idx.tolist(), tmp_path / "g.png", cell=cell)
    w, h = cell + 2 * grids.BORDER, cell + 2 * grids.BORDER + grids.LABEL_H
    gap = 2 * grids.BORDER
    assert size == (4 * w + gap, 2 * h)
    png = Image.open(tmp_path / "g.png").convert("RGB")
    assert png.size == size
    for row, (q, neighbours) in enumerate(zip([0, 1], idx.tolist())):
        y = row * h
        assert png.getpixel((w // 2, y + w // 2)) == queries.colour(q)  # the query's image, framed blue
        assert png.getpixel((1, y + 1)) == grids.QUERY
        for col, n in enumerate(neighbours, start=1):
            x = col * w + gap
            assert png.getpixel((x + w // 2, y + w // 2)) == bank.colour(n)
            frame = grids.RIGHT if bank.labels[n] == queries.labels[q] else grids.WRONG
            assert png.getpixel((x + 1, y + 1)) == frame
    # row 0: bank 0 (label 0 = the query's: green), 4 (label 2: red), 1 (label 1: red)
    assert png.getpixel((w + gap + 1, 1)) == grids.RIGHT and png.getpixel((2 * w + gap + 1, 1)) == grids.WRONG


def test_eval_knn_show_neighbours_writes_the_grid(tmp_path):
    for split, n in (("train", 12), ("test", 6)):
        for c in ("a", "b"):
            (tmp_path / "d" / split / c).mkdir(parents=True)
            for i in range(n // 2):
                shade = 40 + 30 * i if c == "a" else 250 - 30 * i
                Image.new("RGB", (32, 32), (shade, 255 - shade, 90)).save(tmp_path / "d" / split / c / f"{i}.png")
    out = tmp_path / "grid.png"
    proc = run_script("eval_knn.py", "--weights", "random", "--arch", "resnet18", "--train-data", tmp_path / "d",
                      "--image-size", "32", "--workers", "0", "--k", "5", "--report-k", "5",
                      "--show-neighbours", out, "--show-queries", "4", "--show-k", "3")
    assert "4 queries x 3 neighbours" in proc.stderr
    w, h = 64 + 2 * grids.BORDER, 64 + 2 * grids.BORDER + grids.LABEL_H
    assert Image.open(out).size == (4 * w + 2 * grids.BORDER, 4 * h)
    again = tmp_path / "again.png"
    run_script("eval_knn.py", "--weights", "random", "--arch", "resnet18", "--train-data", tmp_path / "d",
               "--image-size", "32", "--workers", "0", "--k", "5", "--report-k", "5",
               "--show-neighbours", again, "--show-queries", "4", "--show-k", "3")
    assert Image.open(out).tobytes() == Image.open(again).tobytes()  # deterministic for a seed


def test_largest_clusters_sizes_purity_and_nearest_members():
    #   cluster 1: 4 images around 0 degrees (labels 0, 0, 0, 1); cluster 0: 2 images around 180; -1: unassigned
    feats = angles(0, 10, -10, 30, 180, 185, 90)
    assign = torch.tensor([1, 1, 1, 1, 0, 0, -1])
    labels = [0, 0, 0, 1, 2, 2, 1]
    rows = grids.largest_clusters(feats, assign, labels, rows=5, per_row=3)
    assert [(r["cluster"], r["size"], r["majority"]) for r in rows] == [(1, 4, 0), (0, 2, 2)]
    assert rows[0]["purity"] == 0.75 and rows[1]["purity"] == 1.0
    # the mean direction is about 7.5 degrees: 10 is nearest, then 0, then -10; 30 is the farthest
    assert rows[0]["members"] == [1, 0, 2]
    assert len(rows[1]["members"]) == 2


def test_cluster_grid_layout_and_frames(tmp_path):
    data = Solid([0, 0, 0, 1, 2, 2, 1])
    rows = grids.largest_clusters(angles(0, 10, -10, 30, 180, 185, 90), torch.tensor([1, 1, 1, 1, 0, 0, -1]),
                                  data.labels, rows=5, per_row=4)
    cell = 20
    size = grids.cluster_grid(data, rows, tmp_path / "c.png", cell=cell)
    w, h = cell + 2 * grids.BORDER, cell + 2 * grids.BORDER + grids.LABEL_H
    text_w = max(2 * w, 140)
    assert size == (text_w + 4 * w, 2 * h)
    png = Image.open(tmp_path / "c.png").convert("RGB")
    for r, row in enumerate(rows):
        for col, index in enumerate(row["members"]):
            x, y = text_w + col * w, r * h
            assert png.getpixel((x + w // 2, y + w // 2)) == data.colour(index)
            assert png.getpixel((x + 1, y + 1)) == (grids.RIGHT if data.labels[index] == row["majority"] else grids.WRONG)


def test_eval_knn_show_clusters(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "d" / "train" / c).mkdir(parents=True)
        for i in range(6):
            shade = 40 + 30 * i if c == "a" else 250 - 30 * i
            Image.new("RGB", (32, 32), (shade, 255 - shade, 90)).save(tmp_path / "d" / "train" / c / f"{i}.png")
    out = tmp_path / "clusters.png"
    common = ["eval_knn.py", "--arch", "resnet18", "--train-data", tmp_path / "d" / "train", "--image-size", "32",
              "--workers", "0", "--k", "5", "--report-k", "5"]
    proc = run_script(*common, "--weights", "random", "--show-clusters", out, "--clusters", "3", "--show-rows", "2",
                      "--show-per-row", "3")
    assert "the 2 largest of spherical k-means, 3 clusters" in proc.stderr
    assert Image.open(out).size[1] == 2 * (64 + 2 * grids.BORDER + grids.LABEL_H)
    proc = run_script(*common, "--weights", "random", "--show-clusters", out, check=False)
    assert proc.returncode == 2 and "give --clusters N" in proc.stderr and "Traceback" not in proc.stderr


def _two_class_folder(root, per_class):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shade = 20 + 12 * i if c == "a" else 240 - 12 * i
            Image.new("RGB", (32, 32), (shade, 255 - shade, 40 + 5 * i)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("method,eval_flags", [("deepcluster_v2", []), ("clusterfit", []),
                                               ("swav", ["--layers", "head"])])
def test_eval_knn_draws_the_clusters_a_checkpoint_holds(tmp_path, method, eval_flags):
    """A short run of each clustering method, then `--show-clusters` without --clusters: the grid shows the
    checkpoint's own clusters (DeepCluster-v2's and ClusterFit's pseudo-labels, SwAV's prototypes), one row per
    cluster up to --show-rows."""
    import importlib

    from common import checkpoint

    folder = _two_class_folder(tmp_path / "d", per_class=16)
    out = tmp_path / "run"
    train_flags = [*importlib.import_module(f"tests.test_{method}").SMALL, "--data", folder, "--data-fraction", "1"]
    if method == "clusterfit":
        train_flags += ["--weights", "random"]
    run_script(f"{method}.py", *train_flags, "--max-steps", "3", "--output-dir", out)  # 2 steps per epoch
    ckpt_path = checkpoint.latest(out)
    ckpt = checkpoint.load(ckpt_path)
    png = tmp_path / "clusters.png"
    proc = run_script("eval_knn.py", "--weights", ckpt_path, "--arch", "resnet18", "--train-data", folder,
                      "--image-size", "32", "--workers", "0", "--show-clusters", png, "--show-rows", "3",
                      "--show-per-row", "2", *eval_flags)
    assert "largest of the checkpoint's clusters" in proc.stderr, proc.stderr[-2000:]
    if method == "deepcluster_v2":
        assign = ckpt["labels"][0]
    elif method == "clusterfit":
        assign = ckpt["pseudo_labels"]
    else:
        assign = None  # SwAV's: each image's nearest prototype, in the head's space
    rows = 3 if assign is None else min(3, len(set(assign[assign >= 0].tolist())))
    height = Image.open(png).size[1]
    row_height = 64 + 2 * grids.BORDER + grids.LABEL_H
    assert height % row_height == 0 and 1 <= height // row_height <= 3
    if assign is not None:
        assert len(assign) == 32 and height // row_height == rows, (assign, height)

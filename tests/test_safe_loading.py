"""Untrusted files: a checkpoint can't run code, and every reader of a file a user names checks what it read.

1. A `.pth` whose unpickling would create a file is refused, with one sentence naming what it would import
   and --trust-checkpoint, by every script and every path through which a script reads a checkpoint; the
   file is never created, unless --trust-checkpoint is given. Every training script's own one-step
   checkpoint loads under weights_only.
2. The other files the scripts read (cached features, ClusterFit's stage outputs, linear heads, SVM label
   files, file lists) are fuzzed in-process with seeded mutations of a valid file: each read either
   returns a structure that an independent check finds valid, or raises one of the project's ValueError
   subclasses with a one-line message; nothing else.
"""
import argparse
import collections
import importlib
import pathlib
import random
import re
import shutil

import numpy as np
import pytest
import torch

import clusterfit
import eval_linear
import eval_svm
from common import checkpoint, data, features
from tests.helpers import run_script

TRAINING_SCRIPTS = ("simclr", "moco", "swav", "deepcluster_v2", "npid", "pirl", "rotnet", "jigsaw", "clusterfit",
                    "barlow_twins", "vicreg", "byol", "simsiam", "mocov3", "dino", "virtex")
REFUSAL = (r"would import .*pathlib\.Path.* when loaded, which can run arbitrary code, so it was not loaded; if you "
           r"trust whoever made this file, re-run with --trust-checkpoint\.")


class _Touch:
    """Unpickling this object creates `marker`: a stand-in for whatever a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _malicious_checkpoint(path, marker):
    """A plausible training checkpoint (tensors, args, a trunk) with one object that creates `marker`."""
    torch.manual_seed(0)
    weights = {"conv1.weight": torch.randn(8, 3, 3, 3), "bn1.running_mean": torch.zeros(8)}
    torch.save({"method": "simclr", "arch": "resnet18", "cifar_stem": False, "epoch": 1, "step": 1,
                "args": {"lr": 0.3, "batch_size": 16}, "model": {"trunk." + k: v for k, v in weights.items()},
                "trunk": weights, "optimizer": {"state": {}, "param_groups": []}, "rng": _Touch(marker)}, path)
    return path


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    """(the malicious file, the marker its unpickling would create), shared by every refusal below."""
    folder = tmp_path_factory.mktemp("untrusted")
    marker = folder / "code-ran"
    return _malicious_checkpoint(folder / "evil.pth", marker), marker


def _assert_refused(proc, payload, name):
    """Exit status 2, one line on stderr: the refusal naming the file `name` and --trust-checkpoint; no code ran."""
    _, marker = payload
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(rf"error: \S*/{re.escape(name)} {REFUSAL}", lines[0]), proc.stderr[-3000:]
    assert not marker.exists(), "unpickling the malicious file ran its code"


def _copy(payload, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(payload[0], path)
    return path


EVAL_DATA = ("--train-data", "cifar10-mini", "--arch", "resnet18", "--image-size", "32", "--workers", "0")


@pytest.mark.parametrize("script,flag", [(s, f) for s in ("eval_knn.py", "eval_linear.py", "eval_svm.py")
                                         for f in ("--weights", "--features")])
def test_safe_eval_scripts_refuse_code_in_weights_and_features(payload, tmp_path, script, flag):
    evil = _copy(payload, tmp_path / f"evil-{flag[2:]}.pth")
    proc = run_script(script, flag, evil, *EVAL_DATA, check=False)
    _assert_refused(proc, payload, evil.name)


def test_safe_eval_linear_refuses_code_in_a_head(payload, tmp_path):
    evil = _copy(payload, tmp_path / "evil-head.pth")
    proc = run_script("eval_linear.py", "--eval-only", "--head", evil, "--weights", "random", *EVAL_DATA, check=False)
    _assert_refused(proc, payload, evil.name)


def _small(method):
    """The small flags of `method`'s own tests (tests/test_<method>.py), plus what a one-step run needs."""
    flags = list(importlib.import_module(f"tests.test_{method}").SMALL)
    return flags + (["--weights", "random"] if method == "clusterfit" else []) + ["--max-steps", "1"]


@pytest.mark.parametrize("stage,output", [("extract", None), ("cluster", "features.pth"), ("train", "clusters.pth")])
def test_safe_clusterfit_refuses_code_in_weights_and_stage_outputs(payload, tmp_path, stage, output):
    out = tmp_path / "run"
    if output is None:
        evil = _copy(payload, tmp_path / "evil-weights.pth")
        argv = [*_small("clusterfit"), "--weights", evil]
    else:
        evil = _copy(payload, out / output)
        argv = _small("clusterfit")
    proc = run_script("clusterfit.py", *argv, "--stage", stage, "--output-dir", out, check=False)
    _assert_refused(proc, payload, evil.name)


@pytest.mark.parametrize("method", TRAINING_SCRIPTS)
def test_safe_training_checkpoint_loads_weights_only_and_resume_refuses_code(payload, tmp_path, method, monkeypatch):
    """A one-step checkpoint of `method` loads under weights_only; resuming from a malicious one is refused."""
    monkeypatch.setattr(checkpoint, "TRUSTED", False)
    good, bad = tmp_path / "good", tmp_path / "bad"
    run_script(f"{method}.py", *_small(method), "--output-dir", good)
    own = checkpoint.load(checkpoint.latest(good))  # weights_only with the allowlist, nothing trusted
    assert own["method"] == method and own["step"] == 1 and isinstance(own["model"], dict)
    assert all(torch.is_tensor(v) for v in own["trunk"].values())
    if method == "clusterfit":  # the stage outputs are read the same way, and resuming needs them
        bad.mkdir()
        for name in ("features.pth", "clusters.pth"):
            assert isinstance(checkpoint.load(good / name), dict)
            shutil.copy(good / name, bad / name)
    evil = _copy(payload, bad / "checkpoint-00000001.pth")
    proc = run_script(f"{method}.py", *_small(method), "--max-steps", "2", "--output-dir", bad, check=False)
    _assert_refused(proc, payload, evil.name)


def test_safe_trust_checkpoint_loads_with_full_pickle(tmp_path):
    """--trust-checkpoint is what it says: the same file is unpickled, and its code runs."""
    marker = tmp_path / "code-ran"
    evil = _malicious_checkpoint(tmp_path / "trusted.pth", marker)
    proc = run_script("eval_knn.py", "--weights", evil, *EVAL_DATA, "--trust-checkpoint", check=False)
    assert marker.exists()
    # its stand-in trunk does not fit a ResNet-18: one sentence, not a traceback
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "does not load into" in proc.stderr


# ---------------------------------------------------------------- fuzzing the readers of untrusted files
def _valid_features():
    g = torch.Generator().manual_seed(0)
    return {"format": features.FORMAT, "layers": ["pooled", "res4"],
            "train_features": {"pooled": torch.randn(7, 5, generator=g), "res4": torch.randn(7, 3, generator=g)},
            "train_labels": torch.tensor([0, 1, 2, 0, 1, 2, 2]),
            "test_features": {"pooled": torch.randn(3, 5, generator=g), "res4": torch.randn(3, 3, generator=g)},
            "test_labels": torch.tensor([2, 0, 1]), "meta": {"weights": "random", "arch": "resnet18"}}


def _valid_head():
    g = torch.Generator().manual_seed(1)
    return {"layer": "pooled", "weight": torch.randn(5, 3, generator=g), "bias": torch.randn(3, generator=g),
            "mean": torch.randn(5, generator=g), "var": torch.rand(5, generator=g), "batch_norm": True,
            "classes": torch.tensor([0, 1, 2]), "chosen": {"lr": 0.1}, "meta": {"weights": "random"}}


N_IMAGES = 6


def _valid_extract():
    return {"features": torch.randn(N_IMAGES, 4, generator=torch.Generator().manual_seed(2)),
            "labels": torch.arange(N_IMAGES), "weights": "random", "arch": "resnet18", "layer": "pooled"}


def _valid_clusters():
    return {"centroids": torch.randn(3, 4), "assignments": torch.tensor([0, 2, 1, 1, 0, 2]), "num_clusters": 3,
            "kmeans_iters": 10, "spherical": True, "seed": 0}


# Independent checks of what a reader returned: the documented structure, re-derived from each file's docs.
def _is_matrix(x, rows=None, floating=True):
    return (type(x) is torch.Tensor and x.dim() == 2 and x.numel() > 0 and (rows is None or len(x) == rows)
            and (x.dtype == torch.float32 and bool(torch.isfinite(x).all()) if floating else x.dtype == torch.int64))


def _labels_ok(y):
    if type(y) is not torch.Tensor or y.dtype != torch.int64 or y.numel() == 0:
        return False
    return bool((y >= 0).all()) if y.dim() == 1 else y.dim() == 2 and set(y.unique().tolist()) <= {-1, 0, 1}


def _check_features(out):
    assert out["format"] == features.FORMAT and isinstance(out["meta"], dict)
    assert out["layers"] and all(isinstance(n, str) for n in out["layers"])
    train, test = out["train_labels"], out["test_labels"]
    assert _labels_ok(train) and _labels_ok(test) and train.shape[1:] == test.shape[1:]
    for name in out["layers"]:
        x, x_test = out["train_features"][name], out["test_features"][name]
        assert _is_matrix(x, len(train)) and _is_matrix(x_test, len(test)) and x.shape[1] == x_test.shape[1]


def _check_head(head):
    d, c = head["weight"].shape
    assert isinstance(head["layer"], str) and _is_matrix(head["weight"]) and d and c
    assert _is_matrix(head["bias"][None]) and head["bias"].shape == (c,)
    assert head["classes"].shape == (c,) and head["classes"].dtype == torch.int64
    if head["batch_norm"] is True:
        assert _is_matrix(head["mean"][None]) and _is_matrix(head["var"][None])
        assert head["mean"].shape == head["var"].shape == (d,) and bool((head["var"] >= 0).all())
    else:
        assert head["batch_norm"] is False


def _check_extract(out):
    assert _is_matrix(out["features"], N_IMAGES)


def _check_clusters(out):
    k, a = out["num_clusters"], out["assignments"]
    assert type(k) is int and k >= 1 and a.dtype == torch.int64 and a.shape == (N_IMAGES,)
    assert bool(((a >= 0) & (a < k)).all())


def _check_label_file(y):
    assert _labels_ok(y)


def _check_file_list(dataset):
    assert len(dataset) >= 1 and len(dataset.paths) == len(dataset.labels)
    if isinstance(dataset.labels[0], list):
        assert len({len(y) for y in dataset.labels}) == 1 and all(v in (-1, 0, 1) for y in dataset.labels for v in y)
    else:
        assert all(type(y) is int and -1 <= y < len(dataset.classes) for y in dataset.labels)
    assert all("\x00" not in p for p in dataset.paths)


_WRONG_VALUES = [None, 3, -1, 2.5, float("nan"), "junk", "line\nbreak", [1, 2], {}, {"pooled": 1}, True,
                 torch.tensor(7), torch.zeros(0), torch.zeros(0, 5), torch.full((7, 5), float("nan")),
                 torch.full((3, 5), float("inf")), torch.ones(7, 5, dtype=torch.int64), torch.ones(7, dtype=torch.bool),
                 torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5).half(), torch.randn(7, 5, dtype=torch.cfloat),
                 torch.randn(5), torch.randn(2, 3, 4), torch.tensor([5, -3, 0]), torch.tensor([2**40, 0, 1]),
                 torch.tensor([[1, 0], [2, -1]]), torch.randn(6, 4).to_sparse(), np.int64(3), np.arange(4),
                 argparse.Namespace(layer="pooled"), torch.arange(N_IMAGES) * 5]


def _structural(valid, rng):
    """A copy of the dict `valid` with one to three random structural changes (types, shapes, keys, values)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in valid.items()}
    for _ in range(rng.randint(1, 3)):
        target = out
        key = rng.choice(list(target))
        if isinstance(target[key], dict) and target[key] and rng.random() < 0.5:  # one level down
            target, key = target[key], rng.choice(list(target[key]))
        kind = rng.random()
        value = target[key]
        if kind < 0.15:
            del target[key]
        elif kind < 0.55:
            target[key] = _WRONG_VALUES[rng.randrange(len(_WRONG_VALUES))]
        elif isinstance(value, torch.Tensor) and value.layout == torch.strided and value.dim() and value.numel():
            value = value.clone().contiguous()
            if kind < 0.7:
                value = value[: rng.randrange(len(value))]  # fewer rows
            elif kind < 0.8:
                value = value.t() if value.dim() == 2 else value[None]
            elif kind < 0.9:
                bad = [float("nan"), float("inf"), -1.5] if value.is_floating_point() else [-1, 10**6, -7]
                value.view(-1)[rng.randrange(value.numel())] = rng.choice(bad)
            else:
                value = value.to(rng.choice([torch.int32, torch.float64, torch.bool, torch.uint8, torch.bfloat16]))
            target[key] = value
        elif isinstance(value, list) and value:
            target[key] = value[:-1] if rng.random() < 0.5 else value + ["res5", 3][rng.randrange(2):]
        else:
            target[rng.choice(["extra", key + "x"])] = value
            if rng.random() < 0.5:
                del target[key]
    return out


def _byte_mutation(blob, kind, rng):
    blob = bytearray(blob)
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del blob[rng.randrange(len(blob)):]
    else:  # insert
        at = rng.randrange(len(blob) + 1)
        blob[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(blob)


_JUNK = ["", "   ", "#", "# comment", "a.jpg", "a.jpg 3", "a.jpg -1", "a.jpg -2", "a.jpg 1 0 -1", "a.jpg 1 0",
         "a.jpg 2 0 1", "a.jpg 1.5", "a.jpg nan", "a.jpg inf", "a.jpg 99999999999", "a.jpg " + "9" * 5000,
         "a.jpg --5", "a.jpg ²", "a.jpg ١", "a.jpg 0x1f", "a\x00.jpg 1", "1 0 -1", "1 1 1 1", "-1 -1", "0",
         "2 2", "1e3 0", "\x00\x01\x02", "label only", "é è", "a.jpg\t1", "a.jpg 1\r", "\ufeffa.jpg 1"]


def _text_mutation(text, rng):
    lines = text.splitlines()
    for _ in range(rng.randint(1, 3)):
        junk = rng.choice(_JUNK)
        choice = rng.random()
        if choice < 0.5 or not lines:
            lines.insert(rng.randrange(len(lines) + 1), junk)
        elif choice < 0.8:
            lines[rng.randrange(len(lines))] = junk
        else:
            del lines[rng.randrange(len(lines))]
    return "\n".join(lines) + rng.choice(["", "\n"])


def _fuzz(tmp_path, name, suffix, valid_bytes, read, check, structural, seed, counts):
    """Read `valid_bytes` and a few hundred seeded mutations of it; tally what happened per kind of mutation."""
    rng = random.Random(seed)
    path = tmp_path / f"{name}{suffix}"
    plan = [("none", 1), ("flip", 60), ("truncate", 40), ("insert", 40), ("structural", 150)]
    for kind, n in plan:
        for _ in range(n):
            if kind == "none":
                path.write_bytes(valid_bytes)
            elif kind == "structural":
                structural(path, rng)
            else:
                path.write_bytes(_byte_mutation(valid_bytes, kind, rng))
            try:
                out = read(path)
            except (checkpoint.CheckpointError, data.DataError) as e:
                message = str(e)
                assert message and "\n" not in message and message.endswith("."), (name, kind, message)
                counts[name, kind, "refused"] += 1
                continue
            check(out)  # anything returned is a valid structure
            counts[name, kind, "loaded"] += 1
    assert counts[name, "none", "loaded"] == 1


def _torch_reader_case(valid, read, check):
    def structural(path, rng):
        torch.save(_structural(valid, rng), path)
    return read, check, structural


def test_safe_fuzz_readers_of_untrusted_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(checkpoint, "TRUSTED", False)
    counts = collections.Counter()
    marker = tmp_path / "code-ran"

    cases = {
        "features": (_valid_features(), lambda p: features.load_features(p, ["pooled"]), _check_features),
        "head": (_valid_head(), eval_linear.load_head, _check_head),
        "clusterfit-features": (_valid_extract(), lambda p: clusterfit.load_output(p, "extract", N_IMAGES),
                                _check_extract),
        "clusterfit-clusters": (_valid_clusters(), lambda p: clusterfit.load_output(p, "cluster", N_IMAGES),
                                _check_clusters),
    }
    for seed, (name, (valid, read, check)) in enumerate(cases.items()):
        torch.save(valid, tmp_path / "valid.pth")
        blob = (tmp_path / "valid.pth").read_bytes()
        _fuzz(tmp_path, name, ".pth", blob, *_torch_reader_case(valid, read, check), seed, counts)
        # code inside an otherwise valid file: refused before it runs
        for key in list(valid)[:5]:
            torch.save({**valid, key: _Touch(marker)}, tmp_path / "code.pth")
            with pytest.raises(checkpoint.CheckpointError, match="would import .*pathlib"):
                read(tmp_path / "code.pth")
            counts[name, "code", "refused"] += 1
        assert not marker.exists()

    # eval_svm's label files: .npy arrays and text matrices
    labels = np.array([[1, 0, -1], [0, 1, 0], [-1, -1, 1], [1, 1, 0]])
    np.save(tmp_path / "valid.npy", labels)

    def npy_structural(path, rng):
        choices = [labels.astype(np.float32), labels + 0.5, labels * 2, labels[:, 0] + 1, labels[:, 0] - 2,
                   labels.astype(object), np.array(["a", "b"]), np.zeros((0, 3)), np.zeros((2, 2, 2)), np.int64(3),
                   np.array([np.nan, 1.0]), np.array([1e30, 2.0]), np.array([2**63 + 5], dtype=np.uint64),
                   np.zeros(3, dtype=[("a", "i4")]), labels.astype(bool), labels.astype(np.complex64), labels]
        value = choices[rng.randrange(len(choices))]
        if rng.random() < 0.2:
            np.savez(path.with_suffix(".npz"), value=value)
            path.write_bytes(path.with_suffix(".npz").read_bytes())
        else:
            np.save(path, value, allow_pickle=True)

    _fuzz(tmp_path, "svm-labels-npy", ".npy", (tmp_path / "valid.npy").read_bytes(), eval_svm._load_label_file,
          _check_label_file, npy_structural, 10, counts)
    text = "\n".join(" ".join(map(str, row)) for row in labels) + "\n"

    def text_structural(path, rng):
        path.write_text(_text_mutation(text, rng), encoding="utf-8", errors="surrogatepass")

    _fuzz(tmp_path, "svm-labels-text", ".txt", text.encode(), eval_svm._load_label_file, _check_label_file,
          text_structural, 11, counts)

    # file lists: single-label and multi-label
    for seed, (name, listing) in enumerate({"file-list": "a.jpg 0\nb.jpg 2\n# note\n\nc.jpg 1\nd.jpg\n",
                                            "file-list-multi": "a.jpg 1 0 -1\nb.jpg 0 1 1\n"}.items(), 20):
        def list_structural(path, rng, listing=listing):
            path.write_bytes(_text_mutation(listing, rng).encode("utf-8", "surrogatepass"))

        _fuzz(tmp_path, name, ".txt", listing.encode(), lambda p: data.build_dataset(str(p)), _check_file_list,
              list_structural, seed, counts)

    with capsys.disabled():  # the tally, for the record
        readers = sorted({name for name, _, _ in counts})
        print("\nreader: kind loaded/refused ...")
        for name in readers:
            kinds = ("flip", "truncate", "insert", "structural", "code")
            print(f"{name}: " + ", ".join(f"{k} {counts[name, k, 'loaded']}/{counts[name, k, 'refused']}"
                                            for k in kinds if counts[name, k, 'loaded'] + counts[name, k, 'refused']))
    for name in readers:  # the fuzz is not vacuous: its structural mutations are mostly caught
        assert counts[name, "structural", "refused"] >= 30, name

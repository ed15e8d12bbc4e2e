"""common/: data, optimiser, schedule, checkpoints, models, command lines."""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from common import checkpoint, cli, data, models, optim


# ----------------------------------------------------------------------------- data

def test_cifar10_mini_is_balanced_and_decodes():
    train, test = data.build_dataset("cifar10-mini", "train"), data.build_dataset("cifar10-mini", "test")
    assert len(train) == 4000 and len(test) == 1000
    assert np.bincount(data.labels_of(train)).tolist() == [400] * 10
    assert np.bincount(data.labels_of(test)).tolist() == [100] * 10
    image, label = train[123]
    assert image.size == (32, 32) and image.mode == "RGB" and 0 <= label < 10
    assert os.path.getsize(data.ASSETS / "cifar10_mini.npz") < 6e6


def test_cifar10_test_is_the_whole_test_split_and_holds_cifar10_mini_test():
    test = data.build_dataset("cifar10-test", "test")
    assert len(test) == 10000 and np.bincount(data.labels_of(test)).tolist() == [1000] * 10
    assert test.classes == data.build_dataset("cifar10-mini", "test").classes
    image, label = test[9999]
    assert image.size == (32, 32) and image.mode == "RGB" and label == 9
    assert all(os.path.getsize(data.ASSETS / f"cifar10_test_{part}.npz") < 5e6 for part in (0, 1))
    mini = np.load(data.ASSETS / "cifar10_mini.npz")

    def images(blob, offsets, labels):
        return [(blob[a:b].tobytes(), int(y)) for a, b, y in zip(offsets[:-1], offsets[1:], labels)]

    everything = set(images(test.blob, test.offsets, test.labels))
    assert len(everything) == 10000  # no duplicate JPEGs
    assert set(images(mini["test_bytes"], mini["test_offsets"], mini["test_labels"])) <= everything  # the same bytes under the same labels
    assert data.build_split("cifar10-test@val") is not None
    with pytest.raises(data.DataError, match="only CIFAR-10's 10,000 test images"):
        data.build_dataset("cifar10-test", "train")


def test_cifar10_mini_train_is_a_subset_of_a_full_copy():
    """Checks the embedded training images against a full CIFAR-10 ImageFolder copy, which the repository does
    not carry: point SSL_DATA_DIR at a folder holding cifar10/train/<class>/*.jpg to run it."""
    root = Path(os.environ.get("SSL_DATA_DIR", "/nonexistent")) / "cifar10" / "train"
    if not root.is_dir():
        pytest.skip("set SSL_DATA_DIR to a folder with cifar10/train/<class>/*.jpg (CIFAR-10 as JPEGs) to check "
                    "cifar10-mini's training images against it")
    mini = np.load(data.ASSETS / "cifar10_mini.npz")
    blob, offsets, labels = mini["train_bytes"], mini["train_offsets"], mini["train_labels"]
    classes = mini["classes"].tolist()
    originals = {(p.read_bytes(), classes.index(p.parent.name)) for p in root.glob("*/*.jpg")}
    for a, b, y in zip(offsets[:-1], offsets[1:], labels):
        assert (blob[a:b].tobytes(), int(y)) in originals


def test_image_folder_file_list_and_split_dirs(tiny_folder, tmp_path):
    folder = data.build_dataset(str(tiny_folder))
    assert len(folder) == 24 and folder.classes == ["class0", "class1", "class2"]
    listing = tmp_path / "list.txt"
    listing.write_text("# path label\n" + "".join(f"{p} {l}\n" for p, l in zip(folder.paths, folder.labels)))
    from_list = data.build_dataset(str(listing))
    assert from_list.labels == folder.labels and len(from_list) == 24
    (tmp_path / "split" / "train").mkdir(parents=True)
    (tmp_path / "split" / "test").mkdir()
    os.symlink(tiny_folder / "class0", tmp_path / "split" / "train" / "a")
    os.symlink(tiny_folder / "class1", tmp_path / "split" / "test" / "b")
    assert data.build_dataset(str(tmp_path / "split"), "test").classes == ["b"]


@pytest.mark.parametrize("spec, message", [("/does/not/exist", "does not exist"), ("", "--data is required")])
def test_bad_data_specs(spec, message):
    with pytest.raises(data.DataError, match=message):
        data.build_dataset(spec)


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "cls").mkdir()
    with pytest.raises(data.DataError, match="no images"):
        data.build_dataset(str(tmp_path))


def test_fashion_mnist_from_debian_idx_files():
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    train = data.build_dataset("fashion-mnist", "train")
    assert len(train) == 60000 and len(data.build_dataset("fashion-mnist", "test")) == 10000
    image, label = train[0]
    assert image.size == (28, 28) and image.mode == "RGB" and label == 9  # the first training image is a boot


def test_fraction_subset_is_deterministic_and_balanced():
    labels = np.repeat(np.arange(10), 100)
    a = data.fraction_indices(labels, 0.1, seed=3)
    assert len(a) == 100 and np.bincount(labels[a]).tolist() == [10] * 10
    assert np.array_equal(a, data.fraction_indices(labels, 0.1, seed=3))
    assert not np.array_equal(a, data.fraction_indices(labels, 0.1, seed=4))
    with pytest.raises(data.DataError):
        data.fraction_indices(labels, 0.0)


def test_corrupt_and_truncated_images_are_replaced_and_counted(tiny_folder, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(tiny_folder, root)
    (root / "class0" / "0.jpg").write_bytes(b"")  # zero bytes
    good = (root / "class1" / "0.jpg").read_bytes()
    (root / "class1" / "0.jpg").write_bytes(good[:len(good) // 3])  # truncated
    (root / "class2" / "0.jpg").write_bytes(b"this is not an image at all")
    dataset = data.ViewDataset(data.build_dataset(str(root)), lambda im: torchvision.transforms.functional.to_tensor(im))
    loader = data.build_loader(dataset, data.EpochSampler(len(dataset), shuffle=False), 6, 0, "cpu")
    bad = [name for _, _, _, names in loader for name in names]
    assert len(bad) == 3 and sum(len(b) for b, _, _, _ in loader) == 24
    assert any("class0/0.jpg" in b for b in bad) and any("class1/0.jpg" in b for b in bad)


def test_view_randomness_depends_only_on_seed_epoch_index():
    import torchvision.transforms as T

    base = data.build_dataset("cifar10-mini", "test")
    ds = data.ViewDataset(base, T.Compose([T.RandomResizedCrop(16), T.ToTensor()]), seed=1)
    torch.manual_seed(123)
    a = ds[(2, 5)][0]
    torch.rand(100)  # disturbing the global RNG changes nothing ...
    assert torch.equal(a, ds[(2, 5)][0])
    assert not torch.equal(a, ds[(3, 5)][0])  # ... but another epoch does
    state = torch.get_rng_state()
    ds[(0, 0)]
    assert torch.equal(state, torch.get_rng_state())  # and the global RNG is left untouched


def test_epoch_sampler_shards_and_resumes():
    full = data.EpochSampler(103, seed=5)
    shards = [data.EpochSampler(103, rank=r, world_size=2, seed=5) for r in range(2)]
    for s in shards:
        s.set_epoch(4)
    full.set_epoch(4)
    ranked = [list(s) for s in shards]
    assert len(ranked[0]) == len(ranked[1]) == 51
    assert set(ranked[0]).isdisjoint(ranked[1])
    resumed = data.EpochSampler(103, rank=1, world_size=2, seed=5)
    resumed.set_epoch(4, start=10)
    assert list(resumed) == ranked[1][10:]


# ----------------------------------------------------------------------------- optimiser

def _lars_reference(w, g, lr, wd, eta, momentum_buf, momentum):
    """Apex LARC (clip=False) followed by SGD with momentum, written out in float64."""
    w_norm, g_norm = w.norm(), g.norm()
    ratio = eta * w_norm / (g_norm + wd * w_norm + 1e-8)
    d = (g + wd * w) * ratio
    buf = d.clone() if momentum_buf is None else momentum_buf * momentum + d
    return w - lr * buf, buf


def test_lars_matches_the_written_out_rule():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    model = torch.nn.Module()
    model.weight, model.bias = weight, bias
    opt = optim.LARS(optim.param_groups(model, 1e-4), lr=0.5, momentum=0.9)
    w_ref, b_ref, w_buf, b_buf = weight.detach().clone(), bias.detach().clone(), None, None
    for _ in range(3):
        gw, gb = torch.randn_like(weight), torch.randn_like(bias)
        weight.grad, bias.grad = gw.clone(), gb.clone()
        opt.step()
        w_ref, w_buf = _lars_reference(w_ref, gw, 0.5, 1e-4, 0.001, w_buf, 0.9)
        b_buf = gb.clone() if b_buf is None else b_buf * 0.9 + gb  # biases: plain SGD, no decay
        b_ref = b_ref - 0.5 * b_buf
    torch.testing.assert_close(weight.detach(), w_ref)
    torch.testing.assert_close(bias.detach(), b_ref)


def test_param_groups_exclude_bias_and_norm():
    groups = optim.param_groups(models.build_trunk("resnet18"), 1e-6)
    assert all(p.ndim > 1 for p in groups[0]["params"]) and groups[0]["lars"]
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0 and not groups[1]["lars"]


def test_warmup_cosine_and_linear_scaling():
    assert optim.scaled_lr(0.3, 4096) == pytest.approx(4.8)
    assert optim.warmup_cosine(0, 100, 10, 1.0) == 0.0
    assert optim.warmup_cosine(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert optim.warmup_cosine(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert optim.warmup_cosine(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert optim.warmup_cosine(100, 100, 10, 1.0, 0.01) == pytest.approx(0.01)


# ----------------------------------------------------------------------------- checkpoints and models

def test_atomic_save_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pth"
    checkpoint.save_atomic({"a": torch.ones(3)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoint.save_atomic({"a": Unpicklable()}, path)
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]  # no temporary file left behind


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint-00000001.pth"
    checkpoint.save_atomic({"model": {}, "method": "simclr"}, path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable"):
        checkpoint.load_training(path, "simclr")


def test_keep_last_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save_training({"step": step}, tmp_path, step, keep=2)
    assert [s for s, _ in checkpoint.checkpoints(tmp_path)] == [3, 4]
    assert checkpoint.latest(tmp_path).name == "checkpoint-00000004.pth"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_trunk_state_dict_loads_into_torchvision(arch):
    trunk = models.build_trunk(arch)
    state = models.trunk_state_dict(trunk)
    reference = torchvision.models.get_model(arch)
    reference.load_state_dict(state)  # strict
    reference.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    trunk.eval(), reference.eval()
    torch.testing.assert_close(trunk(x), reference(x))


def test_unknown_arch_and_layers():
    with pytest.raises(ValueError, match="unknown architecture"):
        models.build_trunk("resnet7")
    with pytest.raises(ValueError, match="unknown layer"):
        models.features(models.build_trunk("resnet18"), torch.randn(1, 3, 32, 32), ["res9"])


def test_cifar_stem_keeps_resolution():
    trunk = models.build_trunk("resnet18", cifar_stem=True).eval()
    x = torch.randn(2, 3, 32, 32)
    taps = models.features(trunk, x, models.TAPS)
    assert [taps[n].shape[1] for n in models.TAPS] == [64, 64, 128, 256, 512, 512]
    torch.testing.assert_close(taps["pooled"], trunk(x))
    stem = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))
    assert stem.shape[-2:] == (32, 32) and trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(stem)))).shape[-1] == 4


# ----------------------------------------------------------------------------- command lines

@dataclass
class _Args:
    lr: float = 0.3
    arch: str = "resnet50"
    sync_bn: bool = True
    crop_scale: tuple[float, ...] = (0.08, 1.0)


def test_parse_args_presets_and_overrides():
    presets = {"small": dict(lr=1.0, arch="resnet18")}
    a = cli.parse_args(_Args, presets, ["--preset", "small", "--lr", "2", "--no-sync-bn", "--crop-scale", "0.2", "1"])
    assert (a.lr, a.arch, a.sync_bn, a.crop_scale, a.preset) == (2.0, "resnet18", False, (0.2, 1.0), "small")
    assert cli.parse_args(_Args, presets, []).lr == 0.3


@pytest.mark.parametrize("script", ["simclr", "moco", "swav", "deepcluster_v2", "npid", "pirl", "rotnet", "jigsaw",
                                    "clusterfit", "barlow_twins", "vicreg", "byol", "simsiam", "mocov3", "dino", "virtex",
                                    "eval_knn",
                                    "eval_linear", "eval_svm", "eval_suite"])
def test_help_shows_every_flag_with_its_text_and_default(script):
    import importlib

    module = importlib.import_module(script)
    helps = cli.field_help(module.Args)
    assert all(helps.values()), [name for name, text in helps.items() if not text]
    parser = cli.build_parser(module.Args, getattr(module, "PRESETS", None))
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "trust_checkpoint", "preset"):
            text = parser._get_formatter()._get_help_string(action) % {"default": action.default}
            assert "(default: " in text and text.split("(default: ")[0].strip(), (action.dest, text)


def test_help_text_comes_from_trailing_comments_and_presets_show_their_defaults(capsys):
    @dataclass
    class Args:
        depth: int = 3  # layers of the toy network
        width: tuple[int, ...] = (4, 5)
        name: str = ""

    assert cli.field_help(Args) == {"depth": "layers of the toy network", "width": "", "name": ""}
    presets = {"deep": {"depth": 7, "_doc": "a deeper one"}}
    with pytest.raises(SystemExit):
        cli.parse_args(Args, presets, ["--preset", "deep", "--help"])
    out = capsys.readouterr().out
    assert "layers of the toy network (default: 7)" in " ".join(out.split())
    assert cli.parse_args(Args, presets, ["--preset", "deep"]).depth == 7


def test_malformed_training_checkpoints_are_refused_in_one_sentence(tmp_path):
    good = {"method": "simclr", "model": {"w": torch.ones(1)}, "step": 3, "scaler": {},
            "optimizer": {"state": {}, "param_groups": []},
            "rng": {"torch": torch.get_rng_state(), "python": (3, (1, 2), None)}}
    torch.save(good, tmp_path / "good.pth")
    assert checkpoint.load_training(tmp_path / "good.pth", "simclr")["step"] == 3
    cases = [(dict(good, step="3"), "step"), (dict(good, step=-1), "step"), (dict(good, model={"w": 3}), "model"),
             (dict(good, optimizer=[1]), "optimizer"), (dict(good, scaler=[]), "scaler"),
             (dict(good, rng={"torch": torch.zeros(3), "python": (1,)}), "random-number"),
             (dict(good, method="x\nrm -rf"), "cannot resume a simclr run")]
    for bad, words in cases:
        torch.save(bad, tmp_path / "bad.pth")
        with pytest.raises(checkpoint.CheckpointError, match=words) as caught:
            checkpoint.load_training(tmp_path / "bad.pth", "simclr")
        assert "\n" not in str(caught.value)


TRAINING_SCRIPTS = ["simclr", "moco", "swav", "deepcluster_v2", "npid", "pirl", "rotnet", "jigsaw", "clusterfit",
                    "barlow_twins", "vicreg", "byol", "simsiam", "mocov3", "dino"]
# the scripts with a convergence test (the CPU recipes of the six newest have not been measured yet)
CONVERGENCE_TESTED = TRAINING_SCRIPTS[:9]


@pytest.mark.parametrize("script", TRAINING_SCRIPTS)
def test_cpu_preset_is_the_cifar_recipe_on_the_embedded_data_with_the_imagenet_stem(script):
    """`--preset cpu` (what the convergence tests, demo.py and bench/convergence.py run) starts from the script's
    `--preset cifar` and trains the ImageNet stem on cifar10-mini; anything else it changes is the script's own
    statement of the CPU recipe."""
    import importlib

    from common.run import RunArgs

    module = importlib.import_module(script)
    cpu = cli.parse_args(module.Args, module.PRESETS, ["--preset", "cpu"])
    assert issubclass(module.Args, RunArgs)
    assert (cpu.data, cpu.cifar_stem, cpu.arch, cpu.output_dir) == ("cifar10-mini", False, "resnet18",
                                                                   f"runs/{script}-cpu")
    assert set(module.PRESETS["cifar"]) <= set(module.PRESETS["cpu"])  # every cifar setting, kept or restated


def test_convergence_tests_run_the_cpu_presets():
    """Each convergence test trains its script's `--preset cpu` (no recipe kept in the tests)."""
    import re

    here = Path(__file__).parent
    sources = "".join((here / f).read_text() for f in ("test_convergence_instance.py",
                                                                "test_convergence_cluster_pretext.py", "helpers.py"))
    for script in CONVERGENCE_TESTED:
        if script == "simclr":
            assert 'SIMCLR_CONVERGENCE_FLAGS = ("--preset", "cpu"' in sources
            continue
        call = re.search(rf'pretrain_knn_top1\(tmp_path, "{script}\.py", ([^)]*)\)', sources)
        assert call and call.group(1).startswith('"--preset", "cpu"'), script
        assert "--epochs" not in call.group(1) and "--lr" not in call.group(1), call.group(1)

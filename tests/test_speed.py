"""The fast path: decode-only loader, views on the device, multi-tensor LARS, torch.compile.

(The resume test of simclr.py runs both --gpu-aug paths: tests/test_simclr.py.)
"""
import copy
import shutil

import numpy as np
import pytest
import torch

import simclr
from common import augment, cli, data, optim, speed


def test_decoded_images_are_the_pil_pixels_as_uint8():
    base = data.subset(data.build_dataset("cifar10-mini", "train"), 0.01)
    decoded = data.DecodedImages(base)
    for i in (0, 7, len(base) - 1):
        pil, label = base[i]
        image, decoded_label = decoded[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32) and decoded_label == label
        assert torch.equal(image, torch.from_numpy(np.array(pil)).permute(2, 0, 1))


def test_decoded_images_shrink_only_images_larger_than_max_side(tmp_path):
    from PIL import Image

    for name, size in (("big", (300, 120)), ("small", (40, 50))):
        (tmp_path / "c").mkdir(exist_ok=True)
        Image.new("RGB", size, (10, 200, 30)).save(tmp_path / "c" / f"{name}.png")
    decoded = data.DecodedImages(data.build_dataset(str(tmp_path)), max_side=100)
    shapes = sorted(tuple(decoded[i][0].shape) for i in range(2))
    assert shapes == [(3, 40, 100), (3, 50, 40)]  # 300x120 (w x h) -> 100x40; 40x50 kept


def test_collate_canvas_pads_mixed_sizes_and_keeps_each_size():
    a = torch.full((3, 5, 7), 1, dtype=torch.uint8)
    b = torch.full((3, 9, 4), 2, dtype=torch.uint8)
    (canvas, sizes), labels, indices, bad = data.collate_canvas([(a, 0, 10, []), (b, 1, 11, ["x.jpg"])])
    assert canvas.shape == (2, 3, 9, 7) and sizes.tolist() == [[5, 7], [9, 4]]
    assert torch.equal(canvas[0, :, :5, :7], a) and int(canvas[0].sum()) == a.sum()
    assert torch.equal(canvas[1, :, :9, :4], b) and int(canvas[1].sum()) == b.sum()
    assert labels.tolist() == [0, 1] and indices.tolist() == [10, 11] and bad == ["x.jpg"]


def test_device_views_depend_only_on_seed_epoch_and_batch():
    args = cli.parse_args(simclr.Args, simclr.PRESETS, ["--crops", "2x32,2x16", "--blur-p", "0.5"])
    make_views = augment.batched(simclr.view_recipe(args), args.seed)
    base = data.DecodedImages(data.subset(data.build_dataset("cifar10-mini", "train"), 0.01))
    batch, _, indices, _ = data.collate_canvas([data.ViewDataset(base, None)[(0, i)] for i in range(8)])
    first = make_views(batch, 3, indices, "cpu")
    assert [tuple(v.shape) for v in first] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 2
    assert all(v.dtype == torch.float32 for v in first)
    assert not torch.equal(first[0], first[1])  # two different views of each image
    again = make_views(batch, 3, indices, "cpu")
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    other_epoch = make_views(batch, 4, indices, "cpu")
    assert not torch.equal(first[0], other_epoch[0])


def test_use_gpu_aug_choices():
    assert speed.use_gpu_aug("auto", "cpu") is False and speed.use_gpu_aug("on", "cpu") is True
    assert speed.use_gpu_aug("auto", "cuda") is True and speed.use_gpu_aug("off", "cuda") is False
    with pytest.raises(ValueError, match="--gpu-aug"):
        speed.use_gpu_aug("yes", "cpu")


@pytest.mark.parametrize("weight_decay,momentum,clip,nesterov",
                         [(1e-6, 0.9, False, False), (1e-4, 0.9, True, False), (0.0, 0.0, False, False),
                          (1e-4, 0.9, False, True)])
def test_foreach_lars_equals_the_per_parameter_loop(weight_decay, momentum, clip, nesterov):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        model[3].weight.zero_()  # a zero-norm weight takes the trust ratio's fallback branch
    twin = copy.deepcopy(model)
    opts = [optim.LARS(optim.param_groups(m, weight_decay), lr=0.5, momentum=momentum, clip=clip,
                       nesterov=nesterov, foreach=foreach) for m, foreach in ((model, False), (twin, True))]
    for step in range(4):
        x = torch.randn(16, 6)
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert any(p.abs().sum() > 0 for p in model[3].parameters())  # the zero weight did move


def test_compiled_model_gives_the_eager_loss_on_a_fixed_batch():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile (inductor, CPU) needs a C++ compiler, none on PATH")
    torch.manual_seed(0)
    args = cli.parse_args(simclr.Args, simclr.PRESETS,
                          ["--arch", "resnet18", "--cifar-stem", "--hidden-dim", "32", "--embedding-dim", "16"])
    model = simclr.SimCLR(args).train()  # training mode: BN normalises with the batch's statistics
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    with torch.no_grad():
        eager = simclr.nt_xent_loss(model(views), 2, 0.1)
        compiled = simclr.nt_xent_loss(speed.compile_model(model, True)(views), 2, 0.1)
    torch.testing.assert_close(compiled, eager)  # float32 tolerances: only the summation order may differ


def test_jpegs_decoded_on_the_device_give_the_same_views_as_decoded_in_workers():
    args = cli.parse_args(simclr.Args, simclr.PRESETS, ["--crops", "2x32"])
    make_views = augment.batched(simclr.view_recipe(args), args.seed)
    base = data.subset(data.build_dataset("cifar10-mini", "train"), 0.01)
    batches = []
    for encoded in (False, True):
        items = data.ViewDataset(data.DecodedImages(base, encoded=encoded), None)
        batches.append(data.collate_canvas([items[(0, i)] for i in range(6)]))
    (canvas, _), _, indices, _ = batches[0]
    (jpegs, sizes), _, _, _ = batches[1]
    assert sizes is None and all(j.ndim == 1 and j.dtype == torch.uint8 for j in jpegs)
    assert all(torch.equal(a, b) for a, b in zip(data.decode_on_device(jpegs, "cpu"), canvas))
    for a, b in zip(make_views(batches[0][0], 1, indices, "cpu"), make_views(batches[1][0], 1, indices, "cpu")):
        assert torch.equal(a, b)


def test_compile_in_place_keeps_state_dict_keys_and_outputs():
    """moco.py compiles its two encoders in place (nn.Module.compile): checkpoints keep their key names."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile (inductor, CPU) needs a C++ compiler, none on PATH")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    eager = copy.deepcopy(model)
    speed.compile_in_place([model], False)
    assert model.__dict__.get("_compiled_call_impl") is None  # not asked: untouched
    speed.compile_in_place([model], True)
    x = torch.randn(5, 6)
    torch.testing.assert_close(model(x), eager(x))
    assert list(model.state_dict()) == list(eager.state_dict())
    assert model.__dict__.get("_compiled_call_impl") is not None

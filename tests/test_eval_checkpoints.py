"""Foreign checkpoints: every public format, built synthetically from a torchvision model, loads back bit-identically."""
import argparse

import numpy as np
import pytest
import torch
import torchvision

from common import checkpoint, data, features, models


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for m in model.modules():  # non-trivial BN buffers, so a skipped buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    return model.state_dict()


def prefixed(state, prefix):
    return {prefix + k: v.clone() for k, v in state.items()}


def formats(ref):
    noise = {k: torch.randn_like(v.float()) for k, v in ref.items()}
    head = {"projection_head.0.weight": torch.randn(8, 512), "prototypes.weight": torch.randn(3, 8)}
    return {
        "ours": {"method": "simclr", "arch": "resnet18", "cifar_stem": False, "trunk": dict(ref), "model": {}},
        "torchvision": dict(ref),
        "vissl": {"classy_state_dict": {"base_model": {"model": {
            "trunk": prefixed(ref, "_feature_blocks."), "heads": {"0.clf.0.weight": torch.randn(10, 512)}}}}},
        "vissl-flat": {"model_state_dict": {**prefixed(ref, "trunk._feature_blocks."), "heads.0.weight": torch.zeros(1)}},
        "moco": {"epoch": 200, "arch": "resnet50", "state_dict": {**prefixed(ref, "module.encoder_q."),
                                                                  **prefixed(noise, "module.encoder_k."),
                                                                  "module.encoder_q.fc.2.weight": torch.randn(4, 4)}},
        "swav": {"state_dict": {**prefixed(ref, "module."), **prefixed(head, "module.")}},
        "deepcluster-v2": prefixed({**ref, **head}, "module."),
        "dino": {"teacher": {**prefixed(ref, "backbone."), "head.mlp.0.weight": torch.randn(4, 512)},
                 "student": prefixed(noise, "module.backbone."), "epoch": 10},
        # as the published files are saved: the training script's argparse.Namespace, the optimizer, numpy values
        "moco-with-args": {"epoch": 200, "arch": "resnet50",
                           "state_dict": {**prefixed(ref, "module.encoder_q."), **prefixed(noise, "module.encoder_k."),
                                          "module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1)},
                           "optimizer": {"state": {0: {"momentum_buffer": torch.randn(3)}},
                                         "param_groups": [{"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4,
                                                           "params": [0, 1]}]},
                           "args": argparse.Namespace(arch="resnet50", lr=0.03, schedule=[120, 160], moco_k=65536,
                                                      moco_t=0.2, mlp=True, aug_plus=True, cos=True, gpu=None)},
        "swav-with-numpy": {"epoch": np.int64(800), "state_dict": {**prefixed(ref, "module."),
                                                                   **prefixed(head, "module.")},
                            "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(4.8), "params": [0]}]},
                            "lr_schedule": np.linspace(0.0, 4.8, 7), "crops": np.array([2, 6], dtype=np.int32)},
        "dino-with-args": {"teacher": {**prefixed(ref, "backbone."), "head.mlp.0.weight": torch.randn(4, 512)},
                           "student": prefixed(noise, "module.backbone."), "epoch": np.int64(101),
                           "args": argparse.Namespace(arch="resnet50", out_dim=60000, momentum_teacher=np.float64(0.996),
                                                      lr=0.3, dtype=np.dtype("float32"),
                                                      global_crops_scale=np.array([0.14, 1.0])),
                           "dino_loss": {"center": torch.zeros(1, 60)}, "fp16_scaler": None},
    }


@pytest.mark.parametrize("name", ["ours", "torchvision", "vissl", "vissl-flat", "moco", "swav", "deepcluster-v2", "dino",
                                  "moco-with-args", "swav-with-numpy", "dino-with-args"])
def test_each_format_loads_bit_identically(reference, name, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "TRUSTED", False)  # weights_only loading, as every script does by default
    path = tmp_path / f"{name}.pth"
    torch.save(formats(reference)[name], path)
    imports = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    if name.endswith("-with-args"):  # the allowlist is what lets these load
        assert "argparse.Namespace" in imports
    if name == "swav-with-numpy" or name == "dino-with-args":
        assert any(n.startswith("numpy.") for n in imports), imports
    trunk, info = features.load_trunk(str(path))
    assert trunk.arch == "resnet18" and not trunk.cifar_stem  # inferred from the shapes
    loaded = trunk.state_dict()
    for key, value in reference.items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert info["missing_keys"] == []
    assert "fc.weight" in " ".join(info["unexpected_keys"]) or name in ("vissl", "vissl-flat")
    if name.endswith("-with-args"):  # the rest of the file came back too
        loaded_args = checkpoint.load(path)["args"]
        assert isinstance(loaded_args, argparse.Namespace) and loaded_args.arch == "resnet50"


def test_explicit_key_and_prefixes(reference, tmp_path):
    path = tmp_path / "custom.pth"
    torch.save({"runs": {"last": {"net.enc.": None, **prefixed(reference, "net.enc.")}}}, path)
    trunk, _ = features.load_trunk(str(path), "resnet18", False, state_dict_key="runs.last", remove_prefix="net.enc.")
    assert torch.equal(trunk.state_dict()["layer4.1.bn2.running_var"], reference["layer4.1.bn2.running_var"])
    # VISSL's APPEND_PREFIX: keys gain a prefix, which the detection then strips again
    torch.save(dict(reference), path)
    trunk, _ = features.load_trunk(str(path), "resnet18", False, append_prefix="trunk.")
    assert torch.equal(trunk.state_dict()["conv1.weight"], reference["conv1.weight"])


def test_refuses_a_trunk_that_does_not_load(reference, tmp_path):
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in reference.items() if not k.startswith("layer4")}, path)
    with pytest.raises(checkpoint.CheckpointError, match="does not load into resnet18.*missing"):
        features.load_trunk(str(path), "resnet18", False)
    torch.save(dict(reference), tmp_path / "r18.pth")
    with pytest.raises(checkpoint.CheckpointError, match="shape mismatch"):
        features.load_trunk(str(tmp_path / "r18.pth"), "resnet50", False)
    with pytest.raises(checkpoint.CheckpointError, match="state-dict-key"):
        features.load_trunk(str(path), "resnet18", False, state_dict_key="teacher")


def test_arch_inference_tells_resnet18_from_resnet34(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    trunk, _ = features.load_trunk(str(path))
    assert trunk.arch == "resnet34"


def test_vissl_pooling_table_at_224():
    trunk = models.build_trunk("resnet50").eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = features.taps(trunk, images, [f"vissl-{s}" for s in features.STAGES] + ["pooled"])
        expected_pooled = trunk(images)
    # VISSL's documented dimensions: conv1 6x6x64, res2 6x6x256, res3 4x4x512, res4 3x3x1024, res5 2x2x2048
    assert {k: v.shape[1] for k, v in out.items()} == {"vissl-conv1": 2304, "vissl-res2": 9216, "vissl-res3": 8192,
                                                        "vissl-res4": 9216, "vissl-res5": 8192, "pooled": 2048}
    torch.testing.assert_close(out["pooled"], expected_pooled)


def test_multilabel_file_list_and_explicit_split(tmp_path, tiny_folder):
    images = sorted(tiny_folder.rglob("*.jpg"))[:3]
    listing = tmp_path / "voc.txt"
    listing.write_text("".join(f"{p} {' '.join(labels)}\n" for p, labels in
                               zip(images, [["1", "0", "-1"], ["0", "1", "1"], ["-1", "0", "0"]])))
    dataset = data.build_split(str(listing) + "@test")
    assert len(dataset) == 3 and dataset[0][1] == [1, 0, -1]
    (tmp_path / "bad.txt").write_text(f"{images[0]} 1 2 0\n")
    with pytest.raises(data.DataError, match="labels in"):
        data.build_dataset(str(tmp_path / "bad.txt"))
    assert len(data.build_split("cifar10-mini@test")) == 1000


@pytest.mark.parametrize("layout", ["ours", "swav"])
def test_head_tap_rebuilds_the_projection_head(reference, layout, tmp_path):
    torch.manual_seed(1)
    head = models.mlp([512, 64, 16]).eval()
    head[1].running_mean.normal_()
    if layout == "ours":
        ckpt = {"method": "simclr", "arch": "resnet18", "cifar_stem": False, "trunk": dict(reference),
                "model": {**prefixed(reference, "trunk."), **prefixed(head.state_dict(), "head.")}}
    else:
        ckpt = {"state_dict": {**prefixed(reference, "module."), **prefixed(head.state_dict(), "module.projection_head."),
                               "module.prototypes.weight": torch.randn(5, 16)}}
    torch.save(ckpt, tmp_path / "with_head.pth")
    trunk, _ = features.load_trunk(str(tmp_path / "with_head.pth"), with_head=True)
    trunk.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(features.taps(trunk, images, ["head"])["head"], head(trunk(images)))
    random_trunk, _ = features.load_trunk("random", "resnet18")
    with pytest.raises(ValueError, match="projection head"):
        features.taps(random_trunk, images, ["head"])

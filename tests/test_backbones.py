"""Every trunk family of common/models.py: shapes, taps, torchvision-compatible checkpoints, DINO's ViT details."""
import math

import numpy as np
import pytest
import torch
import torchvision

from common import checkpoint, features, foreign, models
from tests.helpers import last_json, run_script

SMALL_ONES = ["resnet18", "regnet_x_400mf", "convnext_tiny", "vit_ti_16"]
VIT_TI = dict(image_size=224, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768)
VIT_S = dict(image_size=224, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)


def reference_model(arch):
    """The torchvision model a trunk's checkpoint must load into (DINO's sizes for the ViTs torchvision lacks)."""
    sizes = {"vit_ti_16": VIT_TI, "vit_s_16": VIT_S}
    if arch in sizes:
        return torchvision.models.VisionTransformer(**sizes[arch], num_classes=1000)
    return torchvision.models.get_model(arch)


def drop_classifier(model, arch):
    """torchvision's model with its last Linear layer replaced by an identity, as a trunk should be."""
    family = models.family_of(arch)
    if family in ("resnet", "regnet"):
        model.fc = torch.nn.Identity()
    elif family == "convnext":
        model.classifier[2] = torch.nn.Identity()
    else:
        model.heads = torch.nn.Identity()
    return model


def test_resnet_path_is_torchvision_unchanged():
    torch.manual_seed(3)
    trunk = models.build_trunk("resnet18")
    torch.manual_seed(3)
    reference = torchvision.models.resnet18()
    reference.fc = torch.nn.Identity()
    assert str(trunk) == str(reference) and type(trunk) is torchvision.models.ResNet
    assert list(trunk.state_dict()) == list(reference.state_dict())
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in trunk.state_dict().items())
    assert (trunk.arch, trunk.cifar_stem, trunk.feature_dim) == ("resnet18", False, 512)
    assert models.TAPS == ("conv1", "res2", "res3", "res4", "res5", "pooled")
    assert models.resnet_names() == sorted(n for n in torchvision.models.list_models(module=torchvision.models)
                                           if n.startswith(("resnet", "wide_resnet", "resnext")))


@pytest.mark.parametrize("arch", SMALL_ONES)
def test_feature_shapes_and_taps_at_small_sizes(arch):
    torch.manual_seed(0)
    trunk = models.build_trunk(arch).eval()
    family = models.family_of(arch)
    dims = {"resnet": [64, 64, 128, 256, 512, 512], "regnet": [32, 32, 64, 160, 400, 400],
            "convnext": [96, 96, 192, 384, 768, 768], "vit": [192, 192, 4 * 192, 2 * 192, 192]}[family]
    assert trunk.feature_dim == dims[-1]
    for size in ((32, 48) if family == "vit" else (32, 64)):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            pooled = trunk(x)
            taps = models.features(trunk, x, models.FAMILY_TAPS[family])
            eval_taps = features.taps(trunk, x, features.layer_names(trunk)[:len(dims)])
        assert pooled.shape == (2, trunk.feature_dim)
        assert [taps[name].shape for name in models.FAMILY_TAPS[family]] == [(2, d) for d in dims]
        assert torch.equal(taps["pooled"], pooled)
        assert all(torch.equal(eval_taps[name], taps[name]) for name in eval_taps if name in taps)
    with pytest.raises(ValueError, match=r"unknown layer\(s\) \['res9'\] for " + arch):
        models.features(trunk, x, ["res9"])
    with pytest.raises(ValueError, match="unknown layer.*choose from " + ", ".join(features.layer_names(trunk))):
        features.taps(trunk, x, ["res9"])


def test_vit_taps_are_dinos_features():
    """cls, patch_mean, cls_last4 and cls_avgpool against get_intermediate_layers as DINO's eval_linear.py uses it."""
    torch.manual_seed(0)
    trunk = models.build_trunk("vit_ti_16").eval()
    x = torch.randn(3, 3, 32, 48)  # a 2 x 3 patch grid
    with torch.no_grad():
        taps = models.features(trunk, x, models.FAMILY_TAPS["vit"])
        tokens, outputs = trunk.tokens(x), []
        for layer in trunk.encoder.layers:
            tokens = layer(tokens)
            outputs.append(trunk.encoder.ln(tokens))
    last4 = outputs[-4:]
    torch.testing.assert_close(taps["cls_last4"], torch.cat([o[:, 0] for o in last4], dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(taps["cls"], outputs[-1][:, 0], rtol=0, atol=0)
    patch_mean = torch.mean(outputs[-1][:, 1:], dim=1)
    torch.testing.assert_close(taps["patch_mean"], patch_mean, rtol=0, atol=0)
    avgpool = torch.cat((outputs[-1][:, 0].unsqueeze(-1), patch_mean.unsqueeze(-1)), dim=-1).reshape(3, -1)
    torch.testing.assert_close(taps["cls_avgpool"], avgpool, rtol=0, atol=0)
    assert outputs[-1].shape == (3, 1 + 2 * 3, 192)


def bicubic_resize(grid, rows, cols, scale_rows, scale_cols):
    """Bicubic resampling of a [n, n, D] float64 array, written out: Keys' kernel with a = -0.75, half-pixel
    centres (source = (i + 0.5) / scale - 0.5), edge samples repeated (PyTorch's align_corners=False)."""
    a = -0.75

    def weights(t):
        near = lambda s: ((a + 2) * s - (a + 3)) * s * s + 1  # |s| <= 1
        far = lambda s: ((a * s - 5 * a) * s + 8 * a) * s - 4 * a  # 1 < |s| < 2
        return [far(t + 1), near(t), near(1 - t), far(2 - t)]

    def resize_axis(array, size, scale):
        out = np.zeros((size,) + array.shape[1:])
        for i in range(size):
            source = (i + 0.5) / scale - 0.5
            base = math.floor(source)
            for offset, w in zip(range(-1, 3), weights(source - base)):
                out[i] += w * array[min(max(base + offset, 0), len(array) - 1)]
        return out

    by_rows = resize_axis(grid, rows, scale_rows)
    return resize_axis(by_rows.transpose(1, 0, 2), cols, scale_cols).transpose(1, 0, 2)


def test_position_embeddings_follow_dinos_interpolation():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 14 * 14, 8, dtype=torch.float64)
    assert models.interpolate_pos_embedding(pos, (14, 14)) is pos  # the grid they were made for: unchanged
    for rows, cols in ((2, 2), (3, 5), (6, 6), (20, 17)):
        got = models.interpolate_pos_embedding(pos, (rows, cols))
        # DINO: scale factors (grid + 0.1) / 14, the patch embeddings as a 14 x 14 grid, flattened back row-major
        patch = bicubic_resize(pos[0, 1:].reshape(14, 14, 8).numpy(), rows, cols, (rows + 0.1) / 14, (cols + 0.1) / 14)
        assert got.shape == (1, 1 + rows * cols, 8)
        assert torch.equal(got[:, 0], pos[:, 0])
        np.testing.assert_allclose(got[0, 1:].numpy(), patch.reshape(rows * cols, 8), rtol=0, atol=1e-12)


def test_vit_forward_equals_torchvisions_at_its_size_and_at_interpolated_sizes():
    torch.manual_seed(0)
    trunk = models.build_trunk("vit_ti_16").eval()
    state = models.trunk_state_dict(trunk)
    x = torch.randn(2, 3, 224, 224)
    reference = torchvision.models.VisionTransformer(**VIT_TI).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(trunk(x), drop_classifier(reference, "vit_ti_16")(x))
    # at 48 px: torchvision's model made for 48 px, given the interpolated position embeddings
    small = torchvision.models.VisionTransformer(**dict(VIT_TI, image_size=48)).eval()
    small.load_state_dict(dict(state, **{"encoder.pos_embedding":
                                         models.interpolate_pos_embedding(state["encoder.pos_embedding"], (3, 3))}))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), drop_classifier(small, "vit_ti_16")(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of its 16-px patches, got 40x48"):
        trunk(torch.randn(1, 3, 40, 48))


@pytest.mark.parametrize("arch", SMALL_ONES + ["vit_s_16"])
def test_checkpoint_round_trip_through_torchvision(arch):
    """trunk_state_dict loads strictly into torchvision's model (which, for the same seed, drew the same initial
    weights) and gives the same features; load_trunk_state brings it back exactly."""
    torch.manual_seed(1)
    trunk = models.build_trunk(arch).eval()
    torch.manual_seed(1)
    reference = reference_model(arch)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in trunk.state_dict().items())
    state = models.trunk_state_dict(trunk)
    classifier = models.CLASSIFIER[models.family_of(arch)]
    assert torch.count_nonzero(state[f"{classifier}.weight"]) == 0 and state[f"{classifier}.weight"].shape[0] == 1000
    reference.load_state_dict(state)  # strict
    reference = drop_classifier(reference, arch).eval()
    size = 224 if models.family_of(arch) == "vit" else 64
    x = torch.randn(2, 3, size, size)
    torch.manual_seed(2)
    fresh = models.build_trunk(arch).eval()
    models.load_trunk_state(fresh, state)
    assert all(torch.equal(v, trunk.state_dict()[k]) for k, v in fresh.state_dict().items())
    with torch.no_grad():
        expected = trunk(x)
        assert torch.equal(fresh(x), expected)
        torch.testing.assert_close(reference(x), expected, rtol=0, atol=0)


def test_big_vits_match_torchvisions_names_and_sizes():
    """vit_b_16 (torchvision's) and vit_s_16 (DINO's sizes) without building their weights."""
    counts = {}
    for arch in ("vit_ti_16", "vit_s_16", "vit_b_16"):
        trunk = models.meta_trunk(arch)
        width = trunk.feature_dim
        sizes = {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
        sizes.update({"heads.head.weight": (1000, width), "heads.head.bias": (1000,)})
        if arch == "vit_b_16":
            with torch.device("meta"):  # torchvision's own vit_b_16
                reference = torchvision.models.vit_b_16()
        else:
            with torch.device("meta"):
                reference = torchvision.models.VisionTransformer(**(VIT_TI if arch == "vit_ti_16" else VIT_S))
        assert sizes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        counts[arch] = sum(v.numel() for v in trunk.parameters())
        mlp = 4 * width
        block = 2 * 2 * width + 3 * width * width + 3 * width + width * width + width + 2 * width * mlp + mlp + width
        assert counts[arch] == 3 * 16 * 16 * width + width + width + 197 * width + 12 * block + 2 * width
    assert round(counts["vit_s_16"] / 1e6, 1) == 21.7  # DINO's ViT-S/16: 21.7M parameters (without a head)
    assert counts["vit_b_16"] + 768 * 1000 + 1000 == 86_567_656  # torchvision's vit_b_16 with its classifier
    assert (counts["vit_ti_16"] / 1e6) == pytest.approx(5.5, abs=0.05)


def test_refusals():
    trunk = models.build_trunk("vit_ti_16")
    vit_s = models.trunk_state_dict(models.meta_trunk("vit_s_16").to_empty(device="cpu"))
    with pytest.raises(ValueError, match=r"does not fit vit_ti_16: class_token has shape \(1, 1, 384\), "
                                         r"expected \(1, 1, 192\)"):
        models.load_trunk_state(trunk, vit_s)
    convnext = models.build_trunk("convnext_tiny")
    state = models.trunk_state_dict(convnext)
    del state["classifier.0.weight"]
    with pytest.raises(ValueError, match=r"^the checkpoint's trunk does not fit convnext_tiny: missing "
                                         r"classifier\.0\.weight\.$"):
        models.load_trunk_state(convnext, state)
    with pytest.raises(ValueError, match="unknown architecture 'vit_x_99'; choose one of: .*convnext_tiny.*"
                                         "regnet_x_400mf.*resnet18.*vit_s_16, vit_ti_16"):
        models.build_trunk("vit_x_99")
    with pytest.raises(ValueError, match="--cifar-stem exists for ResNets only, not vit_s_16"):
        models.build_trunk("vit_s_16", cifar_stem=True)
    # zero_init_residual, a ResNet option some scripts default to, leaves other families as torchvision builds them
    torch.manual_seed(0)
    ignored = models.build_trunk("regnet_x_400mf", zero_init_residual=True).state_dict()
    torch.manual_seed(0)
    assert all(torch.equal(v, ignored[k]) for k, v in models.build_trunk("regnet_x_400mf").state_dict().items())
    with pytest.raises(ValueError, match="--layers head needs a checkpoint"):
        features.taps(trunk, torch.randn(1, 3, 32, 32), ["cls", "head"])


def to_dino_names(state):
    """torchvision's ViT names -> those of DINO's vision_transformer.py (timm's), written out independently."""
    out = {}
    for key, value in state.items():
        if key.startswith("heads."):
            continue
        key = {"class_token": "cls_token", "encoder.pos_embedding": "pos_embed"}.get(key, key)
        key = key.replace("conv_proj.", "patch_embed.proj.").replace("encoder.ln.", "norm.")
        if key.startswith("encoder.layers.encoder_layer_"):
            index, rest = key[len("encoder.layers.encoder_layer_"):].split(".", 1)
            rest = {"self_attention.in_proj_weight": "attn.qkv.weight",
                    "self_attention.in_proj_bias": "attn.qkv.bias"}.get(rest, rest)
            for old, new in (("ln_1.", "norm1."), ("ln_2.", "norm2."), ("self_attention.out_proj.", "attn.proj."),
                             ("mlp.0.", "mlp.fc1."), ("mlp.3.", "mlp.fc2.")):
                rest = rest.replace(old, new)
            key = f"blocks.{index}.{rest}"
        out[key] = value
    return out


def dino_vit_forward(state, images, heads):
    """DINO's VisionTransformer.forward at its own size (224 px), float64, from the timm-named weights."""
    s = {k: v.double() for k, v in state.items()}
    ln = lambda x, p: torch.nn.functional.layer_norm(x, x.shape[-1:], s[p + "weight"], s[p + "bias"], eps=1e-6)
    x = torch.nn.functional.conv2d(images.double(), s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], 16)
    x = torch.cat([s["cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + s["pos_embed"]
    b, n, c = x.shape
    for i in range(12):
        p = f"blocks.{i}."
        qkv = (ln(x, p + "norm1.") @ s[p + "attn.qkv.weight"].t() + s[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(b, n, c)
        x = x + mixed @ s[p + "attn.proj.weight"].t() + s[p + "attn.proj.bias"]
        hidden = torch.nn.functional.gelu(ln(x, p + "norm2.") @ s[p + "mlp.fc1.weight"].t() + s[p + "mlp.fc1.bias"])
        x = x + hidden @ s[p + "mlp.fc2.weight"].t() + s[p + "mlp.fc2.bias"]
    return ln(x, "norm.")[:, 0]


def test_foreign_vit_convnext_regnet_checkpoints_load_and_are_recognised(tmp_path):
    torch.manual_seed(0)
    vit = models.build_trunk("vit_ti_16").eval()
    for p in vit.parameters():  # LayerNorms away from 1 / 0, so that a swapped weight would show
        p.data.add_(0.1 * torch.randn_like(p))
    dino = to_dino_names(vit.state_dict())
    assert set(dino) == set(foreign.dino_vit_names(12))
    # DINO's full checkpoint: the teacher's backbone and head, the student under module.
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in dino.items()}, "head.mlp.0.weight": torch.randn(4, 192)},
                "student": {f"module.backbone.{k}": torch.randn_like(v) for k, v in dino.items()}, "epoch": 3},
               tmp_path / "dino.pth")
    trunk, info = features.load_trunk(str(tmp_path / "dino.pth"))
    assert trunk.arch == "vit_ti_16" and "DINO ViT names" in info["found"] and info["missing_keys"] == []
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in trunk.state_dict().items())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(trunk.double()(x.double()), dino_vit_forward(dino, x, heads=3), rtol=1e-9, atol=1e-9)
    # torchvision-named trunks under a prefix, each family told apart by its names and shapes
    for arch in ("vit_ti_16", "convnext_tiny", "regnet_x_400mf"):
        state = models.trunk_state_dict(models.build_trunk(arch))
        torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in state.items()}}, tmp_path / f"{arch}.pth")
        trunk, info = features.load_trunk(str(tmp_path / f"{arch}.pth"))
        assert trunk.arch == arch and not trunk.cifar_stem and info["missing_keys"] == []
        assert all(torch.equal(v, state[k]) for k, v in trunk.state_dict().items())
    with pytest.raises(checkpoint.CheckpointError, match="does not load into vit_s_16.*shape mismatch"):
        features.load_trunk(str(tmp_path / "vit_ti_16.pth"), "vit_s_16")


def test_our_checkpoint_of_a_vit_and_eval_knn_on_it(tmp_path, tiny_folder):
    torch.manual_seed(0)
    trunk = models.build_trunk("vit_ti_16")
    path = tmp_path / "ours.pth"
    torch.save({"method": "simclr", "arch": "vit_ti_16", "cifar_stem": False, "trunk": models.trunk_state_dict(trunk),
                "model": {}, "args": {"crops": "2x32"}}, path)
    loaded, info = features.load_trunk(str(path))
    assert loaded.arch == "vit_ti_16" and info["train_crop_size"] == 32
    assert all(torch.equal(v, trunk.state_dict()[k]) for k, v in loaded.state_dict().items())
    cached = tmp_path / "features.pth"
    base = ["--arch", "vit_ti_16", "--image-size", "32", "--workers", "0", "--train-data", tiny_folder,
            "--test-data", tiny_folder]
    knn = last_json(run_script("eval_knn.py", "--weights", "random", *base, "--layers", "cls_last4", "pooled",
                               "patch_mean", "--save-features", cached).stdout)
    assert knn["n_train"] == 24 and knn["layer"] == "cls_last4"
    stored = features.load_features(cached)
    assert {k: v.shape for k, v in stored["train_features"].items()} == {"cls_last4": (24, 768), "pooled": (24, 192),
                                                                          "patch_mean": (24, 192)}

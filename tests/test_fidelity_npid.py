"""NPID / NPID++ / PIRL against float64 re-derivations of the original code, on odd sizes.

The references below are written from the papers (Wu et al. 2018 Eq. 2-4; Misra & van der Maaten 2020
Eq. 5) and from how lemniscate.pytorch (NCEAverage, NCECriterion) and VISSL (NCELossWithMemory, its PIRL
transforms) compute them: one sample and one memory entry at a time, in Python floats.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import npid
import pirl
from common import augment, cli, optim

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # VISSL's NCECriterion eps (lemniscate.pytorch: 1e-7)


def npid_fid_unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=1)


def npid_fid_dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b))


def npid_fid_partition(v, positives, noise, temperature, n_data):
    """NCEAverage's Z: n times the mean of exp(score / T) over the first batch's B x (K + 1) scores, the
    positive in column 0."""
    scores = [[npid_fid_dot(v[i], positives[i])] + [npid_fid_dot(v[i], w) for w in noise] for i in range(len(v))]
    flat = [math.exp(s / temperature) for row in scores for s in row]
    return n_data * sum(flat) / len(flat)


def npid_fid_nce(v, positives, noise, z, temperature, n_data):
    """VISSL's NCECriterion on NCEAverage's output: out = exp(score / T) / Z, P(model) = out_0 / (out_0 + K Pn + eps),
    P(noise) = K Pn / (out_j + K Pn + eps); loss = -(sum of the logs) / B."""
    k, pn = len(noise), 1.0 / n_data
    total = 0.0
    for i in range(len(v)):
        out_pos = math.exp(npid_fid_dot(v[i], positives[i]) / temperature) / z
        total += math.log(out_pos / (out_pos + k * pn + FLOAT32_EPS))
        for w in noise:
            out = math.exp(npid_fid_dot(v[i], w) / temperature) / z
            total += math.log(k * pn / (out + k * pn + FLOAT32_EPS))
    return -total / len(v)


def npid_fid_nce_grad(v, positives, noise, z, temperature, n_data):
    """d loss / d v_i of the NCE loss, derived by hand (lemniscate's NCEFunction.backward): with
    h = out / (out + K Pn + eps), (1 / B T) [-(1 - h_pos) m_i + sum_j h_j noise_j]."""
    k, pn = len(noise), 1.0 / n_data
    grads = []
    for i in range(len(v)):
        def h(w):
            out = math.exp(npid_fid_dot(v[i], w) / temperature) / z
            return out / (out + k * pn + FLOAT32_EPS)
        g = [-(1 - h(positives[i])) * float(x) for x in positives[i]]
        for w in noise:
            hw = h(w)
            g = [a + hw * float(b) for a, b in zip(g, w)]
        grads.append([a / (len(v) * temperature) for a in g])
    return torch.tensor(grads, dtype=torch.float64)


def npid_fid_cross_entropy(v, positives, noise, temperature):
    """VISSL's cross_entropy loss type: logits [v_i . m_i, v_i . noise_1, ...] / T, label 0, batch mean."""
    total = 0.0
    for i in range(len(v)):
        logits = [npid_fid_dot(v[i], positives[i]) / temperature] + [npid_fid_dot(v[i], w) / temperature for w in noise]
        top = max(logits)
        total += top + math.log(sum(math.exp(x - top) for x in logits)) - logits[0]
    return total / len(v)


def npid_fid_cross_entropy_grad(v, positives, noise, temperature):
    """d loss / d v_i = (1 / B T) (sum_k p_k key_k - m_i) with p the softmax over [m_i; noise]."""
    grads = []
    for i in range(len(v)):
        keys = [positives[i]] + list(noise)
        logits = [npid_fid_dot(v[i], key) / temperature for key in keys]
        top = max(logits)
        weights = [math.exp(x - top) for x in logits]
        p = [w / sum(weights) for w in weights]
        g = [-float(x) for x in positives[i]]
        for pk, key in zip(p, keys):
            g = [a + pk * float(b) for a, b in zip(g, key)]
        grads.append([a / (len(v) * temperature) for a in g])
    return torch.tensor(grads, dtype=torch.float64)


SIZES = [(7, 5, 13, 101, 0.07), (3, 9, 31, 1009, 0.1), (1, 3, 5, 11, 0.5)]  # B, D, K, n, T


@pytest.mark.parametrize("batch,dim,k,n_data,temperature", SIZES)
@pytest.mark.parametrize("module", [npid, pirl], ids=["npid", "pirl"])
def test_npid_fidelity_nce_loss_z_and_gradient(module, batch, dim, k, n_data, temperature):
    """Z from the first batch, the NCE loss and its gradient w.r.t. the embeddings, against lemniscate's formulas."""
    v = npid_fid_unit(batch, dim, seed=1).requires_grad_(True)
    positives, noise = npid_fid_unit(batch, dim, seed=2), npid_fid_unit(k, dim, seed=3)
    z = module.estimate_z(v.detach(), positives, noise, temperature, n_data)
    z_ref = npid_fid_partition(v.detach(), positives, noise, temperature, n_data)
    assert abs(float(z) - z_ref) <= 1e-12 * z_ref
    loss = module.nce_loss(v, positives, noise, z, temperature, n_data)
    assert loss.dtype == torch.float64
    ref = npid_fid_nce(v.detach(), positives, noise, z_ref, temperature, n_data)
    assert abs(loss.item() - ref) <= 1e-11 * max(1.0, abs(ref)), (loss.item(), ref)
    loss.backward()
    torch.testing.assert_close(v.grad, npid_fid_nce_grad(v.detach(), positives, noise, z_ref, temperature, n_data),
                               rtol=1e-10, atol=1e-12)


def test_npid_fidelity_nce_keeps_the_criterion_eps():
    """With K Pn far below float32's eps the eps dominates the denominators, as in NCECriterion."""
    v, positives, noise = npid_fid_unit(3, 4, seed=4), npid_fid_unit(3, 4, seed=5), npid_fid_unit(2, 4, seed=6)
    z, n_data = 50.0, 10**9  # K Pn = 2e-9 << eps
    got = npid.nce_loss(v, positives, noise, torch.tensor(z, dtype=torch.float64), 0.2, n_data).item()
    ref = npid_fid_nce(v, positives, noise, z, 0.2, n_data)
    assert abs(got - ref) <= 1e-11 * abs(ref)


@pytest.mark.parametrize("batch,dim,k,n_data,temperature", SIZES)
@pytest.mark.parametrize("module", [npid, pirl], ids=["npid", "pirl"])
def test_npid_fidelity_cross_entropy_is_vissls_value_and_gradient(module, batch, dim, k, n_data, temperature):
    v = npid_fid_unit(batch, dim, seed=7).requires_grad_(True)
    positives, noise = npid_fid_unit(batch, dim, seed=8), npid_fid_unit(k, dim, seed=9)
    loss = module.info_nce_loss(v, positives, noise, temperature)
    ref = npid_fid_cross_entropy(v.detach(), positives, noise, temperature)
    assert abs(loss.item() - ref) <= 1e-12 * max(1.0, ref), (loss.item(), ref)
    loss.backward()
    torch.testing.assert_close(v.grad, npid_fid_cross_entropy_grad(v.detach(), positives, noise, temperature),
                               rtol=1e-10, atol=1e-12)


def test_npid_fidelity_cross_entropy_ignores_the_other_positives():
    """Each image's loss depends on its own memory entry and the noise only: the batch's other positives are
    no negatives (a batch loss is the mean of the one-image losses)."""
    v, positives, noise = npid_fid_unit(5, 6, seed=10), npid_fid_unit(5, 6, seed=11), npid_fid_unit(7, 6, seed=12)
    whole = npid.info_nce_loss(v, positives, noise, 0.07)
    alone = [npid.info_nce_loss(v[i:i + 1], positives[i:i + 1], noise, 0.07) for i in range(5)]
    torch.testing.assert_close(whole, torch.stack(alone).mean(), rtol=1e-13, atol=0)
    moved = positives.clone()
    moved[1:] = npid_fid_unit(4, 6, seed=13)  # every other image's memory entry
    torch.testing.assert_close(npid.info_nce_loss(v[:1], moved[:1], noise, 0.07), alone[0], rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", ["nce", "cross_entropy"])
def test_npid_fidelity_pirl_loss_is_the_lambda_combination(loss_type):
    """Eq. 5 / VISSL's loss_weights [lambda, 1 - lambda] over the (patches, image) terms."""
    f, g = npid_fid_unit(5, 7, seed=14), npid_fid_unit(5, 7, seed=15)
    positives, noise = npid_fid_unit(5, 7, seed=16), npid_fid_unit(11, 7, seed=17)
    z, n_data, temperature = 37.5, 123, 0.13
    for weight in (0.5, 0.3, 1.0, 0.0):
        args = cli.parse_args(pirl.Args, pirl.PRESETS, ["--jigsaw-weight", str(weight), "--loss-type", loss_type,
                                                        "--temperature", str(temperature)])
        if loss_type == "nce":
            terms = [npid_fid_nce(e, positives, noise, z, temperature, n_data) for e in (g, f)]
        else:
            terms = [npid_fid_cross_entropy(e, positives, noise, temperature) for e in (g, f)]
        expected = weight * terms[0] + (1 - weight) * terms[1]
        got = pirl.pirl_loss(f, g, positives, noise, torch.tensor(z, dtype=torch.float64), args, n_data).item()
        assert abs(got - expected) <= 1e-11 * max(1.0, abs(expected)), (weight, got, expected)


@pytest.mark.parametrize("momentum", [0.5, 0.3, 0.0])
@pytest.mark.parametrize("module", [npid, pirl], ids=["npid", "pirl"])
def test_npid_fidelity_memory_update(module, momentum):
    """m_i <- (momentum m_i + (1 - momentum) v_i) / |...|, rows other than the batch's untouched."""
    memory = module.MemoryBank(13, 5, momentum=momentum, seed=3).double()
    before = memory.bank.clone()
    for row in before:
        assert abs(math.sqrt(npid_fid_dot(row, row)) - 1) < 1e-6  # VISSL's norm_init (float32 draw)
    v, idx = npid_fid_unit(3, 5, seed=18), torch.tensor([11, 0, 6])
    memory.update(v, idx)
    for b, i in enumerate(idx.tolist()):
        mixed = [momentum * float(m) + (1 - momentum) * float(x) for m, x in zip(before[i], v[b])]
        norm = math.sqrt(sum(x * x for x in mixed))
        torch.testing.assert_close(memory.bank[i], torch.tensor([x / norm for x in mixed], dtype=torch.float64),
                                   rtol=1e-13, atol=1e-15)
    others = [i for i in range(13) if i not in (11, 0, 6)]
    assert torch.equal(memory.bank[others], before[others])


def test_npid_fidelity_weight_decay_groups_follow_vissl():
    """NPID (VISSL regularize_bias True, regularize_bn False): the head's weight and bias decay, BatchNorm does
    not; PIRL (regularize_bias False): biases and BatchNorm are both free."""
    args = npid.parse_args(["--arch", "resnet18"])
    model = npid.NPID(args)
    decayed, plain = optim.decay_all_but_norm(model, 1e-4)
    assert decayed["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert "head.bias" in decayed_names and "head.weight" in decayed_names
    bn = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert plain_names == {f"{m}.{p}" for m in bn for p in ("weight", "bias")}
    assert decayed_names | plain_names == set(names.values()) and not decayed_names & plain_names


def _pirl_per_image_draws(n, *flags):
    """The parameters PIRL's per-image path draws for n images (augment.PerImage(pirl.view_recipe(args)).sample,
    from torch's default generator, seeded with 0): per image [(count, View, params)], params in the batched layout
    of common.gpu_aug's ViewAugmentation.sample_params."""
    args = cli.parse_args(pirl.Args, pirl.PRESETS, list(flags))
    per_image = augment.PerImage(pirl.view_recipe(args))
    torch.manual_seed(0)
    return args, [per_image.sample(args.patch_crop_size, args.patch_crop_size) for _ in range(n)]


def test_npid_fidelity_pirl_patch_offsets_are_vissls_half_open_range():
    """ImgPatchesFromTensor: offsets np.random.randint(0, cell - patch) on each axis, so 0 .. cell - patch - 1.
    The patch crop is the whole 27-px image (scale 1), so each patch box is in crop pixels."""
    side, patch = 27, 5  # cells of 9 px, offsets 0..3
    args, draws = _pirl_per_image_draws(300, "--image-size", "9", "--patch-crop-size", str(side), "--patch-size",
                                        str(patch), "--patch-crop-scale", "1", "1")
    seen = set()
    for groups in draws:
        (count, _, params), = [(c, v, p) for c, v, p in groups if isinstance(v, augment.Patches)]
        boxes = params["boxes"][:, 0]  # [9, 4] (top, left, height, width)
        assert count == 9 and boxes.shape == (9, 4)
        assert torch.equal(boxes[:, 2:], torch.full((9, 2), float(patch), dtype=boxes.dtype))
        assert torch.equal(boxes, boxes.round())  # whole pixels: the patch is that square of the crop
        for top, left, _, _ in boxes.long().tolist():
            seen.add((left % 9, top % 9))
    assert seen == {(x, y) for x in range(4) for y in range(4)}


def test_npid_fidelity_pirl_photometric_draws_vissls_ranges():
    """RandomPosterizeTransform: bits in 4..8; RandomSolarizeTransform: threshold in 0..256 (closed_interval=True:
    np.random.randint(low, high + 1)). The draws of the per-image path (the image and each patch: 10 per image)
    where the photometric transform applies."""
    _, draws = _pirl_per_image_draws(1000, "--image-size", "8", "--patch-crop-size", "24", "--patch-size", "5")
    bits, thresholds = [], []
    for groups in draws:
        for _, _, params in groups:
            photometric = params["photometric"]
            bits += photometric["bits"][photometric["apply"]].tolist()
            thresholds += (photometric["threshold"][photometric["apply"]] * 255).round().long().tolist()
    assert len(bits) > 5000  # p = 0.66 of 10000 views
    assert set(bits) == {4, 5, 6, 7, 8} and abs(bits.count(8) / len(bits) - 0.2) < 0.03
    assert min(thresholds) == 0 and max(thresholds) == 256 and len(set(thresholds)) > 200


def test_npid_fidelity_pirl_photometric_draws_reach_pil_unchanged(monkeypatch):
    """The per-image path (augment.apply) hands its drawn bits and thresholds to PIL's posterize and solarize as
    they are: the integers VISSL's RandomPosterizeTransform and RandomSolarizeTransform would pass."""
    from PIL import ImageOps

    _, draws = _pirl_per_image_draws(20, "--image-size", "8", "--patch-crop-size", "24", "--patch-size", "5")
    given = []
    monkeypatch.setattr(ImageOps, "posterize", lambda image, b: given.append(("bits", b)) or image)
    monkeypatch.setattr(ImageOps, "solarize", lambda image, t: given.append(("threshold", t)) or image)
    image = Image.new("RGB", (24, 24), (10, 120, 200))
    expected = []
    for groups in draws:
        for count, view, params in groups:
            photometric = params["photometric"]
            for v in range(count):
                augment.apply(view, image, params, v)
                if photometric["apply"][v]:
                    expected += [("bits", int(photometric["bits"][v])),
                                 ("threshold", int((photometric["threshold"][v] * 255).round()))]
    assert len(expected) > 100 and given == expected

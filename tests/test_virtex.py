"""virtex.py: the captioning losses against a float64 re-derivation, causal masking, the flip's caption rule,
exact resume, 2 processes against 1, bad input, and learning on coco-captions-mini (COCO's layout) when it is
provided beside the repository.

The tests build their own tiny COCO-layout caption set (generated JPEGs and a captions JSON), so nothing outside the
repository is needed; SMALL points at one such set, made once per machine in the temporary folder."""
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import virtex
from common import cli, data
from tests.helpers import metrics, run_script, run_torchrun

WORDS = ["a", "red", "blue", "green", "dog", "cat", "car", "on", "the", "left", "right", "of", "grass", "road"]


def make_tiny_coco(root, n_images=16, size=40, seed=0, captions_per_image=3, without_captions=0):
    """A COCO Captions layout under `root`: train2017/*.jpg (flat colours with a square) and
    annotations/captions_train2017.json, `captions_per_image` short captions each, plus `without_captions` images
    listed without any caption."""
    rng = np.random.default_rng(seed)
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images + without_captions):
        pixels = np.full((size, size, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        corner = rng.integers(0, size // 2, 2)
        pixels[corner[0]:corner[0] + size // 3, corner[1]:corner[1] + size // 3] = rng.integers(0, 255, 3)
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(pixels).save(root / "train2017" / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        if i >= n_images:
            continue
        for c in range(captions_per_image):
            words = [WORDS[j] for j in rng.integers(0, len(WORDS), 3 + (i + c) % 5)]
            annotations.append({"image_id": i + 1, "id": 1000 * i + c, "caption": " ".join(words).capitalize() + "."})
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps({"images": images,
                                                                             "annotations": annotations}))
    return root


def add_tiny_instances(root, objects, categories=((1, "person"), (3, "car"), (90, "toothbrush"))):
    """annotations/instances_train2017.json beside make_tiny_coco's images: `objects` maps an image id to the COCO
    category ids of its objects (repeats allowed); the other images have no objects."""
    captions = json.loads((root / "annotations" / "captions_train2017.json").read_text())
    annotations = [{"image_id": image, "category_id": c, "id": 100 * image + k, "bbox": [0, 0, 1, 1]}
                   for image, cats in objects.items() for k, c in enumerate(cats)]
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps({
        "images": captions["images"], "annotations": annotations,
        "categories": [{"id": i, "name": name} for i, name in categories]}))
    return root


def _tiny_coco():
    """The SMALL flags' caption set, made once (atomically: concurrent test workers may race) in the temp folder."""
    target = Path(tempfile.gettempdir()) / f"ssl-reference-virtex-tiny-coco-v1-{os.getuid()}"
    if not (target / "annotations" / "captions_train2017.json").exists():
        scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        make_tiny_coco(scratch)
        try:
            os.rename(scratch, target)
        except OSError:  # another process made it first
            import shutil
            shutil.rmtree(scratch, ignore_errors=True)
    return target


TINY_COCO = _tiny_coco()
SMALL = ["--data", str(TINY_COCO), "--arch", "resnet18", "--image-size", "32", "--batch-size", "4",
         "--textual-width", "32", "--textual-heads", "2", "--vocab-size", "50", "--max-caption-length", "12",
         "--workers", "0", "--epochs", "2", "--warmup-steps", "2", "--lookahead-steps", "3", "--print-every", "1"]
# a small COCO-layout caption set (80 training images, 5 captions each) under $SSL_DATA_DIR, as the data sets are
MINI = data._data_dir() / "coco-captions-mini"


def tiny_args(*extra):
    return cli.parse_args(virtex.Args, virtex.PRESETS, ["--arch", "resnet18", "--textual-width", "32",
                                                        "--textual-heads", "2", "--max-caption-length", "9",
                                                        *extra])


# ----------------------------------------------------------------------------- the loss, re-derived

def naive_direction_loss(logits, tokens, smoothing):
    """One direction, float64, token by token: at each position t < T-1 whose next token y = tokens[t+1] is not
    [PAD], the smoothed cross-entropy (1 - e) (-log p_y) + e * mean over the V classes of (-log p_k), averaged over
    those positions of the whole batch."""
    total, count = 0.0, 0
    vocab = logits.shape[-1]
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            y = int(tokens[b, t + 1])
            if y == virtex.PAD:
                continue
            z = logits[b, t]
            log_norm = torch.log(torch.exp(z - z.max()).sum()) + z.max()
            nll = [log_norm - z[k] for k in range(vocab)]
            total = total + (1 - smoothing) * nll[y] + smoothing * sum(nll) / vocab
            count += 1
    return total / count


def naive_reverse(row):
    words = [t for t in row.tolist() if t != virtex.PAD]
    return torch.tensor(words[::-1] + [virtex.PAD] * (len(row) - len(words)))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_bicaptioning_loss_is_the_sum_of_both_directions_with_padding_masked(smoothing):
    g = torch.Generator().manual_seed(0)
    batch, length, vocab = 3, 7, 11
    lengths = [7, 4, 3]
    tokens = torch.full((batch, length), virtex.PAD)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randint(len(virtex.SPECIALS), vocab, (n,), generator=g)
        tokens[b, 0], tokens[b, n - 1] = virtex.SOS, virtex.EOS
    forward = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    backward = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    loss, terms = virtex.virtex_loss((forward, backward), tokens, "bicaptioning", smoothing)
    reversed_tokens = torch.stack([naive_reverse(r) for r in tokens])
    assert torch.equal(virtex.reverse_captions(tokens), reversed_tokens)
    assert reversed_tokens[1, 0] == virtex.EOS and reversed_tokens[1, 3] == virtex.SOS
    f64, b64 = forward.detach().clone().requires_grad_(), backward.detach().clone().requires_grad_()
    expected = naive_direction_loss(f64, tokens, smoothing) + naive_direction_loss(b64, reversed_tokens, smoothing)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["forward"] + terms["backward"], loss, rtol=1e-14, atol=0)
    # the logits at padded positions (and at the last position) get no gradient
    grads = torch.autograd.grad(loss, [forward, backward])
    expected_grads = torch.autograd.grad(expected, [f64, b64])
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert grads[0][1, 3:].abs().sum() == 0 and grads[0][:, -1].abs().sum() == 0


def test_token_classification_loss_is_the_mean_log_probability_of_the_distinct_words():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, generator=g, dtype=torch.float64)
    tokens = torch.tensor([[virtex.SOS, 5, 6, 5, virtex.EOS, virtex.PAD], [virtex.SOS, 7, virtex.UNK, virtex.EOS,
                                                                            virtex.PAD, virtex.PAD]])
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    expected = (-(logp[0, 5] + logp[0, 6]) / 2 - logp[1, 7]) / 2
    torch.testing.assert_close(virtex.token_classification_loss(logits, tokens), expected, rtol=1e-14, atol=0)


def test_multilabel_loss_is_the_mean_log_probability_of_the_distinct_categories():
    """multilabel_classification: the same loss with only the padding 0 ignored (category 1 counts)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 3, 0], [2, 0, 0], [1, 2, 3]])
    loss = virtex.virtex_loss(logits, labels, "multilabel_classification")[0]
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    expected = (-(logp[0, 1] + logp[0, 3]) / 2 - logp[1, 2] - (logp[2, 1] + logp[2, 2] + logp[2, 3]) / 3) / 3
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0],
                               rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("task", ["captioning", "bicaptioning"])
def test_decoder_is_causal_and_ignores_padding(task):
    """Changing the tokens after position t leaves the logits up to t unchanged (both directions' decoders), and
    the output layer is the word embedding."""
    torch.manual_seed(0)
    args = tiny_args("--task", task, "--textual-layers", "2")
    model = virtex.VirTex(args, 20).double().eval()
    head = model.textual
    assert head.output.weight is head.embedding.words.weight
    grid = torch.randn(2, 512, 2, 2, dtype=torch.float64)
    tokens = torch.tensor([[virtex.SOS, 5, 6, 7, 8, 9, virtex.EOS], [virtex.SOS, 10, 11, 12, 13, 14, 15]])
    for backward in ([False, True] if task == "bicaptioning" else [False]):
        before = head(grid, tokens, backward=backward)
        for t in range(tokens.shape[1] - 1):
            changed = tokens.clone()
            changed[:, t + 1:] = torch.randint(5, 20, changed[:, t + 1:].shape)
            after = head(grid, changed, backward=backward)
            torch.testing.assert_close(after[:, :t + 1], before[:, :t + 1], rtol=0, atol=1e-12)
            assert not torch.allclose(after[:, t + 1:], before[:, t + 1:])
    if task == "bicaptioning":
        assert head.backward_transformer is not head.transformer
        assert all(torch.equal(a, b) for a, b in zip(head.transformer.parameters(),
                                                     head.backward_transformer.parameters()))  # a copy at the start
    # padded positions: the tokens before them decode the same with or without extra padding
    padded = torch.cat([tokens[:1, :4], torch.full((1, 3), virtex.PAD)], dim=1)
    torch.testing.assert_close(head(grid[:1], padded)[:, :4], head(grid[:1], tokens[:1, :4]), rtol=0, atol=1e-12)


def test_masked_lm_decoder_sees_both_sides():
    torch.manual_seed(0)
    model = virtex.VirTex(tiny_args("--task", "masked_lm"), 20).double().eval()
    grid = torch.randn(1, 512, 2, 2, dtype=torch.float64)
    tokens = torch.tensor([[virtex.SOS, 5, virtex.MASK, 7, virtex.EOS]])
    changed = tokens.clone()
    changed[0, 3] = 8
    assert not torch.allclose(model.textual(grid, tokens)[:, 2], model.textual(grid, changed)[:, 2])


def test_trunk_grid_and_optimizer_groups():
    args = cli.parse_args(virtex.Args, None, ["--textual-width", "128"])
    assert (args.textual_layers, args.dropout, args.lr, args.textual_lr, args.weight_decay, args.momentum) == \
        (1, 0.1, 0.2, 0.001, 1e-4, 0.9)
    assert (args.warmup_steps, args.max_caption_length, args.vocab_size, args.crop_scale, args.jitter) == \
        (10000, 30, 10000, (0.2, 1.0), (0.4, 0.4, 0.4, 0.1))
    model = virtex.VirTex(args, 30)
    assert virtex.resnet_grid(model.trunk, torch.randn(1, 3, 224, 224)).shape == (1, 2048, 7, 7)
    layer = model.textual.transformer.layers[0]
    assert layer.self_attn.num_heads == 2 and layer.linear1.out_features == 512 and not layer.norm_first
    optimizer = virtex.build_optimizer(model, args, 512)
    setting = {id(p): (g["lr_scale"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert setting[id(named["trunk.conv1.weight"])] == (0.4, 1e-4)
    assert setting[id(named["trunk.bn1.bias"])] == (0.4, 1e-4)  # the trunk's BatchNorm is decayed, as the original's
    assert setting[id(named["textual.embedding.words.weight"])] == (0.002, 1e-4)
    assert setting[id(named["textual.embedding.layer_norm.weight"])] == (0.002, 0.0)
    assert setting[id(named["textual.backward_transformer.layers.0.norm1.bias"])] == (0.002, 0.0)
    assert setting[id(named["textual.transformer.layers.0.linear1.bias"])] == (0.002, 0.0)
    assert setting[id(named["textual.visual_projection.bias"])] == (0.002, 1e-4)


# ----------------------------------------------------------------------------- captions and views

def test_flip_swaps_left_and_right_with_the_image():
    assert virtex.swap_left_right(virtex.caption_words("A dog LEFT of the right car, leftover.")) == \
        ["a", "dog", "right", "of", "the", "left", "car", ",", "leftover", "."]
    vocabulary = virtex.Vocabulary.build(["left right up"], 10)
    args = cli.parse_args(virtex.Args, None, ["--image-size", "16", "--jitter-p", "0", "--crop-scale", "1", "1",
                                              "--single-caption"])
    views = virtex.CaptionViews(args, vocabulary)
    image = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8)[None, :, None] * 16, (16, 1, 3)))
    item = ((image, ("left up right",)), -1)
    seen = set()
    for index in range(12):
        (x, tokens), _, _, _ = data.ViewDataset([item] * 12, views, seed=0)[(0, index)]
        flipped = bool(x[0, 0, 0] > x[0, 0, -1])  # the gradient runs right to left after a flip
        words = vocabulary.decode(tokens.tolist()[1:])
        assert words == ("right up left" if flipped else "left up right")
        seen.add(flipped)
    assert seen == {True, False}


def test_vocabulary_truncation_and_masking():
    vocabulary = virtex.Vocabulary.build(["b a a", "c a b", "d"], 2)
    assert vocabulary.tokens == virtex.SPECIALS + ["a", "b"]
    ids = vocabulary.encode(["a", "b", "c", "a"], 5)
    assert ids == [virtex.SOS, 5, 6, virtex.UNK, 5]  # truncated to 5: [EOS] falls off, as in the original
    assert vocabulary.decode(ids[1:] + [virtex.EOS, 6]) == "a b [UNK] a"
    args = tiny_args("--task", "masked_lm")
    torch.manual_seed(0)
    for _ in range(20):
        masked, labels = virtex.mask_words([virtex.SOS, 5, 6, 5, 6, 5, 6, virtex.EOS], 7, args)
        changed = [i for i, y in enumerate(labels) if y != virtex.PAD]
        assert len(changed) == 1 and changed[0] not in (0, 7)  # int(6 x 0.15) = 0 -> at least one word
        assert masked[changed[0]] == virtex.MASK  # a lone chosen word is always [MASK]ed
        assert masked[0] == virtex.SOS and masked[-1] == virtex.EOS
    # 20 words, 3 chosen: only the [MASK]ed ones are labelled (MaskedLmDataset); about 15% of the chosen words
    # become random words or stay, unlabelled
    caption = [virtex.SOS] + [5 + i % 2 for i in range(20)] + [virtex.EOS]
    labelled = 0
    for _ in range(400):
        masked, labels = virtex.mask_words(caption, 7, args)
        at = [i for i, y in enumerate(labels) if y != virtex.PAD]
        assert all(masked[i] == virtex.MASK and labels[i] == caption[i] for i in at)
        assert sum(m == virtex.MASK for m in masked) == len(at)
        assert sum(m != c for m, c in zip(masked, caption)) <= 3
        labelled += len(at)
    assert 0.80 < labelled / 1200 < 0.90  # p 0.85 of the 3 x 400 chosen words


def test_pre_norm_decoder_ends_with_a_layer_norm():
    """The original's TransformerDecoderTextualHead passes norm=LayerNorm(width) when norm_first."""
    pre = virtex.transformer(tiny_args("--norm-type", "pre"), 32)
    post = virtex.transformer(tiny_args(), 32)
    assert isinstance(pre.norm, torch.nn.LayerNorm) and post.norm is None
    assert sum(p.numel() for p in pre.parameters()) == sum(p.numel() for p in post.parameters()) + 64
    model = virtex.VirTex(tiny_args("--norm-type", "pre"), 40)
    names = [n for n, _ in model.named_parameters() if n.endswith("transformer.norm.weight")
             or n.endswith("transformer.norm.bias")]
    assert names and all(virtex.NO_DECAY.match(n) for n in names)  # like every textual norm: no weight decay


def test_dataset_reads_coco_layout_leaves_out_uncaptioned_images_and_subsets(tmp_path):
    root = make_tiny_coco(tmp_path / "coco", n_images=6, without_captions=2)
    dataset = virtex.CocoCaptions(root)
    assert len(dataset) == 6 and dataset.left_out == 2 and len(dataset.targets[0]) == 3
    (image, captions), label = dataset[0]
    assert image.size == (40, 40) and label == -1 and captions == dataset.targets[0]
    a, b = (virtex.fraction_subset(dataset, 0.5, 3).indices for _ in range(2))
    assert a == b and len(a) == 3


# ----------------------------------------------------------------------------- runs

def test_interrupted_run_resumes_exactly(tmp_path):
    run_script("virtex.py", *SMALL, "--output-dir", tmp_path / "full", "--max-steps", "6")
    run_script("virtex.py", *SMALL, "--output-dir", tmp_path / "split", "--max-steps", "3")
    resumed = run_script("virtex.py", *SMALL, "--output-dir", tmp_path / "split", "--max-steps", "6")
    assert "resumed from" in resumed.stdout
    full = {r["step"]: (r["loss"], r["forward"], r["backward"]) for r in metrics(tmp_path / "full")}
    split = {r["step"]: (r["loss"], r["forward"], r["backward"]) for r in metrics(tmp_path / "split")}
    assert sorted(full) == sorted(split) == list(range(1, 7))
    assert full == split  # bit-identical across the epoch boundary at step 4 and a Lookahead sync at step 3 and 6
    ckpt = torch.load(tmp_path / "split" / "checkpoint-00000006.pth", weights_only=True)
    import torchvision

    torchvision.models.resnet18().load_state_dict(ckpt["trunk"])
    assert ckpt["method"] == "virtex" and ckpt["vocabulary"][:5] == virtex.SPECIALS
    assert ckpt["lookahead"]["counter"] == 0 and len(ckpt["lookahead"]["slow"]) > 0
    # the checkpoint captions images
    image = TINY_COCO / "train2017" / "000000000001.jpg"
    out = run_script("virtex.py", "--caption", image, image, "--weights", tmp_path / "split" /
                     "checkpoint-00000006.pth")
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{image}\t") and lines[0] == lines[1]


@pytest.mark.parametrize("task", ["captioning", "token_classification", "masked_lm"])
def test_other_tasks_train_a_step(tmp_path, task):
    run_script("virtex.py", *SMALL, "--task", task, "--output-dir", tmp_path, "--max-steps", "2")
    records = metrics(tmp_path)
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)


def test_two_processes_equal_one_on_the_global_batch(tmp_path):
    out = tmp_path / "virtex.pt"
    run_torchrun(2, "tests/workers/dist_virtex_worker.py", out)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    saved = ranks[0]
    args = cli.parse_args(virtex.Args, None, saved["argv"])
    model = virtex.VirTex(args, saved["vocab_size"]).double()
    model.load_state_dict(saved["initial"])
    model.train()
    n = saved["n_per_rank"]
    images, tokens = saved["images"], saved["tokens"]
    losses = []
    for r in range(2):  # each rank's own dropout draws are replayed from its seed
        torch.manual_seed(100 + r)
        part = slice(r * n, (r + 1) * n)
        losses.append(virtex.virtex_loss(model(images[part], tokens[part]), tokens[part], "bicaptioning", 0.1)[0])
    loss = sum(losses) / 2
    loss.backward()
    torch.testing.assert_close(saved["loss"], loss.detach(), rtol=1e-12, atol=1e-14)
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved["grads"][name], p.grad, rtol=1e-9, atol=1e-12, msg=name)
    nn_clip = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
    assert torch.isfinite(nn_clip)
    optimizer = virtex.build_optimizer(model, args, 2 * n)
    virtex.optim.set_lr(optimizer, 0.5)
    optimizer.step()
    for name, p in model.named_parameters():
        for rank in ranks:
            torch.testing.assert_close(rank["after"][name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)


def test_multilabel_reads_coco_objects_and_trains(tmp_path):
    """Categories are numbered 1..C in the file's order whatever their COCO ids, repeats count once, images without
    objects are left out; a run trains, and its checkpoint keeps the category names."""
    root = add_tiny_instances(make_tiny_coco(tmp_path / "coco", n_images=6), {1: [3, 3, 90], 2: [1], 4: [90, 1, 3],
                                                                             5: [3], 6: [1, 90]})
    dataset = virtex.CocoObjects(root)
    assert dataset.ids == [1, 2, 4, 5, 6] and dataset.left_out == 1
    assert dataset.targets == [(2, 3), (1,), (1, 2, 3), (2,), (1, 3)]
    assert dataset.categories == ["person", "car", "toothbrush"]
    views = virtex.CaptionViews(tiny_args("--task", "multilabel_classification", "--image-size", "32"), None, 3)
    torch.manual_seed(0)
    x, labels = views(dataset[2][0])
    assert x.shape == (3, 32, 32) and labels.tolist() == [1, 2, 3]
    proc = run_script("virtex.py", *SMALL, "--data", root, "--task", "multilabel_classification", "--output-dir",
                      tmp_path / "out", "--max-steps", "2")
    assert "3 categories" in proc.stdout and "1 image(s) without objects left out" in proc.stdout
    records = metrics(tmp_path / "out")
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    ckpt = torch.load(tmp_path / "out" / "checkpoint-00000002.pth", weights_only=True)
    assert ckpt["categories"] == ["person", "car", "toothbrush"] and ckpt["vocabulary"] is None
    assert ckpt["model"]["textual.weight"].shape == (4, 512)


# ----------------------------------------------------------------------------- beam search

def naive_beam_search(next_logprobs, max_length, beam_size, per_node):
    """The original's beam search written out beam by beam for one image, in float64: next_logprobs(prefix) gives
    the log-probabilities of the token after [SOS] + prefix."""
    first = next_logprobs([])
    order = sorted(range(len(first)), key=lambda t: -first[t])[:beam_size]
    beams = [([t], first[t]) for t in order]
    for _ in range(max_length - 1):
        if all(b[-1] == virtex.EOS for b, _ in beams):
            break
        candidates = []
        for tokens, score in beams:
            if tokens[-1] == virtex.EOS:
                options = [(virtex.EOS, 0.0)] + [(t, -math.inf) for t in range(len(first)) if t != virtex.EOS]
            else:
                logp = list(next_logprobs(tokens))
                logp[tokens[-1]] = -10000.0
                options = [(t, logp[t]) for t in range(len(logp))]
            options.sort(key=lambda o: -o[1])
            candidates += [(tokens + [t], score + lp) for t, lp in options[:per_node]]
        candidates.sort(key=lambda c: -c[1])
        beams = candidates[:beam_size]
    return beams[0][0]


class LookupDecoder(torch.nn.Module):
    """A stand-in textual head for the search tests: the next token's logits are a random table over the last two
    tokens plus a random map of the image's pooled features, so that captions differ between images and [EOS] comes
    at varied places (the search does not care what the head is)."""

    def __init__(self, vocab, feature_dim, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.pairs = torch.randn(vocab, vocab, vocab, generator=g, dtype=torch.float64) * 12
        self.image = torch.randn(feature_dim, vocab, generator=g, dtype=torch.float64) * 12

    def forward(self, grid, tokens):
        before = tokens[:, -2] if tokens.shape[1] > 1 else torch.full_like(tokens[:, -1], virtex.PAD)
        image = torch.nn.functional.normalize(grid.mean(dim=(2, 3)), dim=1) @ self.image
        return (self.pairs[before, tokens[:, -1]] + image)[:, None].expand(-1, tokens.shape[1], -1)


def tiny_captioner(seed):
    torch.manual_seed(seed)
    trunk = virtex.models.build_trunk("resnet18", False).double().eval()
    return torch.nn.ModuleDict(dict(trunk=trunk, textual=LookupDecoder(11, trunk.feature_dim, seed)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_follows_the_original_algorithm(seed):
    model = tiny_captioner(seed)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    found = virtex.beam_captions(model, images, max_length=7, beam_size=3, per_node=2)
    grid = virtex.resnet_grid(model.trunk, images)
    for i in range(len(images)):
        def next_logprobs(prefix):
            tokens = torch.tensor([[virtex.SOS] + prefix])
            with torch.no_grad():
                return torch.log_softmax(model.textual(grid[i:i + 1], tokens)[0, -1], dim=0).tolist()
        expected = naive_beam_search(next_logprobs, 7, 3, 2)  # the batch searches on while any image's beams do:
        row = found[i].tolist()  # its [EOS] padding may be longer
        assert row[:len(expected)] == expected and set(row[len(expected):]) <= {virtex.EOS}, i
    assert len({tuple(row) for row in found.tolist()}) > 1  # the images get different captions


def test_wide_beam_finds_the_best_two_token_caption_and_width_one_is_greedy():
    """With a beam as wide as the vocabulary and every candidate kept, two steps score every two-token caption, so
    the best beam is the most likely one (found here by enumeration); beam width 1 is greedy decoding."""
    model = tiny_captioner(3)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    best = virtex.beam_captions(model, images, max_length=2, beam_size=11, per_node=11)
    grid = virtex.resnet_grid(model.trunk, images)
    with torch.no_grad():
        for i in range(len(images)):
            first = torch.log_softmax(model.textual(grid[i:i + 1], torch.tensor([[virtex.SOS]]))[0, -1], dim=0)
            scores = {}
            for a in range(11):
                second = torch.log_softmax(model.textual(grid[i:i + 1], torch.tensor([[virtex.SOS, a]]))[0, -1], 0)
                for b in range(11):
                    step = (0.0 if b == virtex.EOS else -math.inf) if a == virtex.EOS else \
                        (-10000.0 if b == a else float(second[b]))
                    scores[(a, b)] = float(first[a]) + step
            assert tuple(best[i].tolist()) == max(scores, key=scores.get)
    with torch.no_grad():  # greedy decoding never repeats [SOS] as the first word; the beam, as the original's, may
        model.textual.pairs[:, :, virtex.SOS] = -1e4
    greedy = virtex.greedy_captions(model, images, 6)
    narrow = virtex.beam_captions(model, images, max_length=6, beam_size=1, per_node=1)
    for g, n in zip(greedy.tolist(), narrow.tolist()):
        cut = g.index(virtex.EOS) + 1 if virtex.EOS in g else len(g)
        assert n[:cut] == g[:cut] and len(g) <= 6


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case", ["no-annotations", "no-captions", "unknown-image", "not-json"])
def test_bad_caption_data_is_refused_in_one_sentence(tmp_path, case):
    root = make_tiny_coco(tmp_path / "coco", n_images=4)
    annotations = root / "annotations" / "captions_train2017.json"
    content = json.loads(annotations.read_text())
    message = {"no-annotations": "captions_train2017.json does not exist: --data takes a folder in COCO Captions' "
                                 "layout (ROOT/train2017/*.jpg, ROOT/annotations/captions_train2017.json).",
               "no-captions": "has no captions of its images; VirTex trains on captioned images.",
               "unknown-image": "has captions of image id 99, which its 'images' list does not name (1 such id(s)).",
               "not-json": "is not a COCO captions file"}[case]
    if case == "no-annotations":
        annotations.unlink()
    elif case == "no-captions":
        annotations.write_text(json.dumps(dict(content, annotations=[])))
    elif case == "unknown-image":
        annotations.write_text(json.dumps(dict(content, annotations=content["annotations"] + [
            {"image_id": 99, "id": 5, "caption": "nothing"}])))
    else:
        annotations.write_text("{not json")
    out = tmp_path / "out"
    proc = run_script("virtex.py", *SMALL, "--data", root, "--output-dir", out, "--max-steps", "1", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())


def test_images_without_captions_are_left_out_and_long_captions_truncated(tmp_path):
    root = make_tiny_coco(tmp_path / "coco", n_images=8, without_captions=3)
    annotations = root / "annotations" / "captions_train2017.json"
    content = json.loads(annotations.read_text())
    content["annotations"][0]["caption"] = " ".join(["dog"] * 200)
    annotations.write_text(json.dumps(content))
    proc = run_script("virtex.py", *SMALL, "--data", root, "--output-dir", tmp_path / "out", "--max-steps", "2")
    assert "8 images" in proc.stdout and "3 image(s) without captions left out" in proc.stdout


# ----------------------------------------------------------------------------- learning on real captions

@pytest.mark.convergence
def test_learns_coco_captions_mini_and_reproduces_training_captions(tmp_path):
    """About 3.5 minutes on one core: `--preset tiny` on a quarter of coco-captions-mini (20 images), one fixed caption
    per image and no augmentation, 200 steps. The captioning loss must fall well below its start, and greedy and
    beam-search decoding of the training images (seen as in training: the whole image resized to the crop size) must give back
    some of their captions word for word."""
    if not (MINI / "annotations" / "captions_train2017.json").is_file():
        pytest.skip(f"provide coco-captions-mini (COCO's layout: train2017/*.jpg, annotations/"
                    f"captions_train2017.json) at {MINI} (set SSL_DATA_DIR) to run this test")
    flags = ["--preset", "tiny", "--data", MINI, "--data-fraction", "0.25", "--single-caption", "--crop-scale", "1",
             "1", "--flip-p", "0", "--jitter-p", "0", "--batch-size", "10", "--lr", "5.12", "--textual-lr", "5.12",
             "--epochs", "100", "--workers", "0", "--print-every", "50"]
    run_script("virtex.py", *flags, "--output-dir", tmp_path, timeout=1200)
    losses = [r["forward"] for r in metrics(tmp_path)]
    assert sum(losses[-5:]) / 5 < 0.2 * sum(losses[:5]) / 5, (losses[:5], losses[-5:])
    import torchvision.transforms.functional as TF

    from common import checkpoint, gpu_aug

    ckpt = checkpoint.load(checkpoint.latest(tmp_path))
    args = cli.parse_args(virtex.Args, virtex.PRESETS, [str(f) for f in flags])
    vocabulary = virtex.Vocabulary(ckpt["vocabulary"])
    model = virtex.VirTex(args, len(vocabulary))
    model.load_state_dict(ckpt["model"])
    model.eval()
    dataset = virtex.CocoCaptions(MINI)
    chosen = virtex.fraction_subset(dataset, 0.25, 0).indices
    images = torch.stack([TF.normalize(TF.to_tensor(TF.resize(dataset[i][0][0], [args.image_size] * 2)),
                                       gpu_aug.IMAGENET_MEAN, gpu_aug.IMAGENET_STD) for i in chosen])
    decoded = [vocabulary.decode(row.tolist()) for row in virtex.greedy_captions(model, images, 30)]
    truth = [" ".join(virtex.caption_words(dataset.targets[i][0])) for i in chosen]
    exact = sum(d == t for d, t in zip(decoded, truth))
    print(f"{exact} of {len(chosen)} training captions reproduced; " + "; ".join(decoded[:3]))
    assert exact >= 10, list(zip(decoded, truth))  # 20 of 20 measured
    beam = [vocabulary.decode(row.tolist()) for row in virtex.beam_captions(model, images, 30)]
    print(f"beam search: {sum(d == t for d, t in zip(beam, truth))} of {len(chosen)} reproduced")
    assert sum(d == t for d, t in zip(beam, truth)) >= 10, list(zip(beam, truth))
    # the command line captions them too (its view: the original's resize and centre crop)
    out = run_script("virtex.py", "--caption", *[dataset.describe(i) for i in chosen[:2]], "--weights",
                     checkpoint.latest(tmp_path))
    assert len(out.stdout.strip().splitlines()) == 2

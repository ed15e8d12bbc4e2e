"""VirTex: Learning Visual Representations from Textual Annotations.

Desai, Johnson, CVPR 2021 (https://arxiv.org/abs/2006.06666).

A ResNet trunk and a Transformer textual head are trained from scratch to caption images (COCO Captions). The
trunk's last feature map (7 x 7 x 2048 for a 224-px image, before pooling) is projected to the head's width H by a
linear layer and serves as the memory of a Transformer decoder of L layers (H / 64 heads, feed-forward 4H,
post-norm, GELU, dropout 0.1) that predicts each caption token from the image and the tokens before it (causal
masking). Tokens enter through learned word and position embeddings, summed, LayerNorm'ed (eps 1e-8), with
dropout 0.1, padded positions zeroed; the output layer is tied to the word embedding (its bias is its own).
Bicaptioning (the default `--task`, the paper's best) adds a second decoder that reads the caption right to left;
the two share the visual projection and the embeddings (and so the output layer), and the loss is the sum of the
two directions' token cross-entropies (padding masked). After pretraining only the trunk is kept.

Defaults are the original code's base config (configs/_base_bicaptioning_R_50_L1_H1024.yaml, with the width of
the paper's best model, L1 H2048, and virtex/config.py): ResNet-50 with zero-initialised residual BatchNorms, SGD
(momentum 0.9, no Nesterov), lr 0.2 for the trunk and 0.001 for the rest, weight decay 1e-4 except on the
LayerNorm parameters and biases of the textual embedding and transformers (NO_DECAY
".*textual.(embedding|transformer).*(norm.*|bias)"), gradient norm clipped at 10, Lookahead (k 5, alpha 0.5) around
SGD, batch 256, 500k iterations (here 1082 epochs of COCO's 118,287 training images), 10k linear warmup steps from 0
then cosine to 0 (both learning rates on the same schedule), captions lower-cased, accent-stripped, [SOS] w1 .. wn
[EOS] truncated to 30 tokens. Views (virtex/factories.py): random resized crop scale 0.2-1, ratio 3/4-4/3, to
224; a horizontal flip with p 0.5 that swaps "left" and "right" in the caption; colour jitter (0.4, 0.4, 0.4, 0.1)
with p 0.8; ImageNet normalisation. BatchNorm statistics stay per process (the original wraps its model in DDP
without SyncBatchNorm: 32 images per GPU).

`--task` also gives the paper's ablations (Sec. 4.1, Table 1): `captioning` (forward only), `token_classification`
(a linear layer on the pooled trunk predicts the caption's words as a bag: minus the mean log-probability of the
caption's distinct tokens), `masked_lm` (the same decoder without causal mask predicts masked tokens with the
original's proportions: 15% of a caption's words, each replaced by [MASK] with p 0.85, by a random word with p 0.1,
kept with p 0.05, a lone chosen word always [MASK], and only the [MASK]ed words predicted; the selection rule, the
share rounded down but at least one word and never [SOS] / [EOS], is this script's (the original rounds up), and the
random word is never a special token (the original draws any id: its [UNK] doubles as padding)) and
`multilabel_classification` (the same linear layer predicts the image's COCO object categories, read from
ROOT/annotations/instances_train2017.json, with token classification's loss over the distinct categories; images
without objects are left out, and the flip is only an image flip).

Deviations from the original code:
- Tokenizer: a word-level vocabulary built here from the training captions (lower-cased, accents stripped,
  punctuation split off), the `--vocab-size` most frequent words plus [PAD], [UNK], [SOS], [EOS], [MASK], instead of
  the original's 10k SentencePiece model. It is saved in every checkpoint (`vocabulary`) and restored on resume.
  [PAD] is its own token (the original pads with [UNK]'s id 0).
- The flip swaps the whole words "left" and "right" of the caption's words (the original replaces the substrings
  in the raw text, so "leftover" becomes "rightover"). The flip is drawn per sample from the same seeded generator as
  the crop, so the image and its caption always agree; its decision is taken here, in the dataset's transform.
- Crop and colour jitter are common/augment.py's on PIL images (antialiased resampling; torchvision-style jitter,
  the four adjustments in a random order); the original uses albumentations' OpenCV crop, brightness/contrast and
  HSV shifts.
- `--lr` and `--textual-lr` are for a global batch of 256 and scaled linearly, as in every script here; the original
  keeps them fixed (the same at its batch of 256).
- An epoch sees every image once with one of its captions drawn at random per image and epoch (seeded, so resume is
  exact); the original samples batches of images from an infinite shuffled stream, 500k iterations.
- Lookahead's slow weights and step counter are saved in the checkpoint (the original resets them on resume).
- Label smoothing is available (`--label-smoothing`, torch's definition) but off, as in the original.
- The online kNN monitor is not offered (captions have no class labels); evaluate checkpoints with eval_*.py.
- `--caption` decodes with the original's beam search (virtex/utils/beam_search.py after its v1.2 fix: width 5,
  2 candidates per beam, summed log-probabilities without length normalisation, the previous token's log-probability
  set to -10000 so that no token repeats the one before it, at most --max-caption-length tokens) from the original's
  validation view (shorter side resized to 256/224 of the crop, centre crop); `--beam-size 1` decodes greedily.

    torchrun --nproc_per_node=8 virtex.py --data /datasets/coco
    python virtex.py --preset tiny --data /data/coco-captions-mini   # 2-core CPU, a few hundred captions
    python virtex.py --caption a.jpg b.jpg --weights runs/virtex/checkpoint-00499884.pth

`--data ROOT` is COCO Captions' layout: ROOT/train2017/*.jpg and ROOT/annotations/captions_train2017.json.
"""
import copy
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import augment, checkpoint, cli, data, gpu_aug, models, optim
from common.run import Run, RunArgs, launch

TASKS = ["bicaptioning", "captioning", "token_classification", "multilabel_classification", "masked_lm"]
SPECIALS = ["[PAD]", "[UNK]", "[SOS]", "[EOS]", "[MASK]"]
PAD, UNK, SOS, EOS, MASK = range(len(SPECIALS))


@dataclass
class Args(RunArgs):
    arch: str = "resnet50"  # a ResNet: the textual head reads its last feature map (the paper's ResNet-50)
    cifar_stem: bool = False
    zero_init_residual: bool = field(default=True, metadata={
        "help": "start each residual block's last BatchNorm scale at 0 (the original builds torchvision's ResNet "
                "with zero_init_residual=True)"})
    task: str = field(default="bicaptioning", metadata={
        "choices": TASKS, "help": "the pretraining task (paper Table 1): bicaptioning (the paper's VirTex), "
                                  "captioning (forward only), token_classification, multilabel_classification "
                                  "(COCO's object categories, from annotations/instances_train2017.json), "
                                  "masked_lm"})
    textual_layers: int = 1  # L, transformer layers (the paper's best: 1)
    textual_width: int = 2048  # H, the textual head's width (the paper's best: 2048)
    textual_heads: int = 0  # attention heads (0: H / 64, as the original's A)
    feedforward_dim: int = 0  # the transformer's feed-forward width (0: 4H, as the original's F)
    norm_type: str = field(default="post", metadata={
        "choices": ["post", "pre"], "help": "post-norm (the original's transdec_postnorm) or pre-norm layers"})
    dropout: float = 0.1  # on the embeddings and inside the transformer (MODEL.TEXTUAL.DROPOUT)
    vocab_size: int = 10000  # most frequent training words kept, plus 5 special tokens (original: 10k SentencePiece)
    max_caption_length: int = 30  # tokens with [SOS] and [EOS]; longer captions are cut (DATA.MAX_CAPTION_LENGTH)
    single_caption: bool = field(default=False, metadata={
        "help": "one fixed caption per image (the first in the file; DATA.USE_SINGLE_CAPTION); off: one of its "
                "captions at random per image and epoch"})
    label_smoothing: float = 0.0  # of the captioning and masked-LM cross-entropies (the original: none)
    epochs: int = 1082  # 500k iterations of 256 over COCO train2017's 118,287 images (OPTIM.NUM_ITERATIONS)
    batch_size: int = 32  # per process: 32 x 8 GPUs = 256 (OPTIM.BATCH_SIZE)
    lr: float = 0.2  # the trunk's peak lr for a global batch of 256, scaled linearly (OPTIM.CNN_LR)
    textual_lr: float = 0.001  # the textual head's peak lr for a global batch of 256, scaled linearly (OPTIM.LR)
    warmup_steps: int = 10000  # linear warmup from 0, then cosine to 0 (OPTIM.WARMUP_STEPS, LR_DECAY_NAME cosine)
    weight_decay: float = 1e-4  # not on the textual embedding's and transformers' norms and biases (OPTIM.NO_DECAY)
    momentum: float = 0.9  # SGD, no Nesterov (OPTIM.SGD_MOMENTUM)
    clip_grad_norm: float = 10.0  # the global gradient norm is clipped to this (OPTIM.CLIP_GRAD_NORM; 0: off)
    lookahead_steps: int = 5  # Lookahead's k (OPTIM.LOOKAHEAD.STEPS; 0: no Lookahead)
    lookahead_alpha: float = 0.5  # Lookahead's alpha (OPTIM.LOOKAHEAD.ALPHA)
    mask_proportion: float = 0.15  # masked_lm: share of a caption's words chosen (at least one)
    mask_probability: float = 0.85  # masked_lm: a chosen word becomes [MASK] ...
    replace_probability: float = 0.10  # ... or a random word (else it is kept)
    image_size: int = 224
    crop_scale: tuple[float, ...] = (0.2, 1.0)  # random resized crop's area range (virtex/factories.py)
    flip_p: float = 0.5  # horizontal flip, which also swaps "left" and "right" in the caption
    jitter: tuple[float, ...] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8  # probability of the colour jitter
    caption: tuple[str, ...] = field(default=(), metadata={
        "help": "caption these images with --weights' model (beam search), print one line each, and exit"})
    beam_size: int = 5  # --caption's beam width (the original's 5; 1: greedy decoding)
    beam_per_node: int = 2  # --caption: candidates kept per beam and step (the original's per_node_beam_size)
    weights: str = field(default="", metadata={"help": "a virtex checkpoint, for --caption"})
    output_dir: str = "runs/virtex"


PRESETS = {
    "tiny": dict(_doc="a 2-core CPU recipe for a caption set of a few hundred captions such as coco-captions-mini "
                      "(COCO's layout): ResNet-18 at 64 px, L1 H256 (4 heads), batch 16, 300 epochs, lr 0.2 for "
                      "both the trunk and the head, 50 warmup steps, no Lookahead, vocabulary of 1,000 words",
                 arch="resnet18", image_size=64, textual_width=256, textual_heads=4, batch_size=16, epochs=300,
                 textual_lr=0.2, warmup_steps=50, lookahead_steps=0, vocab_size=1000, workers=2,
                 output_dir="runs/virtex-tiny"),
}


# ----------------------------------------------------------------------------- captions

def caption_words(caption):
    """The original's caption normalisation (lower case, NFKD, accents stripped), then words and punctuation."""
    text = unicodedata.normalize("NFKD", caption.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]", text)


def swap_left_right(words):
    """The flip's caption rule: the words "left" and "right" trade places."""
    return [{"left": "right", "right": "left"}.get(w, w) for w in words]


class Vocabulary:
    """Word-level tokenizer: the special tokens, then the kept words by decreasing count (ties alphabetical)."""

    def __init__(self, tokens):
        if list(tokens[:len(SPECIALS)]) != SPECIALS or len(set(tokens)) != len(tokens):
            raise ValueError("the checkpoint's vocabulary is malformed (special tokens or duplicates).")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, captions, size):
        counts = Counter(w for caption in captions for w in caption_words(caption))
        kept = sorted(counts, key=lambda w: (-counts[w], w))[:size]
        return cls(SPECIALS + [w for w in kept if w not in SPECIALS])

    def __len__(self):
        return len(self.tokens)

    def encode(self, words, max_length):
        """[SOS] w1 .. wn [EOS] truncated to max_length (as the original, which may cut [EOS] off)."""
        return ([SOS] + [self.index.get(w, UNK) for w in words] + [EOS])[:max_length]

    def decode(self, ids):
        words = []
        for i in ids:
            if i == EOS:
                break
            if i >= len(SPECIALS) or i == UNK:
                words.append(self.tokens[i])
        return " ".join(words)


# ----------------------------------------------------------------------------- data

class CocoAnnotated(torch.utils.data.Dataset):
    """COCO's layout: ROOT/<split>2017/<file_name> and ROOT/annotations/<KIND>_<split>2017.json. Items are
    ((PIL image, targets), -1), images sorted by id; images without targets are left out (`left_out` counts them).
    A subclass reads its targets per image id from the JSON object (`read`)."""
    KIND = NOUN = FORMAT = NEED = LAYOUT = ""

    def __init__(self, root, split="train"):
        root = Path(root)
        annotations = root / "annotations" / f"{self.KIND}_{split}2017.json"
        layout = f"{self.LAYOUT} (ROOT/{split}2017/*.jpg, ROOT/annotations/{self.KIND}_{split}2017.json)"
        if not root.is_dir():
            raise data.DataError(f"data path {root} does not exist or is not a folder; {layout}.")
        if not annotations.is_file():
            raise data.DataError(f"{annotations} does not exist: {layout}.")
        try:
            content = json.loads(annotations.read_text(encoding="utf-8"))
            images = {int(im["id"]): str(im["file_name"]) for im in content["images"]}
            targets = self.read(content)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise data.DataError(f"{annotations} is not a COCO {self.KIND} file ({self.FORMAT}).") from None
        unknown = sorted(set(targets) - set(images))
        if unknown:
            raise data.DataError(f"{annotations} has {self.NOUN} of image id {unknown[0]}, which its 'images' list "
                                 f"does not name ({len(unknown)} such id(s)).")
        ids = sorted(i for i in images if targets.get(i))
        if not ids:
            raise data.DataError(f"{annotations} has no {self.NOUN} of its images; {self.NEED}.")
        self.left_out = len(images) - len(ids)
        self.ids = ids
        self.targets = [tuple(targets[i]) for i in ids]
        self.files = data.ImageFiles([root / f"{split}2017" / images[i] for i in ids], [-1] * len(ids), [])
        self.labels = [-1] * len(ids)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image, _ = self.files[index]
        return (image, self.targets[index]), -1

    def describe(self, index):
        return self.files.describe(index)


class CocoCaptions(CocoAnnotated):
    """COCO Captions: each image's captions (annotations/captions_<split>2017.json)."""
    KIND, NOUN, NEED = "captions", "captions", "VirTex trains on captioned images"
    FORMAT = "a JSON object with 'images' [{id, file_name}] and 'annotations' [{image_id, caption}]"
    LAYOUT = "--data takes a folder in COCO Captions' layout"

    def read(self, content):
        captions = {}
        for a in content["annotations"]:
            if not isinstance(a["caption"], str):
                raise TypeError
            captions.setdefault(int(a["image_id"]), []).append(a["caption"])
        return captions


class CocoObjects(CocoAnnotated):
    """multilabel_classification's data (annotations/instances_<split>2017.json): each image's distinct object
    categories numbered 1..C in the file's category order (0 pads, as the original's background), sorted; images
    without objects are left out (as the original's MultiLabelClassificationDataset)."""
    KIND, NOUN, NEED = "instances", "objects", "multilabel_classification trains on images with objects"
    FORMAT = ("a JSON object with 'images' [{id, file_name}], 'categories' [{id, name}] and 'annotations' "
              "[{image_id, category_id}] naming those categories")
    LAYOUT = "--task multilabel_classification takes a folder in COCO's layout"

    def read(self, content):
        self.categories = [str(c["name"]) for c in content["categories"]]
        number = {int(c["id"]): i + 1 for i, c in enumerate(content["categories"])}
        labels = {}
        for a in content["annotations"]:
            labels.setdefault(int(a["image_id"]), set()).add(number[int(a["category_id"])])
        return {image: sorted(found) for image, found in labels.items()}


def fraction_subset(dataset, fraction, seed):
    """--data-fraction: a seeded random share of the images (the original's DATA.USE_PERCENTAGE)."""
    return torch.utils.data.Subset(dataset, data.fraction_indices([0] * len(dataset), fraction, seed).tolist())


def all_captions(dataset):
    if isinstance(dataset, torch.utils.data.Subset):
        return [c for i in dataset.indices for c in dataset.dataset.targets[i]]
    return [c for captions in dataset.targets for c in captions]


def view_recipe(args):
    """The image side of the views (virtex/factories.py): crop 0.2-1, flip 0.5, jitter (0.4, 0.4, 0.4, 0.1) p 0.8,
    ImageNet normalisation. The flip's caption side is CaptionViews'."""
    return [(1, augment.View(args.image_size, scale=tuple(args.crop_scale), ratio=(0.75, 1.333), flip_p=args.flip_p,
                             jitter=tuple(args.jitter), jitter_p=args.jitter_p))]


class CaptionViews:
    """(PIL image, captions) -> [image view, tokens] (masked_lm: [view, masked tokens, labels]), tokens padded with
    [PAD] to --max-caption-length. Called by data.ViewDataset with the generators seeded per (seed, epoch, index):
    the caption choice, the crop, the flip (the same draw turns the image and swaps "left"/"right") and the
    masking all come from them. multilabel_classification: (PIL image, labels) -> [view, labels padded with 0 to
    `categories` slots]."""

    def __init__(self, args, vocabulary, categories=0):
        self.args, self.vocabulary, self.categories = args, vocabulary, categories
        self.per_image = augment.PerImage(view_recipe(args))

    def __call__(self, item):
        image, captions = item
        args = self.args
        if args.task == "multilabel_classification":
            (_, view, params), = self.per_image.sample(*image.size)
            return [augment.apply(view, image, params, 0), padded(captions, self.categories)]
        caption = captions[0] if args.single_caption else captions[int(torch.randint(len(captions), ()))]
        (_, view, params), = self.per_image.sample(*image.size)
        x = augment.apply(view, image, params, 0)
        words = caption_words(caption)
        if bool(params["flip"][0, 0]):
            words = swap_left_right(words)
        ids = self.vocabulary.encode(words, args.max_caption_length)
        if args.task == "masked_lm":
            ids, labels = mask_words(ids, len(self.vocabulary), args)
            return [x, padded(ids, args.max_caption_length), padded(labels, args.max_caption_length)]
        return [x, padded(ids, args.max_caption_length)]


def padded(ids, length):
    return torch.tensor(list(ids) + [PAD] * (length - len(ids)), dtype=torch.long)


def mask_words(ids, vocab_size, args):
    """Masked LM's corruption of one caption (the original's MaskedLmDataset): a share of the word positions (not
    [SOS] / [EOS]), at least one, each -> [MASK] (p mask_probability), a random word (p replace_probability) or
    kept; a lone chosen word always becomes [MASK]. Labels hold the original token where [MASK] went, [PAD]
    (ignored) elsewhere: as in the original, only [MASK]ed words are predicted."""
    ids, labels = list(ids), [PAD] * len(ids)
    positions = [i for i, t in enumerate(ids) if t not in (SOS, EOS)]
    if not positions:
        return ids, labels
    count = max(1, int(len(positions) * args.mask_proportion))
    for i in torch.randperm(len(positions))[:count].tolist():
        at = positions[i]
        u = 0.0 if count == 1 else float(torch.rand(()))
        if u < args.mask_probability:
            labels[at], ids[at] = ids[at], MASK
        elif u < args.mask_probability + args.replace_probability:
            ids[at] = int(torch.randint(len(SPECIALS), vocab_size, ()))
    return ids, labels


def caption_lengths(tokens):
    return (tokens != PAD).sum(dim=1)


def reverse_captions(tokens):
    """Each row's first `length` tokens reversed, padding kept at the end (the original's noitpac_tokens)."""
    lengths = caption_lengths(tokens)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    source = (lengths[:, None] - 1 - positions).clamp(min=0)
    return torch.where(positions < lengths[:, None], tokens.gather(1, source), torch.full_like(tokens, PAD))


# ----------------------------------------------------------------------------- model

class WordAndPositionalEmbedding(nn.Module):
    """Learned word and position embeddings, summed, LayerNorm (eps 1e-8), dropout; padded positions zeroed."""

    def __init__(self, vocab_size, width, max_length, dropout):
        super().__init__()
        self.words = nn.Embedding(vocab_size, width, padding_idx=PAD)
        self.positions = nn.Embedding(max_length, width)
        self.layer_norm = nn.LayerNorm(width, eps=1e-8)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.dropout(self.layer_norm(self.words(tokens) + self.positions(positions)[None]))
        return x * (tokens != PAD).unsqueeze(-1).to(x.dtype)


def transformer(args, width):
    """The decoder stack; pre-norm ends with a LayerNorm of the last layer's output, as the original's."""
    heads = args.textual_heads or width // 64
    pre = args.norm_type == "pre"
    layer = nn.TransformerDecoderLayer(width, heads, dim_feedforward=args.feedforward_dim or 4 * width,
                                       dropout=args.dropout, activation="gelu", batch_first=True, norm_first=pre)
    return nn.TransformerDecoder(layer, args.textual_layers, norm=nn.LayerNorm(width) if pre else None)


def bert_init(module):
    """The original's initialisation: N(0, 0.02) for linear, attention and embedding weights, padding zeroed."""
    if isinstance(module, nn.Linear):
        module.weight.data.normal_(0.0, 0.02)
    elif isinstance(module, nn.MultiheadAttention):
        module.in_proj_weight.data.normal_(0.0, 0.02)
        module.out_proj.weight.data.normal_(0.0, 0.02)
    elif isinstance(module, nn.Embedding):
        module.weight.data.normal_(0.0, 0.02)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()


class TextualHead(nn.Module):
    """Visual projection, embeddings, a Transformer decoder per direction, output layer tied to the word
    embedding. Bicaptioning's backward decoder is a copy of the forward one at initialisation (the original
    deep-copies the head, then shares the projection, embedding and output layer)."""

    def __init__(self, args, visual_dim, vocab_size):
        super().__init__()
        width = args.textual_width
        self.visual_projection = nn.Linear(visual_dim, width)
        self.embedding = WordAndPositionalEmbedding(vocab_size, width, args.max_caption_length, args.dropout)
        self.transformer = transformer(args, width)
        self.apply(bert_init)
        self.output = nn.Linear(width, vocab_size)
        self.output.weight = self.embedding.words.weight
        self.backward_transformer = copy.deepcopy(self.transformer) if args.task == "bicaptioning" else None
        self.causal = args.task != "masked_lm"

    def forward(self, grid, tokens, backward=False):
        """grid: [B, C, h, w] trunk features; tokens: [B, T] -> logits [B, T, V]."""
        memory = self.visual_projection(grid.flatten(2).transpose(1, 2))
        length = tokens.shape[1]
        future = torch.triu(torch.ones(length, length, dtype=torch.bool, device=tokens.device), diagonal=1) \
            if self.causal else None
        decoder = self.backward_transformer if backward else self.transformer
        x = decoder(self.embedding(tokens), memory, tgt_mask=future, tgt_key_padding_mask=tokens == PAD)
        return self.output(x)


def resnet_grid(trunk, images):
    """The ResNet's last feature map before pooling ([B, 2048, 7, 7] for ResNet-50 at 224 px)."""
    x = trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(images))))
    return trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(x))))


class VirTex(nn.Module):
    """Trunk + the task's head; forward(images, tokens) -> the task's outputs for `virtex_loss`."""

    def __init__(self, args, vocab_size):
        super().__init__()
        self.task = args.task
        self.trunk = models.build_trunk(args.arch, args.cifar_stem, zero_init_residual=args.zero_init_residual)
        if self.task in ("token_classification", "multilabel_classification"):
            self.textual = nn.Linear(self.trunk.feature_dim, vocab_size)  # the original's LinearTextualHead
        else:
            self.textual = TextualHead(args, self.trunk.feature_dim, vocab_size)

    def forward(self, images, tokens):
        grid = resnet_grid(self.trunk, images)
        if self.task in ("token_classification", "multilabel_classification"):
            return self.textual(grid.mean(dim=(2, 3)))
        if self.task == "bicaptioning":
            return self.textual(grid, tokens), self.textual(grid, reverse_captions(tokens), backward=True)
        return self.textual(grid, tokens)


# ----------------------------------------------------------------------------- loss

def captioning_loss(logits, tokens, label_smoothing=0.0):
    """Cross-entropy of each next token given the ones before (logits at t predict token t + 1), averaged over the
    non-padding targets."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                           ignore_index=PAD, label_smoothing=label_smoothing)


def token_classification_loss(logits, tokens, ignored=len(SPECIALS)):
    """Minus the mean log-probability of each caption's distinct word tokens, averaged over the images (the
    original's ClassificationModel; the first `ignored` ids are not targets: [PAD], [UNK], [SOS], [EOS], [MASK] for
    words, the padding 0 for multilabel_classification's categories; a caption without words adds 0)."""
    logprobs = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=1)
    bag = torch.zeros_like(logprobs, dtype=torch.bool).scatter_(1, tokens, True)
    bag[:, :ignored] = False
    per_image = -(logprobs * bag).sum(dim=1) / bag.sum(dim=1).clamp(min=1)
    return per_image.mean()


def virtex_loss(outputs, tokens, task, label_smoothing=0.0, labels=None):
    """(loss, {name: term}) for the task: bicaptioning sums the forward and backward captioning losses."""
    if task == "bicaptioning":
        forward, backward = outputs
        terms = {"forward": captioning_loss(forward, tokens, label_smoothing),
                 "backward": captioning_loss(backward, reverse_captions(tokens), label_smoothing)}
        return terms["forward"] + terms["backward"], terms
    if task == "captioning":
        loss = captioning_loss(outputs, tokens, label_smoothing)
    elif task == "token_classification":
        loss = token_classification_loss(outputs, tokens)
    elif task == "multilabel_classification":
        loss = token_classification_loss(outputs, tokens, ignored=1)
    else:  # masked_lm: the mean over every position with a label (0 for a batch without one)
        logits = outputs if outputs.dtype == torch.float64 else outputs.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=PAD,
                               label_smoothing=label_smoothing, reduction="sum") / (labels != PAD).sum().clamp(min=1)
    return loss, {}


# ----------------------------------------------------------------------------- training

NO_DECAY = re.compile(r".*textual.*(embedding|transformer).*(norm.*|bias)")


def build_optimizer(model, args, global_batch=256):
    """SGD with momentum; per parameter the trunk's or the head's peak lr (as `lr_scale`, the schedule multiplies
    it) and weight decay except on NO_DECAY (the original's regex; our names put `backward_` inside `textual.`)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        peak = optim.scaled_lr(args.lr if name.startswith("trunk.") else args.textual_lr, global_batch)
        decay = 0.0 if NO_DECAY.match(name) else args.weight_decay
        groups.setdefault((peak, decay), []).append(p)
    return torch.optim.SGD([dict(params=ps, lr=0.0, lr_scale=peak, weight_decay=decay)
                            for (peak, decay), ps in groups.items()], lr=0.0, momentum=args.momentum)


class Lookahead:
    """Lookahead (Zhang et al. 2019) around the optimizer: every k steps the slow weights move alpha of the way to
    the fast ones and the fast weights are reset to them."""

    def __init__(self, params, k, alpha):
        self.params, self.k, self.alpha, self.counter = list(params), k, alpha, 0
        self.slow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def step(self):
        self.counter += 1
        if self.counter >= self.k:
            self.counter = 0
            for p, slow in zip(self.params, self.slow):
                p.mul_(self.alpha).add_(slow, alpha=1 - self.alpha)
                slow.copy_(p)

    def state_dict(self):
        return {"slow": [s.cpu().clone() for s in self.slow], "counter": self.counter}

    @torch.no_grad()
    def load_state_dict(self, state):
        if len(state["slow"]) != len(self.slow):
            raise ValueError("the checkpoint's Lookahead state does not fit this model.")
        for slow, saved in zip(self.slow, state["slow"]):
            slow.copy_(saved)
        self.counter = int(state["counter"])


def check_args(args):
    if models.family_of(args.arch) != "resnet":
        raise ValueError(f"VirTex's textual head reads a ResNet's last feature map: --arch must be a ResNet, got "
                         f"{args.arch}.")
    if args.textual_width < 1 or args.textual_heads < 0 or args.textual_width % (args.textual_heads or 64) \
            or args.textual_layers < 1:
        raise ValueError(f"--textual-width {args.textual_width} must be a positive multiple of the attention heads "
                         f"(--textual-heads; 0 means width / 64, so a multiple of 64), and --textual-layers at least "
                         f"1.")
    if args.max_caption_length < 3:
        raise ValueError(f"--max-caption-length must be at least 3 ([SOS], a word, [EOS]), got "
                         f"{args.max_caption_length}.")
    if args.vocab_size < 1:
        raise ValueError(f"--vocab-size must be at least 1, got {args.vocab_size}.")
    if args.eval_every:
        raise ValueError("--eval-every (the online kNN) needs class labels, which captions are not; evaluate "
                         "VirTex checkpoints with eval_knn.py, eval_linear.py or eval_svm.py.")
    if args.gpu_aug == "on":
        raise ValueError("VirTex's flip also edits the caption, so its views are made per image: use --gpu-aug off.")


def train(args, runtime):
    if args.caption or args.weights:
        return caption_images(args, runtime)
    check_args(args)
    args.gpu_aug = "off"
    objects = args.task == "multilabel_classification"
    coco = CocoObjects(args.data) if objects else CocoCaptions(args.data)
    dataset = fraction_subset(coco, args.data_fraction, args.seed) if args.data_fraction != 1 else coco
    # ---- run management (common/run.py): data, model on the device, optimizer, resume
    run = Run("virtex", args, runtime)
    state = run.latest_state()
    if objects:  # the categories are the "vocabulary": 0 pads, 1..C the file's categories
        categories = coco.categories
        vocabulary, outputs = None, 1 + len(categories)
    else:
        vocabulary = Vocabulary(state["vocabulary"]) if state is not None and "vocabulary" in state else \
            Vocabulary.build(all_captions(dataset), args.vocab_size)
        categories, outputs = [], len(vocabulary)
    loader = run.loader(dataset, view_recipe(args), transform=CaptionViews(args, vocabulary, len(categories)))
    model, core = run.wrap(VirTex(args, outputs))
    optimizer, scaler = build_optimizer(core, args, run.global_batch), run.grad_scaler()
    lookahead = Lookahead([p for g in optimizer.param_groups for p in g["params"]], args.lookahead_steps,
                          args.lookahead_alpha) if args.lookahead_steps > 0 else None
    state = run.resume(core, optimizer, scaler)
    if lookahead is not None and state is not None and state.get("lookahead") is not None:
        lookahead.load_state_dict(state["lookahead"])
    del state
    run.save_also(lambda: {"vocabulary": list(vocabulary.tokens) if vocabulary is not None else None,
                           "categories": list(categories),
                           "lookahead": lookahead.state_dict() if lookahead is not None else None})

    # ---- the method: edit here
    peak_lr = optim.scaled_lr(args.lr, run.global_batch)
    run.start(f"task {args.task}, "
              + (f"{len(categories)} categories, " if objects else
                 f"L{args.textual_layers} H{args.textual_width}, vocabulary {len(vocabulary)}, ")
              + f"peak lr {peak_lr:.4g} (trunk) / {optim.scaled_lr(args.textual_lr, run.global_batch):.4g} (head)"
              + (f", {coco.left_out} image(s) without {coco.NOUN} left out" if coco.left_out else ""))
    model.train()
    for epoch in run.epochs():
        for views, indices in run.batches(loader):
            multiplier = optim.warmup_cosine(run.step, run.total_steps, args.warmup_steps, 1.0)
            optim.set_lr(optimizer, multiplier)  # each group: its peak lr x the schedule
            images, tokens, *labels = views
            with run.autocast():
                outputs = model(images, tokens)  # masked_lm: the masked tokens
            loss, terms = virtex_loss(outputs, tokens, args.task, args.label_smoothing, labels[0] if labels else None)
            mean_loss = run.sync(loss)
            optimizer.zero_grad(set_to_none=True)
            if run.finite_loss(mean_loss, multiplier * peak_lr, views):  # --nan-policy: stop, or skip the batch
                scaler.scale(loss).backward()
                if run.finite_grads(core, mean_loss, multiplier * peak_lr, scaler, views):
                    scaler.unscale_(optimizer)
                    if args.clip_grad_norm > 0:
                        nn.utils.clip_grad_norm_(core.parameters(), args.clip_grad_norm)
                    scaler.step(optimizer)
                    if lookahead is not None:
                        lookahead.step()
                scaler.update()
            run.log(loss=mean_loss.item(), lr=multiplier * peak_lr,
                    **{k: v.item() for k, v in terms.items()})
    return run.finish()


# ----------------------------------------------------------------------------- captioning images

@torch.no_grad()
def greedy_captions(model, images, max_length):
    """Greedy decoding from [SOS] with the forward decoder: each step appends the most likely next token other
    than the previous one (the original's decoding rule), until [EOS] or max_length tokens after [SOS]."""
    grid = resnet_grid(model.trunk, images)
    tokens = torch.full((len(images), 1), SOS, dtype=torch.long, device=images.device)
    done = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    while tokens.shape[1] <= max_length and not bool(done.all()):
        logits = model.textual(grid, tokens)[:, -1].float()
        logits.scatter_(1, tokens[:, -1:], -float("inf"))
        next_token = torch.where(done, torch.full_like(done, PAD, dtype=torch.long), logits.argmax(dim=1))
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        done |= next_token == EOS
    return tokens[:, 1:]


@torch.no_grad()
def beam_captions(model, images, max_length, beam_size=5, per_node=2):
    """The original's beam search (virtex/utils/beam_search.py, v1.2): the first step keeps the beam_size most
    likely first tokens; each later step scores every beam's per_node best continuations (log-probability summed
    over the caption, the previous token's set to -10000, a beam that ended continues with [EOS] at no cost) and
    keeps the beam_size best, until every beam has ended or max_length tokens. Returns the best beam's tokens
    [B, <= max_length] (the [EOS]s after the first are the search's padding)."""
    grid = resnet_grid(model.trunk, images)
    batch = len(images)

    def next_logprobs(predictions):  # [N, t] tokens after [SOS] -> [N, V] log-probabilities of the next one
        tokens = torch.cat([torch.full((len(predictions), 1), SOS, dtype=torch.long, device=images.device),
                            predictions], dim=1)
        memory = grid.repeat_interleave(len(predictions) // batch, dim=0)
        return F.log_softmax(model.textual(memory, tokens)[:, -1].double(), dim=1)

    first = next_logprobs(torch.empty(batch, 0, dtype=torch.long, device=images.device))
    scores, tokens = first.topk(min(beam_size, first.shape[1]), dim=1)  # [B, K]
    beams, vocab = tokens.shape[1], first.shape[1]
    predictions = tokens[:, :, None]  # [B, K, t]
    after_end = torch.full((vocab,), -float("inf"), dtype=first.dtype, device=first.device)
    after_end[EOS] = 0.0
    for _ in range(max_length - 1):
        last = predictions[:, :, -1]
        if bool((last == EOS).all()):
            break
        logprobs = next_logprobs(predictions.reshape(batch * beams, -1)).view(batch, beams, vocab)
        logprobs.scatter_(2, last[:, :, None], -10000.0)  # no token repeats the one before it
        logprobs = torch.where((last == EOS)[:, :, None], after_end, logprobs)
        top, candidates = logprobs.topk(min(per_node, vocab), dim=2)  # [B, K, P]
        summed = (scores[:, :, None] + top).view(batch, -1)
        scores, chosen = summed.topk(beams, dim=1)  # the best K of the K x P continuations
        parents = chosen // top.shape[2]
        predictions = torch.cat([predictions.gather(1, parents[:, :, None].expand(-1, -1, predictions.shape[2])),
                                 candidates.view(batch, -1).gather(1, chosen)[:, :, None]], dim=2)
    return predictions[:, 0]


def caption_images(args, runtime):
    """--caption IMAGE... --weights CKPT: print `path<TAB>caption` per image."""
    if not args.caption or not args.weights:
        raise ValueError("--caption IMAGE... and --weights CHECKPOINT go together (caption images with a trained "
                         "virtex model).")
    if args.beam_size < 1 or args.beam_per_node < 1:
        raise ValueError(f"--beam-size and --beam-per-node must be at least 1, got {args.beam_size} and "
                         f"{args.beam_per_node}.")
    ckpt = checkpoint.load(args.weights)
    if not isinstance(ckpt, dict) or ckpt.get("method") != "virtex" or not isinstance(ckpt.get("args"), dict) \
            or not isinstance(ckpt.get("model"), dict):
        raise checkpoint.CheckpointError(f"{args.weights} is not a virtex training checkpoint.")
    trained = Args()  # the defaults, then the checkpoint's settings
    for key, value in ckpt["args"].items():
        if hasattr(trained, key):
            setattr(trained, key, tuple(value) if isinstance(value, list) else value)
    if trained.task not in ("bicaptioning", "captioning"):
        raise ValueError(f"{args.weights} was trained for {trained.task}, which has no forward captioning decoder.")
    if not isinstance(ckpt.get("vocabulary"), list):
        raise checkpoint.CheckpointError(f"{args.weights} is not a virtex training checkpoint (it has no vocabulary).")
    vocabulary = Vocabulary(ckpt["vocabulary"])
    model = VirTex(trained, len(vocabulary))
    checkpoint.load_model(model, ckpt["model"], args.weights)
    model.to(runtime.device).eval()
    import torchvision.transforms.functional as TF

    size = trained.image_size
    lines = []
    for path in args.caption:
        try:
            image = data.ImageFiles([path], [-1], [])[0][0]
        except data.BadImage as e:
            raise ValueError(f"cannot read the image {e}.") from None
        image = TF.center_crop(TF.resize(image, round(size * 256 / 224)), size)  # the original's validation view
        x = TF.normalize(TF.to_tensor(image), gpu_aug.IMAGENET_MEAN, gpu_aug.IMAGENET_STD)
        x = x[None].to(runtime.device)
        ids = (greedy_captions(model, x, trained.max_caption_length) if args.beam_size == 1 else
               beam_captions(model, x, trained.max_caption_length, args.beam_size, args.beam_per_node))[0].tolist()
        lines.append(f"{path}\t{vocabulary.decode(ids)}")
    if runtime.is_main:
        print("\n".join(lines), flush=True)
    return lines


def main(argv=None):
    return launch(train, Args, PRESETS, __doc__, argv)


if __name__ == "__main__":
    cli.run(main)

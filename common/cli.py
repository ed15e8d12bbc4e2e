"""Command lines from dataclasses, presets, and one-sentence errors.

Each script declares `@dataclass class Args` whose defaults are the published recipe;
`parse_args(Args, PRESETS)` turns every field into a `--kebab-case` flag, applies
`--preset NAME` first and explicit flags on top. A field's help text is its `help`
metadata and its trailing `# comment` in the class (the recipe's notes are its --help),
else the common flags' text below; `--help` shows every default, and `--preset NAME
--help` the preset's; `--trust-checkpoint` (every script) lifts the weights_only loading of
common/checkpoint.py. `run(main)` turns bad input
(ValueError, OSError) into one sentence on stderr and exit status 2; set SSL_DEBUG=1
to see the traceback.
"""
import argparse
import ast
import dataclasses
import inspect
import io
import os
import sys
import tempfile
import textwrap
import tokenize
import traceback
import typing
from pathlib import Path

from common import checkpoint

# help for the flags every script shares, where a script's Args gives none
COMMON_HELP = {
    "data": "ImageFolder dir, `path [label]` file list, or cifar10 / cifar10-mini / fashion-mnist",
    "arch": "trunk: any torchvision ResNet, RegNet, ConvNeXt or ViT (resnet18, resnet50, wide_resnet50_2, "
            "regnet_y_400mf, convnext_tiny, vit_b_16, ...), or DINO's vit_ti_16 / vit_s_16",
    "cifar_stem": "3x3 stride-1 first convolution and no max-pool (for 32-px images; ResNets only)",
    "epochs": "training epochs",
    "batch_size": "images per process (the global batch is this times the world size)",
    "lr": "learning rate for a global batch of 256, scaled linearly with the global batch",
    "final_lr": "learning rate at the end of the cosine schedule (same scaling as --lr)",
    "warmup_epochs": "epochs of linear warm-up before the schedule",
    "weight_decay": "weight decay",
    "momentum": "SGD momentum",
    "temperature": "softmax temperature of the loss",
    "workers": "data-loading worker processes per process",
    "gpu_aug": "make the views in batches on the device (auto: on with CUDA)",
    "compile": "torch.compile the model",
    "device": "auto (CUDA when present), cpu, cuda or cuda:N",
    "precision": "autocast precision (auto: bf16 on GPU, fp32 on CPU)",
    "seed": "seed of every random choice (initialisation, data order, augmentations)",
    "output_dir": "checkpoints, metrics.jsonl and TensorBoard logs; re-running resumes from here",
    "max_steps": "stop after this many steps in total (0: run all epochs)",
    "data_fraction": "train on this class-balanced fraction of the images",
    "checkpoint_every": "steps between checkpoints, besides every epoch's end (0: epochs only)",
    "keep_checkpoints": "how many recent checkpoints to keep",
    "nan_policy": "on a NaN/Inf loss or gradient: stop, or skip the batch",
    "max_nan_skips": "with --nan-policy skip: stop after this many skipped batches",
    "max_bad_fraction": "stop when more unreadable images than this fraction are met",
    "print_every": "steps between progress lines",
    "resume": "continue from the latest checkpoint in --output-dir",
    "sync_bn": "synchronise BatchNorm statistics across processes",
    "embedding_dim": "output width of the projection head",
    "hidden_dim": "hidden width of the projection MLP",
    "image_size": "crop size in pixels",
    "crop_scale": "RandomResizedCrop's range of the crop's area, as fractions of the image (min max)",
    "grayscale_p": "probability of converting a view to grayscale",
    "blur_p": "probability of a Gaussian blur",
    # the eval scripts
    "state_dict_key": "dotted path of the weights inside the checkpoint",
    "remove_prefix": "strip this prefix from the checkpoint's weight names (e.g. module.encoder_q.)",
    "append_prefix": "prepend this to the checkpoint's weight names",
    "save_features": "write the extracted features (every --layers tap) to this file, for --features later",
    "layers": "feature taps: conv1 res2 res3 res4 res5 pooled, VISSL's vissl-* pooled taps, head (ResNets); "
              "stem stage1..stage4 pooled head (RegNet, ConvNeXt); cls patch_mean cls_last4 cls_avgpool pooled "
              "head (ViT)",
    "resize_size": "short-side resize before the centre crop (0: from --image-size)",
    "output": "also write the JSON result to this file",
}


def field_comments(args_cls):
    """{field name: its trailing `# comment`} for the dataclass `args_cls` and its bases, read from the source."""
    comments = {}
    for cls in reversed(args_cls.__mro__[:-1]):
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):  # no source (e.g. defined in a REPL)
            continue
        spans = [(node.target.id, node.lineno, node.end_lineno) for node in ast.parse(source).body[0].body
                 if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)]
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT and tok.line.strip() != tok.string.strip():  # trailing, not a line
                for name, first, last in spans:
                    if first <= tok.start[0] <= last:
                        comments[name] = (comments.get(name, "") + " " + tok.string.lstrip("#").strip()).strip()
    return comments


def _flag(name):
    return "--" + name.replace("_", "-")


def field_help(args_cls):
    """{field name: help text}: the `help` metadata, then the trailing comment, else COMMON_HELP's text."""
    comments = field_comments(args_cls)
    out = {}
    for f in dataclasses.fields(args_cls):
        parts = [p for p in (f.metadata.get("help"), comments.get(f.name)) if p]
        out[f.name] = "; ".join(parts) or COMMON_HELP.get(f.name, "")
    return out


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag with its default, including empty strings and booleans."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else repr(default) \
            if default == "" else default
        return f"{text} (default: {shown})".strip().replace("%", "%%")


def build_parser(args_cls, presets=None, description=None):
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="a named set of defaults (explicit flags still win; `--preset NAME --help` shows "
                                 "them): " + "; ".join(f"{k}: {v.get('_doc', '')}" for k, v in sorted(presets.items())))
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load checkpoints and feature files with full pickle instead of weights_only: only for "
                             "files from a source you trust, since unpickling can run any code the file contains")
    hints = typing.get_type_hints(args_cls)
    helps = field_help(args_cls)
    for f in dataclasses.fields(args_cls):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = helps[f.name] or "(default: %(default)s)"
        origin = typing.get_origin(kind)
        if origin is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
            origin = typing.get_origin(kind)
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif origin in (tuple, list) or kind in (tuple, list):
            element = (typing.get_args(kind) or (str,))[0]
            parser.add_argument(_flag(f.name), type=element, nargs="+", default=default, help=help_text)
        else:
            parser.add_argument(_flag(f.name), type=kind, default=default, help=help_text,
                                choices=f.metadata.get("choices"))
    return parser


def parse_args(args_cls, presets=None, argv=None, description=None):
    """An `args_cls` instance from the command line: defaults < preset < explicit flags."""
    parser = build_parser(args_cls, presets, description)
    if presets:  # the preset first (without --help, so that `--preset NAME --help` shows the preset's defaults)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--preset", choices=sorted(presets), default=None)
        known, _ = pre.parse_known_args(argv)
        if known.preset:
            parser.set_defaults(**{k: v for k, v in presets[known.preset].items() if not k.startswith("_")})
    namespace = vars(parser.parse_args(argv))
    preset = namespace.pop("preset", None)
    trust = namespace.pop("trust_checkpoint")
    values = args_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in namespace.items()})
    values.preset = preset
    checkpoint.TRUSTED = trust
    if getattr(values, "batch_size", 1) < 1:
        raise ValueError(f"--batch-size must be at least 1 (images per process), got {values.batch_size}.")
    return values


def parse_crops(spec):
    """--crops: '2x160,4x96' -> [(2, 160), (4, 96)], groups of (views, side in pixels)."""
    try:
        groups = [tuple(int(n) for n in part.split("x")) for part in spec.split(",")]
        assert groups and all(len(g) == 2 and g[0] > 0 and g[1] > 0 for g in groups)
    except (ValueError, AssertionError):
        raise ValueError(f"--crops must look like 2x224 or 2x160,4x96, got {spec!r}.") from None
    return groups


def check_output_file(path, flag="--output"):
    """Fail before any work is done when the result file `path` could not be written at the end."""
    if not path:
        return
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be written: {folder} is not a writable directory "
                         f"({e.strerror}).") from None


def run(main):
    """Call main(); bad input ends with one sentence on stderr and exit status 2."""
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError) as e:
        if os.environ.get("SSL_DEBUG"):
            traceback.print_exc()
        message = str(e).strip() or type(e).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def as_dict(args):
    out = dataclasses.asdict(args)
    out["preset"] = getattr(args, "preset", None)
    return out

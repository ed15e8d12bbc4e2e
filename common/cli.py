"""Command lines from dataclasses, presets, and one-sentence errors.

Each script declares `@dataclass class Args` whose defaults are the published recipe;
`parse_args(Args, PRESETS)` turns every field into a `--kebab-case` flag, applies
`--preset NAME` first and explicit flags on top. `run(main)` turns bad input
(ValueError, OSError) into one sentence on stderr and exit status 2; set SSL_DEBUG=1
to see the traceback.
"""
import argparse
import dataclasses
import os
import sys
import tempfile
import traceback
import typing
from pathlib import Path


def _flag(name):
    return "--" + name.replace("_", "-")


def build_parser(args_cls, presets=None, description=None):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="a named set of defaults (explicit flags still win): " + "; ".join(
                                f"{k}: {v.get('_doc', '')}" for k, v in sorted(presets.items())))
    hints = typing.get_type_hints(args_cls)
    for f in dataclasses.fields(args_cls):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", " ")
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
    if presets:
        known, _ = parser.parse_known_args(argv)
        if known.preset:
            parser.set_defaults(**{k: v for k, v in presets[known.preset].items() if not k.startswith("_")})
    namespace = vars(parser.parse_args(argv))
    preset = namespace.pop("preset", None)
    values = args_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in namespace.items()})
    values.preset = preset
    if getattr(values, "batch_size", 1) < 1:
        raise ValueError(f"--batch-size must be at least 1 (images per process), got {values.batch_size}.")
    return values


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

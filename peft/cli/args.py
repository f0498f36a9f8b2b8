"""Command lines from option dataclasses: one ``--flag`` per field, its help and choices from the field's metadata.

Every tool's options are a dataclass of :func:`peft.fields.option` fields; :func:`build_parser` turns them into
argparse flags, and :func:`method_flags` adds one flag per
option of every registered PEFT method (``--lora-rank``, ``--rlrr-init``, …), so a new method's options reach
the command line without touching it. :func:`run_main` gives every tool the same exit behaviour.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import sys
import types
import typing

from loaders.datasets import DatasetError
from loaders.download import DownloadError
from loaders.npz import CheckpointError

from .. import fields
from ..base import AdapterStateError, NotMergeableError
from ..finetune import CheckpointMismatch, OptionsError, TrainingDiverged
from ..finetune.rundir import RunFolderBusy
from ..kernels import KernelUnavailableError
from ..registry import METHODS

log = logging.getLogger("vit-peft")

USAGE_ERROR, RUNTIME_ERROR = 2, 1


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the flag and what it accepts (exit code 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(cls, description: str | None = None, epilog: str | None = None,
                 positional: tuple[str, ...] = (), prog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag-name`` per dataclass field, default and help from the class.

    Fields whose type is a dict (``method_options``) are skipped: :func:`method_flags` provides them.
    """
    parser = Parser(prog=prog, description=description, epilog=epilog)
    hints = typing.get_type_hints(cls)
    helps = {f.name: fields.help_of(f).replace("%", "%%") for f in dataclasses.fields(cls)}  # argparse formats %
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if kind is dict or f.name == "explicit":  # method_options (see method_flags); explicit: parse_options
            continue
        if kind is list:  # a repeatable flag (tools/vtab.py --sweep lr=... --sweep weight_decay=...)
            parser.add_argument("--" + f.name.replace("_", "-"), action="append", default=None,
                                metavar=f.name.upper(), help=helps.get(f.name, ""),
                                required=f.name in getattr(cls, "REQUIRED", ()))
            continue
        optional = typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)
        if optional:
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = helps.get(f.name, "") + ("" if default in (None, []) or f.name in positional
                                              else " (default: %(default)s)")
        choices = fields.choices_of(f)
        flag = "--" + f.name.replace("_", "-")
        if f.name in positional and typing.get_origin(kind) is list:  # image files: any number
            parser.add_argument(f.name, type=typing.get_args(kind)[0], nargs="*", help=help_text)
        elif f.name in positional:
            parser.add_argument(f.name, type=kind, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(kind) is list:  # list[int], list[str]: one flag, several values
            item = typing.get_args(kind)[0]
            parser.add_argument(flag, type=item, nargs="+", default=default, choices=choices,
                                metavar=f.name.rstrip("s").upper(),
                                help=help_text + (f"; from: {', '.join(choices)}" if choices else ""))
        else:
            parser.add_argument(flag, type=kind, default=default, choices=choices,
                                metavar=None if choices else f.name.upper(), help=help_text)
    return parser


def method_flags(parser: argparse.ArgumentParser) -> list[str]:
    """Add the options of every registered method as flags (default None: "the method's own default")."""
    names = []
    for method in METHODS.values():
        if not method.options:
            continue
        group = parser.add_argument_group(f"--mode {method.name} options")
        for key, opt in method.options.items():
            group.add_argument(opt.flag, dest=key, type=opt.kind, default=None, choices=opt.choices,
                               metavar=None if opt.choices else key.upper(),
                               help=f"{opt.help} (default: {opt.default})".replace("%", "%%"))
            names.append(key)
    return names


def parse_options(argv=None, cls=None, with_methods: bool = False, **parser_kw):
    """Parse ``argv`` into an instance of the dataclass ``cls``; method flags go into ``method_options``."""
    parser = build_parser(cls, **parser_kw)
    method_keys = method_flags(parser) if with_methods else []
    args = vars(parser.parse_args(argv))
    for f in dataclasses.fields(cls):  # repeatable flags not given: their empty list
        if f.name in args and args[f.name] is None and f.default is dataclasses.MISSING:
            args[f.name] = f.default_factory()
    given = {k: args.pop(k) for k in method_keys}
    if with_methods:
        args["method_options"] = {k: v for k, v in given.items() if v is not None}
    if "explicit" in {f.name for f in dataclasses.fields(cls)}:
        args["explicit"] = sorted(given_flags(parser, argv))
    return cls(**args)


def given_flags(parser: argparse.ArgumentParser, argv=None) -> set[str]:
    """The destinations the command line actually set (a flag given with its default value counts). Consumes
    the parser: its defaults are suppressed for a second parse in which only given flags appear."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# Errors whose message says all (missing files, failed downloads, mismatched checkpoints, divergence).
EXPECTED_ERRORS = (TrainingDiverged, CheckpointMismatch, CheckpointError, DatasetError, DownloadError,
                   FileNotFoundError, NotMergeableError, AdapterStateError, KernelUnavailableError, RunFolderBusy)


# Faults of the file system a run writes to: one line naming the path, exit 1 (files written earlier stay as they
# were: every checkpoint and report is written to a temporary file and renamed).
OUTPUT_FAULTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.EISDIR: "it is a folder",
                 errno.ENOTDIR: "a part of the path is not a folder", errno.EIO: "an input/output error"}


def describe_os_error(e: OSError) -> str | None:
    """One line for a file-system fault (None for other OSErrors)."""
    if e.errno not in OUTPUT_FAULTS:
        return None
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{OUTPUT_FAULTS[e.errno]} ({e.strerror or 'errno ' + str(e.errno)}); files written earlier are unchanged"


def run_main(main, argv=None, name: str = "vit-peft") -> int:
    """Run a tool's ``main(argv)`` with the project's exit behaviour: 0 done, 2 a usage error (bad flag,
    one line naming it), 1 a runtime error (missing file, bad checkpoint, divergence: one line, no traceback),
    130 on Ctrl-C."""
    try:
        return main(argv) or 0
    except OptionsError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except EXPECTED_ERRORS as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return RUNTIME_ERROR
    except OSError as e:
        line = describe_os_error(e)
        if line is None:
            raise
        print(f"{name}: error: {line}", file=sys.stderr)
        return RUNTIME_ERROR
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130

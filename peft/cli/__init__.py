"""The command lines: ``vit-peft <command>`` (installed) and ``python tools/<command>.py`` (a checkout).

Each command is a module here with ``main(argv)`` (raises on errors, for tests and other code) and ``cli(argv)``
(the exit codes of :func:`peft.cli.args.run_main`); ``tools/*.py`` are three-line shells over ``cli``.
"""

from __future__ import annotations

import sys

from . import attention_map, benchmark, evaluate, finetune, patch_filters, pos_embed, predict, quickstart, vtab

COMMANDS = {"finetune": finetune, "evaluate": evaluate, "predict": predict, "quickstart": quickstart,
            "attention-map": attention_map, "pos-embed": pos_embed, "patch-filters": patch_filters,
            "benchmark": benchmark, "vtab": vtab}


def main(argv=None) -> int:
    """``vit-peft COMMAND [options]``; ``vit-peft COMMAND --help`` for each command's options."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        print("usage: vit-peft COMMAND [options]   (vit-peft COMMAND --help for its options)\n\ncommands:")
        for name, module in COMMANDS.items():
            print(f"  {name:<{width}}  {(module.__doc__ or '').strip().splitlines()[0]}")
        return 0 if argv else 2
    name = argv[0].replace("_", "-")
    if name not in COMMANDS:
        print(f"vit-peft: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[name].cli(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

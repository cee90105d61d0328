"""Command line: ``attnzoo train | eval | profile | bench | reproduce | report | visualize |
export | list`` (also ``python -m attnzoo``).

Where things are: ``parser.py`` every command's options; ``train.py`` the train command
(resume, ``--nproc``); ``commands.py`` the other commands.

The CLI only parses arguments and calls library functions. Every user error (unknown
name, bad option, missing or corrupt file) prints one line and exits with status 2.
"""

from __future__ import annotations

import sys

from .commands import (
    cmd_bench,
    cmd_eval,
    cmd_export,
    cmd_list,
    cmd_profile,
    cmd_report,
    cmd_reproduce,
    cmd_visualize,
)
from .parser import EXIT_USAGE, build_parser, parse_mapping
from .train import cmd_train, train_config, worker_argv

__all__ = ["build_parser", "main", "parse_mapping", "train_config", "worker_argv"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..data import DataError
    from ..train import RunError

    try:
        commands = {
            "train": cmd_train,
            "eval": cmd_eval,
            "profile": cmd_profile,
            "bench": cmd_bench,
            "list": cmd_list,
            "reproduce": cmd_reproduce,
            "report": cmd_report,
            "visualize": cmd_visualize,
            "export": cmd_export,
        }
        return commands[args.command](args)
    except (ValueError, TypeError, DataError, RunError, FileNotFoundError, PermissionError) as e:
        print(f"attnzoo: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("attnzoo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``asag`` command line: one sub-command per module in :mod:`asag.commands`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from asag.errors import AsagError


def build_parser() -> argparse.ArgumentParser:
    from asag.commands import COMMANDS

    parser = argparse.ArgumentParser(prog="asag", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AsagError as err:
        print(f"asag {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"asag {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

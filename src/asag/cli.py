"""The ``asag`` command line: one sub-command per module in :mod:`asag.commands`.

Exit codes: 0 success, 1 the work failed part way (a file could not be written, some inputs could
not be read), 2 bad input (an option, a preset, a file), 130 interrupted (Ctrl-C). Every failure is
reported in one line on stderr, ``asag COMMAND: error: ...``, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from asag.errors import AsagError
from asag.outputs import describe_os_error

DESCRIPTION = ("ASAG query-based object detectors (Fu et al., ICCV 2023): train, evaluate, predict, "
               "visualise, convert the authors' checkpoints and benchmark. `asag COMMAND --help` for "
               "each command's options.")


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the help already names its default (or the
    default is None or an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or not action.option_strings or no_default:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter` (sub-command parsers inherit it)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from asag.commands import COMMANDS

    parser = ArgumentParser(prog="asag", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def is_override(token: str) -> bool:
    """Whether a command-line token is a ``key=value`` config override (not an option)."""
    return "=" in token and not token.startswith("-")


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, except that the ``key=value`` overrides of a command that takes them
    (an ``overrides`` positional) may also come after its options, e.g. ``asag train tiny_cpu
    --output-dir runs/x data.root=D``: argparse stops filling a positional once an option follows it, so
    those tokens are appended to ``overrides`` in command-line order. Any other leftover token is refused
    as by argparse (``unrecognized arguments``, exit 2)."""
    args, extras = parser.parse_known_args(argv)
    takes_overrides = isinstance(getattr(args, "overrides", None), list)
    routed = [token for token in extras if is_override(token)] if takes_overrides else []
    unknown = [token for token in extras if token not in routed]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if routed:
        args.overrides = [*args.overrides, *routed]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_command_line(parser, argv)
    try:
        return int(args.func(args) or 0)
    except AsagError as err:
        print(f"asag {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions, a file vanishing under us ...
        print(f"asag {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"asag {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``asag config show PRESET [key=value ...]`` and ``asag config list``."""

from __future__ import annotations

import argparse

from asag.config import available_presets, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="show presets and resolved configurations")
    sub = parser.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = sub.add_parser("show", help="print the resolved configuration of a preset")
    show.add_argument("preset", help="preset name (see `asag config list`) or path to a YAML file")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    show.add_argument("--format", choices=["yaml", "json"], default="yaml", help="output format")
    show.set_defaults(func=run_show)
    listing = sub.add_parser("list", help="list the available presets")
    listing.set_defaults(func=run_list)


def run_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.preset, args.overrides)
    print(cfg.to_json() if args.format == "json" else cfg.to_yaml(), end="")
    return 0


def run_list(args: argparse.Namespace) -> int:
    for name in available_presets():
        print(f"{name:28s} {load_config(name).description}")
    return 0

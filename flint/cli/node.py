"""`flint node`: run one host's Flint node."""

from __future__ import annotations

import argparse

from flint.cli.common import Commands


def add_parser(commands: Commands) -> None:
    node = commands.add_parser("node", help="run one host's Flint node (roles from its config)")
    node.add_argument("--config", required=True, help="the node's TOML config (see wire/config.py for keys)")
    node.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    node.set_defaults(func=cmd_node)


def cmd_node(args: argparse.Namespace) -> int:
    from nodes.daemon import main as node_main

    return node_main(args.config, log_level=args.log_level)

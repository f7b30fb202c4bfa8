"""The `flint` command: run a node, run a local region, manage functions, invoke them. One module per noun."""

from __future__ import annotations

import argparse
import sys

from flint.cli import alias, chaos, cluster, counting, demo, events, function, invoke, node, placement, tenant
from flint.cli.cluster import _settings  # noqa: F401 (tests/unit/test_config.py checks --set through flint.cli)
from flint.cli.common import EXIT_SERVICE_ERROR, EXIT_USAGE
from wire.errors import FlintError

# In the order `flint --help` lists them.
NOUNS = (node, cluster, function, alias, events, tenant, counting, chaos, placement, invoke, demo)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args) or 0
    except FlintError as err:
        print(f"error: {err}", file=sys.stderr)
        hint = _hint(err)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return EXIT_SERVICE_ERROR
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        from nodes.local import RegionError
        from wire.config import ConfigError

        if isinstance(err, (RegionError, ConfigError)):
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flint",
        description="Flint: serverless functions on your own hosts. Start with `flint demo`, "
        "or `flint cluster up` and then `flint function create` / `flint invoke`.",
    )
    commands = p.add_subparsers(metavar="COMMAND")
    for noun in NOUNS:
        noun.add_parser(commands)
    return p


def _hint(err: FlintError) -> str | None:
    name = err.type_name
    if name == "ResourceNotFoundException":
        return "list your functions with `flint function list`"
    if name == "TooManyRequestsException":
        return "the concurrency limit is in use; retry with backoff"
    if err.reason in ("NotSent", "Timeout", "ConnectionLost"):
        return "is the region up? check `flint cluster status`"
    return None

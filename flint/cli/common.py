"""What several nouns of the `flint` command share: exit codes, common options, the client or region from the
options, the nodes table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from flint.client import DEFAULT_REGION_DIR, Client

EXIT_FUNCTION_ERROR = 1
EXIT_USAGE = 2
EXIT_SERVICE_ERROR = 3

# The subparsers of the command line or of one noun: where the next level of commands is added.
Commands = argparse._SubParsersAction

REGION_HELP = f"region directory (default {DEFAULT_REGION_DIR}, or $FLINT_REGION)"
KEY_HELP = "a tenant's .key_secret (default: the region's)"


def add_group(commands: Commands, name: str, help: str) -> tuple[argparse.ArgumentParser, Commands]:
    """A command that only holds actions (`flint cluster up`, ...); alone, it prints its help."""
    group = commands.add_parser(name, help=help)
    actions = group.add_subparsers(metavar="ACTION")
    group.set_defaults(func=lambda args: usage(group))
    return group, actions


def usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_USAGE


def add_dir(parser: argparse.ArgumentParser) -> None:
    """--dir (or --region, as the other commands spell it): the local region an operator command acts on."""
    parser.add_argument("--dir", "--region", dest="dir", type=Path, default=DEFAULT_REGION_DIR, help=REGION_HELP)


def add_region_and_key(parser: argparse.ArgumentParser, key_help: str = KEY_HELP) -> None:
    """--region and --key: where a tenant's command goes, and as whom."""
    parser.add_argument("--region", type=Path, default=None, help=REGION_HELP)
    parser.add_argument("--key", type=Path, default=None, help=key_help)


def client_from(args: argparse.Namespace, operator: bool = False) -> Client:
    if operator:
        return Client.from_region(getattr(args, "region", None), key_file=getattr(args, "operator_key", None),
                                  operator=True)
    return Client.from_region(getattr(args, "region", None), key_file=getattr(args, "key", None))


def region_from(args: argparse.Namespace):
    from nodes.local import Region

    return Region(args.dir)


def wait_healthy(region: Any, timeout_s: float) -> None:
    started = time.monotonic()
    last = [0.0]

    def progress(rows: list[dict]) -> None:
        if time.monotonic() - last[0] >= 2.0:
            last[0] = time.monotonic()
            healthy = sum(1 for r in rows if r["health"] == "healthy")
            print(f"  waiting for health: {healthy}/{len(rows)} nodes healthy "
                  f"({time.monotonic() - started:.0f}s)", flush=True)

    region.wait_healthy(timeout_s, progress=progress)
    print(f"region healthy in {time.monotonic() - started:.1f}s")


def print_table(rows: list[dict]) -> None:
    cols = ["node", "az", "address", "roles", "process", "health", "raft", "isolation", "sandboxes", "persist"]
    rows = [{**r, "persist": {True: "ok", False: "NO"}.get(r.get("can_persist"))} for r in rows]
    table = [[str(r.get(c) if r.get(c) is not None else "-") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    for r in rows:
        if r.get("can_persist") is False:
            print(f"{r['node']} cannot persist: {r.get('persist_problem')}")

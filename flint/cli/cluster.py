"""`flint cluster up|status|down`: a local region, every node a process on its own loopback address."""

from __future__ import annotations

import argparse
import json
from typing import Any

from flint.cli.common import Commands, add_dir, add_group, print_table, region_from, wait_healthy


def add_parser(commands: Commands) -> None:
    _, actions = add_group(commands, "cluster", "a local region: every node a process on its own loopback address")
    up = actions.add_parser("up", help="start a local region, wait until healthy, print its nodes")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--azs", type=int, default=3, help="availability zones; one control replica each (default 3)")
    add_dir(up)
    up.add_argument("--base-ip", default="127.77.0.1", help="first node's loopback address (default 127.77.0.1)")
    up.add_argument("--keep-alive-s", type=float, help="idle sandbox keep-alive in seconds (default 600)")
    up.add_argument("--timeout-s", type=float, default=90.0, help="how long to wait for health (default 90)")
    up.add_argument("--layout", choices=["combined", "dedicated"], default="combined",
                    help="combined: control nodes also run functions; dedicated: they only run control")
    up.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="a node setting for every node, as in node.toml's [settings] (repeatable), e.g. "
                         "--set worker_memory_mb=4096 --set lease_block_mb=1024")
    up.set_defaults(func=cmd_cluster_up)
    status = actions.add_parser("status", help="nodes, AZs, roles, health, Raft roles (L=leader, F=follower)")
    add_dir(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_cluster_status)
    down = actions.add_parser("down", help="stop every node of the local region (SIGTERM, then SIGKILL)")
    add_dir(down)
    down.add_argument("--purge", action="store_true", help="also delete the region directory and its data")
    down.set_defaults(func=cmd_cluster_down)


def _settings(pairs: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs as node settings, each VALUE read as TOML and checked as node.toml's would be."""
    import tomllib

    from wire.config import ConfigError, Settings, _sub

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set keep_alive_s=60")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"--set {pair!r}: {value!r} is not a number, true/false, a 'quoted' string or a list") from None
    _sub(Settings, out, "--set")
    return out


def cmd_cluster_up(args: argparse.Namespace) -> int:
    from nodes.local import Region

    region = Region(args.dir)
    if region.exists:
        running = [n["node_id"] for n in region.nodes() if region.pid(n["node_id"])]
        if running:
            print(f"region at {region.root} is already running ({', '.join(running)}); restarting stopped nodes")
        else:
            print(f"restarting the stopped region at {region.root} (its data is kept)")
    else:
        settings = _settings(args.settings)
        if args.keep_alive_s:
            settings["keep_alive_s"] = args.keep_alive_s
        region = Region.create(args.dir, nodes=args.nodes, azs=args.azs, base_ip=args.base_ip, settings=settings,
                               layout=args.layout)
        print(f"created a region of {args.nodes} nodes in {args.azs} AZs at {region.root}")
    region.start()
    wait_healthy(region, args.timeout_s)
    region.ensure_tenant()
    print_table(region.status())
    print(f"\ntenant 'default' key: {region.root / 'tenants' / 'default.key_secret'}")
    print(f"try: flint function create hello --code examples/hello --handler handler.handle --region {region.root}")
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    rows = region_from(args).status()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0 if all(r["health"] == "healthy" for r in rows) else 1


def cmd_cluster_down(args: argparse.Namespace) -> int:
    region = region_from(args)
    result = region.down(remove=args.purge)
    for node_id, clean in result.items():
        print(f"{node_id}: {'stopped' if clean else 'killed (did not stop within 15s)'}")
    if args.purge:
        print(f"removed {region.root}")
    return 0

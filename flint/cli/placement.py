"""`flint placement ...`: operator commands for worker hosts, their health and leases."""

from __future__ import annotations

import argparse
import json

from flint.cli.common import Commands, add_dir, add_group, region_from


def add_parser(commands: Commands) -> None:
    _, actions = add_group(commands, "placement", "operator: worker hosts, their health and leases")
    status = actions.add_parser("status", help="every host: health, suspect, draining, capacity leased, sandboxes")
    status.add_argument("--json", action="store_true")
    drain = actions.add_parser("drain", help="take a host out gracefully: no new sandboxes; existing ones finish")
    drain.add_argument("node")
    drain.add_argument("--undo", action="store_true", help="put a drained host back into service")
    for sp, func in ((status, cmd_placement_status), (drain, cmd_placement_drain)):
        add_dir(sp)
        sp.set_defaults(func=func)


def cmd_placement_status(args: argparse.Namespace) -> int:
    from wire import messages as m

    region = region_from(args)
    nodes = region.call("placement", m.ListNodes())
    leases = region.call("placement", m.ListWorkerLeases()).leases
    if args.json:
        print(json.dumps({"nodes": [n.to_fields() for n in nodes.nodes],
                          "leases": [lease.to_fields() for lease in leases]}, indent=2))
        return 0
    print(f"{'NODE':<6} {'AZ':<5} {'HEALTH':<10} {'LEASABLE':<8} {'LEASED':>14} {'SANDBOXES':>9}  NOTE")
    for n in nodes.nodes:
        if m.Role.WORKER not in n.roles:
            continue
        health = "healthy" if n.healthy else ("suspect" if n.suspect else "unhealthy")
        note = ", ".join(filter(None, ["draining" if n.draining else "",
                                       f"held down {n.held_down_s}s" if n.held_down_s else ""]))
        print(f"{n.node_id:<6} {n.az:<5} {health:<10} {'yes' if n.leasable else 'no':<8} "
              f"{n.leased_mb:>6}/{n.capacity_mb:<7} {n.sandboxes:>9}  {note}")
    print(f"\n{len(leases)} lease(s); {nodes.free_capacity_mb} MB free to lease at once")
    short = nodes.headroom.short_azs
    if short:
        print(f"short of capacity in {', '.join(short)}: no worker there has {nodes.headroom.reserve_mb} MB "
              "free; managers hand back empty leases there within seconds. Add worker hosts to those AZs.")
    return 0


def cmd_placement_drain(args: argparse.Namespace) -> int:
    from wire import messages as m

    region = region_from(args)
    out = region.call("placement", m.Drain(node_id=args.node, draining=not args.undo))
    if args.undo:
        print(f"{args.node} is back in service")
    else:
        print(f"{args.node} is draining: no new sandboxes; {len(out.leases)} lease(s) on it run down as "
              "their sandboxes go idle")
    return 0

"""`flint counting ...`: operator commands for the counting service's ledger and its replicas."""

from __future__ import annotations

import argparse
import json

from flint.cli.common import Commands, add_dir, add_group, region_from


def add_parser(commands: Commands) -> None:
    _, actions = add_group(commands, "counting", "operator: the counting service's ledger and its replicas")
    status = actions.add_parser("status", help="limits, pools, credits held and in use, leases; replica agreement")
    status.add_argument("--tenant", default=None)
    status.add_argument("--json", action="store_true")
    members = actions.add_parser("members", help="the counting replicas, which one leads, which are connected")
    add = actions.add_parser("add", help="start a counting replica on NODE and add it to the group")
    add.add_argument("node")
    remove = actions.add_parser("remove", help="remove NODE's counting replica (leadership is handed over first)")
    remove.add_argument("node")
    for sp, func in ((status, cmd_counting_status), (members, cmd_counting_members), (add, cmd_counting_add),
                     (remove, cmd_counting_remove)):
        add_dir(sp)
        sp.set_defaults(func=func)


def cmd_counting_status(args: argparse.Namespace) -> int:
    from wire import messages as m

    region = region_from(args)
    status = region.call("counting", m.CountingStatus(tenant=args.tenant))
    if args.json:
        print(json.dumps(status.to_fields(), indent=2))
        return 0
    for tenant, view in status.tenants.items():
        print(f"tenant {tenant}: limit {view.limit} (unreserved min {view.unreserved_min})")
        for pool, p in view.pools.items():
            print(f"  pool {pool:<24} capacity {p.capacity:>6}  held {p.held:>6}  in use {p.in_use:>6}  "
                  f"leases {p.leases}")
    if status.lease_details:
        print(f"\n{'LEASE':<28} {'TENANT':<12} {'POOL':<14} {'CREDITS':>7} {'IN USE':>6} {'TARGET':>6} {'EXPIRES':>8}")
        for lease in status.lease_details:
            target = "-" if lease.target is None else str(lease.target)
            print(f"{lease.lease_id:<28} {lease.tenant:<12} {lease.pool:<14} {lease.credits:>7} "
                  f"{lease.in_use:>6} {target:>6} {lease.expires_in_s:>7.1f}s")
    raft = status.raft
    print(f"\nraft: replica {raft.address} is {raft.state}, leader {raft.leader or 'unknown'}, "
          f"commit {raft.commit_idx}, ledger digest {status.digest}")
    return 0


def cmd_counting_members(args: argparse.Namespace) -> int:
    _print_members(region_from(args).counting_members())
    return 0


def cmd_counting_add(args: argparse.Namespace) -> int:
    print(f"adding a counting replica on {args.node}...", flush=True)
    _print_members(region_from(args).counting_add(args.node))
    return 0


def cmd_counting_remove(args: argparse.Namespace) -> int:
    print(f"removing {args.node}'s counting replica...", flush=True)
    _print_members(region_from(args).counting_remove(args.node))
    return 0


def _print_members(members: list[dict]) -> None:
    print(f"{'NODE':<6} {'ADDRESS':<22} {'ROLE':<9} CONNECTED")
    for mb in members:
        print(f"{mb['node']:<6} {mb['address']:<22} {'leader' if mb['leader'] else 'follower':<9} "
              f"{'yes' if mb['connected'] else 'no'}")
    n = len(members)
    if n % 2 == 0:
        print(f"note: {n} replicas tolerate {(n - 1) // 2} failure(s), no more than {n - 1} would; "
              "an odd count is better")

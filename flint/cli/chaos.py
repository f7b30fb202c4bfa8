"""`flint chaos ...`: break a local region on purpose, and watch it heal."""

from __future__ import annotations

import argparse
import time

from flint.cli.common import Commands, add_dir, add_group, print_table, region_from


def add_parser(commands: Commands) -> None:
    _, actions = add_group(commands, "chaos", "break a local region on purpose, and watch it heal")
    kill = actions.add_parser("kill-node", help="SIGKILL one node (its sandboxes die with it)")
    kill.add_argument("node")
    kill_az = actions.add_parser("kill-az", help="SIGKILL every node of one availability zone")
    kill_az.add_argument("az")
    pause = actions.add_parser("pause-node", help="SIGSTOP a node for a while, then SIGCONT it")
    pause.add_argument("node")
    pause.add_argument("--for", dest="seconds", type=float, default=5.0, help="seconds to keep it frozen (5)")
    restart = actions.add_parser("restart-node", help="start a killed or stopped node again and wait for it")
    restart.add_argument("node")
    for sp, func in ((kill, cmd_chaos_kill), (kill_az, cmd_chaos_kill_az), (pause, cmd_chaos_pause),
                     (restart, cmd_chaos_restart)):
        add_dir(sp)
        sp.add_argument("--settle-s", type=float, default=2.0,
                        help="how long to wait before showing the region's state (2)")
        sp.set_defaults(func=func)


def cmd_chaos_kill(args: argparse.Namespace) -> int:
    region = region_from(args)
    _print_killed(args.node, region.kill_node(args.node))
    _after(region, args.settle_s)
    return 0


def cmd_chaos_kill_az(args: argparse.Namespace) -> int:
    region = region_from(args)
    for node_id, pid in region.kill_az(args.az).items():
        _print_killed(node_id, pid)
    _after(region, args.settle_s)
    return 0


def cmd_chaos_pause(args: argparse.Namespace) -> int:
    region = region_from(args)
    pid = region.pause_node(args.node)
    if pid is None:
        print(f"{args.node} is not running")
        return 1
    print(f"paused {args.node} (pid {pid}) with SIGSTOP for {args.seconds:.0f}s", flush=True)
    try:
        time.sleep(min(args.seconds, 1.5))
        print_table(region.status())
        time.sleep(max(0.0, args.seconds - 1.5))
    finally:
        region.resume_node(args.node)
    print(f"resumed {args.node} with SIGCONT")
    _after(region, args.settle_s)
    return 0


def cmd_chaos_restart(args: argparse.Namespace) -> int:
    region = region_from(args)
    pid = region.start_node(args.node)
    print(f"started {args.node} (pid {pid}); waiting for it to be healthy", flush=True)
    region.wait_healthy(60, nodes=[args.node])
    _after(region, 0)
    return 0


def _print_killed(node_id: str, pid: int | None) -> None:
    print(f"killed {node_id} (pid {pid}) with SIGKILL" if pid else f"{node_id} was not running")


def _after(region, seconds: float) -> None:
    print(f"waiting {seconds:.0f}s, then the region's state:", flush=True)
    time.sleep(seconds)
    print_table(region.status())

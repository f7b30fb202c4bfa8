"""`flint events ...`: async invokes, where each event is, the dead-letter queue."""

from __future__ import annotations

import argparse
import json
import time

from flint.cli.common import Commands, add_group, add_region_and_key, client_from


def add_parser(commands: Commands) -> None:
    _, actions = add_group(commands, "events", "async invokes: where each event is, the dead-letter queue")
    ls = actions.add_parser("list", help="recent events and how many are in each state")
    ls.add_argument("--state", choices=["queued", "inflight", "done", "dlq"])
    ls.add_argument("--limit", type=int, default=20)
    ls.set_defaults(func=cmd_events_list)
    show = actions.add_parser("show", help="one event: state, tries, last error")
    show.add_argument("event_id")
    show.set_defaults(func=cmd_events_show)
    dlq = actions.add_parser("dlq", help="events that ran out of retries or age, with their errors")
    dlq.add_argument("--limit", type=int, default=50)
    dlq.set_defaults(func=cmd_events_dlq)
    redrive = actions.add_parser("redrive", help="send dead-lettered events back to be tried again")
    redrive.add_argument("event_ids", nargs="*", help="the events to redrive (default: none; see --all)")
    redrive.add_argument("--all", action="store_true", help="every dead-lettered event")
    redrive.set_defaults(func=cmd_events_redrive)
    for sp in (ls, show, dlq, redrive):
        add_region_and_key(sp, key_help="a tenant's .key_secret")


def cmd_events_list(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        out = client.list_events(args.state, args.limit)
    counts = out["counts"]
    print("  ".join(f"{k}: {v}" for k, v in counts.items()))
    for e in out["events"]:
        print(_event_line(e))
    return 0


def cmd_events_show(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        print(json.dumps(client.get_event(args.event_id), indent=2))
    return 0


def cmd_events_dlq(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        out = client.list_events("dlq", args.limit)
    if not out["events"]:
        print("the dead-letter queue is empty")
    for e in out["events"]:
        error = e.get("last_error") or {}
        print(f"{_event_line(e)}\n    {error.get('errorType', '?')}: {error.get('errorMessage', '')}"[:400])
    return 0


def cmd_events_redrive(args: argparse.Namespace) -> int:
    if not args.event_ids and not args.all:
        raise ValueError("name the events to redrive, or say --all")
    with client_from(args) as client:
        n = client.redrive_events(None if args.all else args.event_ids)
    print(f"{n} event(s) sent back to the queue with fresh retries")
    return 0


def _event_line(e: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e["accepted_at"]))
    return (f"{e['event_id']}  {e['state']:<8} {e['function']:<20} accepted {when}  tries {e['deliveries']}  "
            f"function errors {e['attempts']}")

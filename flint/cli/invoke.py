"""`flint invoke`: invoke a function and print its result."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flint.cli.common import EXIT_FUNCTION_ERROR, Commands, add_region_and_key, client_from


def add_parser(commands: Commands) -> None:
    inv = commands.add_parser("invoke", help="invoke a function and print its result")
    inv.add_argument("name", help="function name, optionally NAME:VERSION or NAME:ALIAS")
    inv.add_argument("outfile", nargs="?", type=Path, help="write the result here instead of stdout")
    inv.add_argument("--payload", default=None, help="JSON event, file://PATH to read it from a file, or - for stdin")
    inv.add_argument("--type", dest="invocation_type", default="RequestResponse",
                     choices=["RequestResponse", "Event", "DryRun"],
                     help="RequestResponse (default): wait for the result; Event: queue it, 202 at once; "
                          "DryRun: check it could run")
    inv.add_argument("--log-tail", action="store_true", help="print the last 4 KB of the function's log to stderr")
    inv.add_argument("--read-timeout-s", type=float, default=915.0,
                     help="how long to wait for the result (default 915: a function may run up to 900 s). A sync "
                          "invoke that may have started is never retried, so it runs at most once")
    add_region_and_key(inv)
    inv.set_defaults(func=cmd_invoke)


def cmd_invoke(args: argparse.Namespace) -> int:
    payload: bytes | None = None
    if args.payload == "-":
        payload = sys.stdin.buffer.read()
    elif args.payload is not None and args.payload.startswith("file://"):
        payload = Path(args.payload[len("file://"):]).read_bytes()
    elif args.payload is not None:
        payload = args.payload.encode()
    if payload:
        try:
            json.loads(payload)
        except ValueError as exc:
            raise ValueError(f"--payload is not valid JSON ({exc}); quote it, e.g. --payload '{{\"k\": 1}}'") from None
    name, _, qualifier = args.name.partition(":")
    with client_from(args) as client:
        result = client.invoke(
            name, payload, qualifier=qualifier or None, invocation_type=args.invocation_type, log_tail=args.log_tail,
            timeout_s=args.read_timeout_s,
        )
    status = f"StatusCode: {result.status_code}  RequestId: {result.request_id}"
    if result.executed_version:
        status += f"  ExecutedVersion: {result.executed_version}"
    if result.function_error:
        status += f"  FunctionError: {result.function_error}"
    print(status, file=sys.stderr)
    if result.log_tail:
        print(result.log_tail.rstrip("\n"), file=sys.stderr)
    if args.invocation_type == "Event":
        print(f"queued: see it with `flint events show {result.request_id}`", file=sys.stderr)
    if result.payload:
        if args.outfile:
            args.outfile.write_bytes(result.payload)
        else:
            sys.stdout.write(result.payload.decode(errors="replace") + "\n")
    return EXIT_FUNCTION_ERROR if result.function_error else 0

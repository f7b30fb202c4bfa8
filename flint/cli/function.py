"""`flint function ...`: create, update, publish, get, list, delete functions; reserved concurrency."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flint.cli.common import Commands, add_group, add_region_and_key, client_from


def add_parser(commands: Commands) -> None:
    _, actions = add_group(commands, "function",
                           "create, update, publish, get, list, delete functions; concurrency")
    create = actions.add_parser("create", help="upload code and create a function")
    create.add_argument("name")
    create.add_argument("--code", required=True, type=Path, help="a directory (zipped for you) or a .zip file")
    create.add_argument("--handler", default="bootstrap",
                        help="module.function for python3, e.g. handler.handle (required there)")
    create.add_argument("--memory-mb", type=int, default=128, help="128 to 10240 (default 128)")
    create.add_argument("--timeout-s", type=float, default=3.0, help="up to 900 (default 3)")
    create.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable; repeat")
    create.add_argument("--runtime", default="python3", choices=["python3", "provided"],
                        help="python3 (default), or provided: a custom runtime, ./bootstrap in the code")
    create.add_argument("--network", action="store_true",
                        help="give the function's sandboxes a network of their own, NAT to the outside, nothing of the "
                             "cluster (by default they have none)")
    create.set_defaults(func=cmd_function_create)
    get = actions.add_parser("get", help="show a function's configuration")
    get.add_argument("name")
    get.set_defaults(func=cmd_function_get)
    ls = actions.add_parser("list", help="list your functions")
    ls.set_defaults(func=cmd_function_list)
    rm = actions.add_parser("delete", help="delete a function")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_function_delete)
    upcode = actions.add_parser("update-code", help="replace a function's code ($LATEST)")
    upcode.add_argument("name")
    upcode.add_argument("--code", required=True, type=Path, help="a directory or a .zip file")
    upcode.set_defaults(func=cmd_function_update_code)
    upconf = actions.add_parser("update-config", help="change a function's configuration ($LATEST)")
    upconf.add_argument("name")
    upconf.add_argument("--handler")
    upconf.add_argument("--memory-mb", type=int)
    upconf.add_argument("--timeout-s", type=float)
    upconf.add_argument("--env", action="append", metavar="K=V", help="replaces the whole environment; repeat")
    upconf.add_argument("--retries", type=int, choices=[0, 1, 2], help="async: retries after a function error")
    upconf.add_argument("--max-event-age-s", type=int, help="async: an event older than this goes to the DLQ")
    upconf.set_defaults(func=cmd_function_update_config)
    pub = actions.add_parser("publish", help="publish $LATEST as a new immutable version")
    pub.add_argument("name")
    pub.add_argument("--description", default="")
    pub.set_defaults(func=cmd_function_publish)
    vers = actions.add_parser("versions", help="list a function's versions")
    vers.add_argument("name")
    vers.set_defaults(func=cmd_function_versions)
    conc = actions.add_parser("concurrency", help="show, set or remove a function's reserved concurrency")
    conc.add_argument("name")
    group = conc.add_mutually_exclusive_group()
    group.add_argument("--reserved", type=int, metavar="N",
                       help="reserve N executions out of the tenant's limit (0 throttles the function)")
    group.add_argument("--delete", action="store_true", help="remove the reservation (back to the shared pool)")
    conc.set_defaults(func=cmd_function_concurrency)
    for sp in (create, get, ls, rm, upcode, upconf, pub, vers, conc):
        add_region_and_key(sp)


def cmd_function_create(args: argparse.Namespace) -> int:
    env = {}
    for item in args.env:
        if "=" not in item:
            raise ValueError(f"--env {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        env[k] = v
    if not args.code.exists():
        raise FileNotFoundError(f"--code {args.code}: no such file or directory")
    if args.runtime == "python3" and "." not in args.handler:
        raise ValueError("--handler must be module.function for the python3 runtime, e.g. handler.handle")
    with client_from(args) as client:
        config = client.create_function(
            args.name, code=args.code, handler=args.handler, memory_mb=args.memory_mb, timeout_s=args.timeout_s,
            environment=env, runtime=args.runtime, network=args.network,
        )
    print(json.dumps(config, indent=2))
    return 0


def cmd_function_get(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        print(json.dumps(client.get_function(args.name), indent=2))
    return 0


def cmd_function_list(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        functions = client.list_functions()
    if not functions:
        print("no functions yet: flint function create NAME --code DIR --handler module.function")
    for f in functions:
        print(f"{f['name']:<32} {f['handler']:<28} {f['memory_mb']:>6} MB {f['timeout_s']:>7.1f} s  "
              f"{f['code_sha256'][:12]}")
    return 0


def cmd_function_delete(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        client.delete_function(args.name)
    print(f"deleted {args.name}")
    return 0


def cmd_function_update_code(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        config = client.update_function_code(args.name, code=args.code)
    print(f"{args.name}: code {config['code_sha256'][:16]}... ($LATEST); publish it with `flint function publish`")
    return 0


def cmd_function_update_config(args: argparse.Namespace) -> int:
    changes = {k: v for k, v in {
        "handler": args.handler, "memory_mb": args.memory_mb, "timeout_s": args.timeout_s,
        "maximum_retry_attempts": args.retries, "maximum_event_age_s": args.max_event_age_s,
    }.items() if v is not None}
    if args.env is not None:
        changes["environment"] = dict(item.split("=", 1) for item in args.env if "=" in item)
    with client_from(args) as client:
        config = client.update_function_configuration(args.name, **changes)
    print(json.dumps(config, indent=2))
    return 0


def cmd_function_publish(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        config = client.publish_version(args.name, description=args.description)
    print(f"{args.name}: version {config['version']} (code {config['code_sha256'][:12]}...)")
    return 0


def cmd_function_versions(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        versions = client.list_versions(args.name)
    for v in versions:
        print(f"{v['version']:<10} {v['handler']:<28} {v['memory_mb']:>6} MB  code {v['code_sha256'][:12]}  "
              f"{v.get('description', '')}")
    return 0


def cmd_function_concurrency(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        if args.reserved is not None:
            client.put_function_concurrency(args.name, args.reserved)
            print(f"{args.name}: {args.reserved} reserved concurrent executions"
                  + (" (0: the function is throttled)" if args.reserved == 0 else ""))
        elif args.delete:
            client.delete_function_concurrency(args.name)
            print(f"{args.name}: no reservation; it shares the tenant's unreserved pool")
        else:
            info = client.get_function_concurrency(args.name)
            reserved = info.get("reserved_concurrency")
            print(f"{args.name}: " + (f"{reserved} reserved" if reserved is not None else "no reservation (shared pool)")
                  + f"; tenant limit {info.get('tenant_limit')}, at least {info.get('unreserved_min')} stay unreserved")
    return 0

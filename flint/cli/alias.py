"""`flint alias ...`: names pointing at versions, with an optional weighted canary."""

from __future__ import annotations

import argparse

from flint.cli.common import Commands, add_group, add_region_and_key, client_from


def add_parser(commands: Commands) -> None:
    _, actions = add_group(commands, "alias", "names pointing at versions, with an optional weighted canary")
    create = actions.add_parser("create", help="point ALIAS of NAME at a version")
    update = actions.add_parser("update", help="repoint an alias, or change its canary")
    for sp in (create, update):
        sp.add_argument("name")
        sp.add_argument("alias")
        sp.add_argument("--version", required=True, help="a published version number, or $LATEST")
        sp.add_argument("--additional-version", help="a second version for a canary")
        sp.add_argument("--weight", type=float, default=0.0, help="share of invokes (0 to 1) for the canary")
    create.set_defaults(func=cmd_alias_put, create=True)
    update.set_defaults(func=cmd_alias_put, create=False)
    delete = actions.add_parser("delete", help="delete an alias")
    delete.add_argument("name")
    delete.add_argument("alias")
    delete.set_defaults(func=cmd_alias_delete)
    ls = actions.add_parser("list", help="a function's aliases")
    ls.add_argument("name")
    ls.set_defaults(func=cmd_alias_list)
    for sp in (create, update, delete, ls):
        add_region_and_key(sp, key_help="a tenant's .key_secret")


def cmd_alias_put(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        put = client.create_alias if args.create else client.update_alias
        alias = put(args.name, args.alias, args.version, additional_version=args.additional_version,
                    weight=args.weight)
    print(_alias_line(args.name, alias))
    return 0


def cmd_alias_delete(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        client.delete_alias(args.name, args.alias)
    print(f"deleted {args.name}:{args.alias}")
    return 0


def cmd_alias_list(args: argparse.Namespace) -> int:
    with client_from(args) as client:
        for alias in client.list_aliases(args.name):
            print(_alias_line(args.name, alias))
    return 0


def _alias_line(name: str, alias: dict) -> str:
    line = f"{name}:{alias['name']} -> version {alias['version']}"
    if alias.get("additional_version"):
        line += f" ({alias['weight']:.0%} to version {alias['additional_version']})"
    return line

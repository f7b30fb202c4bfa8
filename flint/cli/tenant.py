"""`flint tenant ...`: operator commands for tenants, their keys and limits (with the operator key)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flint.cli.common import REGION_HELP, Commands, add_group, client_from
from flint.client import DEFAULT_REGION_DIR


def add_parser(commands: Commands) -> None:
    _, actions = add_group(commands, "tenant", "operator: tenants, their keys and limits (uses the operator key)")
    create = actions.add_parser("create", help="make a tenant and its key pair; the secret goes to a file for them")
    create.add_argument("tenant")
    create.add_argument("--out", type=Path, help="where to write the secret (default: REGION/tenants/T.key_secret)")
    create.set_defaults(func=cmd_tenant_create)
    _, key_actions = add_group(actions, "keys", "add or revoke a tenant's keys")
    add = key_actions.add_parser("add", help="a further key pair for the tenant (for rotation)")
    add.add_argument("tenant")
    add.add_argument("--out", type=Path, help="where to write the secret")
    add.set_defaults(func=cmd_tenant_key_add)
    revoke = key_actions.add_parser("revoke",
                                    help="revoke a key: refused on new connections at once, open ones within ~1s")
    revoke.add_argument("tenant")
    revoke.add_argument("key", help="the public key (40 characters), or a .key / .key_secret file")
    revoke.set_defaults(func=cmd_tenant_key_revoke)
    ls = actions.add_parser("list", help="tenants and their active keys")
    ls.set_defaults(func=cmd_tenant_list)
    limit = actions.add_parser("limit", help="show a tenant's concurrency limit and use, or set it (at once)")
    limit.add_argument("tenant")
    limit.add_argument("limit", type=int, nargs="?", help="the new limit (omit to show the current one)")
    limit.set_defaults(func=cmd_tenant_limit)
    network = actions.add_parser(
        "network", help="let a tenant's functions have network access (--allow) or not (--deny: taken away from all "
                        "of them at once); without it, --network is refused")
    network.add_argument("tenant")
    choice = network.add_mutually_exclusive_group(required=True)
    choice.add_argument("--allow", action="store_true", help="its functions may be created with --network")
    choice.add_argument("--deny", action="store_true", help="no function of it has network access")
    network.set_defaults(func=cmd_tenant_network)
    for sp in (create, add, revoke, ls, limit, network):
        sp.add_argument("--region", type=Path, default=None, help=REGION_HELP)
        sp.add_argument("--operator-key", type=Path, default=None,
                        help="an operator .key_secret (default: the region's)")


def _secret_path(args: argparse.Namespace, tenant: str) -> Path:
    if args.out:
        return args.out
    region = Path(args.region or DEFAULT_REGION_DIR)
    path = region / "tenants" / f"{tenant}.key_secret"
    n = 2
    while path.exists():
        path = region / "tenants" / f"{tenant}-{n}.key_secret"
        n += 1
    return path


def _new_key(args: argparse.Namespace, tenant: str):
    """A key pair made here; only its public half goes to the cluster."""
    from wire.keys import KeyPair

    key = KeyPair.generate()
    path = _secret_path(args, tenant)
    secret = key.save(path.parent, path.name.removesuffix(".key_secret"))
    return key, secret


def cmd_tenant_create(args: argparse.Namespace) -> int:
    key, secret = _new_key(args, args.tenant)
    with client_from(args, operator=True) as client:
        client.create_tenant(args.tenant, key.public)
    print(f"tenant {args.tenant} created; its secret key is in {secret} (mode 0600) - hand it over, keep no copy")
    print(f"the tenant uses it with: flint function list --key {secret}")
    return 0


def cmd_tenant_key_add(args: argparse.Namespace) -> int:
    key, secret = _new_key(args, args.tenant)
    with client_from(args, operator=True) as client:
        client.add_tenant_key(args.tenant, key.public)
    print(f"a new key for {args.tenant} is in {secret}; public key {key.public.decode()}")
    return 0


def cmd_tenant_key_revoke(args: argparse.Namespace) -> int:
    from wire.keys import KeyPair

    public = KeyPair.load(args.key).public.decode() if Path(args.key).exists() else args.key
    with client_from(args, operator=True) as client:
        client.revoke_tenant_key(args.tenant, public)
    print(f"revoked {public[:8]}... of {args.tenant}: refused on new connections now, on open ones within ~1s")
    return 0


def cmd_tenant_list(args: argparse.Namespace) -> int:
    with client_from(args, operator=True) as client:
        tenants = client.list_tenants()
    for name, t in sorted(tenants.items()):
        keys = ", ".join(k[:8] + "..." for k in t["keys"]) or "none"
        print(f"{name:<24} active keys: {keys}  (revoked: {t['revoked']})"
              f"{'  network allowed' if t.get('network') else ''}")
    return 0


def cmd_tenant_network(args: argparse.Namespace) -> int:
    with client_from(args, operator=True) as client:
        client.set_tenant_network(args.tenant, allowed=args.allow)
    print(f"tenant {args.tenant}: functions {'may have' if args.allow else 'have no'} network access")
    return 0


def cmd_tenant_limit(args: argparse.Namespace) -> int:
    with client_from(args, operator=True) as client:
        view = client.tenant_limit(args.tenant, args.limit)
    pools = view.get("pools", {})
    in_use = sum(p["in_use"] for p in pools.values())
    reserved = view.get("reserved", {})
    print(f"tenant {args.tenant}: limit {view.get('limit')}, {in_use} executing now, "
          f"{sum(reserved.values())} reserved by {len(reserved)} function(s)")
    return 0

"""The `flint` command: run a node, run a local region, manage functions, invoke them."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from wire.errors import FlintError

EXIT_FUNCTION_ERROR = 1
EXIT_USAGE = 2
EXIT_SERVICE_ERROR = 3


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args) or 0
    except FlintError as err:
        print(f"error: {err}", file=sys.stderr)
        hint = _hint(err)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return EXIT_SERVICE_ERROR
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        from nodes.config import ConfigError
        from nodes.local import RegionError

        if isinstance(err, (RegionError, ConfigError)):
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
        raise


def build_parser() -> argparse.ArgumentParser:
    from flint.client import DEFAULT_REGION_DIR

    p = argparse.ArgumentParser(
        prog="flint",
        description="Flint: serverless functions on your own hosts. Start with `flint demo`, "
        "or `flint cluster up` and then `flint function create` / `flint invoke`.",
    )
    sub = p.add_subparsers(metavar="COMMAND")

    node = sub.add_parser("node", help="run one host's Flint node (roles from its config)")
    node.add_argument("--config", required=True, help="the node's TOML config (see nodes/config.py for keys)")
    node.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    node.set_defaults(func=cmd_node)

    region_help = f"region directory (default {DEFAULT_REGION_DIR}, or $FLINT_REGION)"

    cluster = sub.add_parser("cluster", help="a local region: every node a process on its own loopback address")
    csub = cluster.add_subparsers(metavar="ACTION")
    up = csub.add_parser("up", help="start a local region, wait until healthy, print its nodes")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--azs", type=int, default=3, help="availability zones; one control replica each (default 3)")
    up.add_argument("--dir", type=Path, default=DEFAULT_REGION_DIR, help=region_help)
    up.add_argument("--base-ip", default="127.77.0.1", help="first node's loopback address (default 127.77.0.1)")
    up.add_argument("--keep-alive-s", type=float, help="idle sandbox keep-alive in seconds (default 600)")
    up.add_argument("--timeout-s", type=float, default=90.0, help="how long to wait for health (default 90)")
    up.add_argument("--layout", choices=["combined", "dedicated"], default="combined",
                    help="combined: control nodes also run functions; dedicated: they only run control")
    up.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="a node setting for every node, as in node.toml's [settings] (repeatable), e.g. "
                         "--set worker_memory_mb=4096 --set lease_block_mb=1024")
    up.set_defaults(func=cmd_cluster_up)
    st = csub.add_parser("status", help="nodes, AZs, roles, health, Raft roles (L=leader, F=follower)")
    st.add_argument("--dir", type=Path, default=DEFAULT_REGION_DIR, help=region_help)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_cluster_status)
    down = csub.add_parser("down", help="stop every node of the local region (SIGTERM, then SIGKILL)")
    down.add_argument("--dir", type=Path, default=DEFAULT_REGION_DIR, help=region_help)
    down.add_argument("--purge", action="store_true", help="also delete the region directory and its data")
    down.set_defaults(func=cmd_cluster_down)
    cluster.set_defaults(func=lambda a: _usage(cluster))

    fn = sub.add_parser("function", help="create, update, publish, get, list, delete functions; concurrency")
    fsub = fn.add_subparsers(metavar="ACTION")
    create = fsub.add_parser("create", help="upload code and create a function")
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
                        help="give the function the host's network (by default its sandbox has none)")
    create.set_defaults(func=cmd_function_create)
    get = fsub.add_parser("get", help="show a function's configuration")
    get.add_argument("name")
    get.set_defaults(func=cmd_function_get)
    ls = fsub.add_parser("list", help="list your functions")
    ls.set_defaults(func=cmd_function_list)
    rm = fsub.add_parser("delete", help="delete a function")
    rm.add_argument("name")
    rm.set_defaults(func=cmd_function_delete)
    upcode = fsub.add_parser("update-code", help="replace a function's code ($LATEST)")
    upcode.add_argument("name")
    upcode.add_argument("--code", required=True, type=Path, help="a directory or a .zip file")
    upcode.set_defaults(func=cmd_function_update_code)
    upconf = fsub.add_parser("update-config", help="change a function's configuration ($LATEST)")
    upconf.add_argument("name")
    upconf.add_argument("--handler")
    upconf.add_argument("--memory-mb", type=int)
    upconf.add_argument("--timeout-s", type=float)
    upconf.add_argument("--env", action="append", metavar="K=V", help="replaces the whole environment; repeat")
    upconf.add_argument("--retries", type=int, choices=[0, 1, 2], help="async: retries after a function error")
    upconf.add_argument("--max-event-age-s", type=int, help="async: an event older than this goes to the DLQ")
    upconf.set_defaults(func=cmd_function_update_config)
    pub = fsub.add_parser("publish", help="publish $LATEST as a new immutable version")
    pub.add_argument("name")
    pub.add_argument("--description", default="")
    pub.set_defaults(func=cmd_function_publish)
    vers = fsub.add_parser("versions", help="list a function's versions")
    vers.add_argument("name")
    vers.set_defaults(func=cmd_function_versions)
    for sp in (create, get, ls, rm, upcode, upconf, pub, vers):
        if not any(a.dest == "region" for a in sp._actions):
            sp.add_argument("--region", type=Path, default=None, help=region_help)
        sp.add_argument("--key", type=Path, default=None, help="a tenant's .key_secret (default: the region's)")
    fn.set_defaults(func=lambda a: _usage(fn))

    alias = sub.add_parser("alias", help="names pointing at versions, with an optional weighted canary")
    asub = alias.add_subparsers(metavar="ACTION")
    acreate = asub.add_parser("create", help="point ALIAS of NAME at a version")
    aupdate = asub.add_parser("update", help="repoint an alias, or change its canary")
    for sp in (acreate, aupdate):
        sp.add_argument("name")
        sp.add_argument("alias")
        sp.add_argument("--version", required=True, help="a published version number, or $LATEST")
        sp.add_argument("--additional-version", help="a second version for a canary")
        sp.add_argument("--weight", type=float, default=0.0, help="share of invokes (0 to 1) for the canary")
    acreate.set_defaults(func=cmd_alias_put, create=True)
    aupdate.set_defaults(func=cmd_alias_put, create=False)
    adel = asub.add_parser("delete", help="delete an alias")
    adel.add_argument("name")
    adel.add_argument("alias")
    adel.set_defaults(func=cmd_alias_delete)
    als = asub.add_parser("list", help="a function's aliases")
    als.add_argument("name")
    als.set_defaults(func=cmd_alias_list)
    for sp in (acreate, aupdate, adel, als):
        sp.add_argument("--region", type=Path, default=None, help=region_help)
        sp.add_argument("--key", type=Path, default=None, help="a tenant's .key_secret")
    alias.set_defaults(func=lambda a: _usage(alias))

    events = sub.add_parser("events", help="async invokes: where each event is, the dead-letter queue")
    esub = events.add_subparsers(metavar="ACTION")
    els = esub.add_parser("list", help="recent events and how many are in each state")
    els.add_argument("--state", choices=["queued", "inflight", "done", "dlq"])
    els.add_argument("--limit", type=int, default=20)
    els.set_defaults(func=cmd_events_list)
    eshow = esub.add_parser("show", help="one event: state, tries, last error")
    eshow.add_argument("event_id")
    eshow.set_defaults(func=cmd_events_show)
    edlq = esub.add_parser("dlq", help="events that ran out of retries or age, with their errors")
    edlq.add_argument("--limit", type=int, default=50)
    edlq.set_defaults(func=cmd_events_dlq)
    eredrive = esub.add_parser("redrive", help="send dead-lettered events back to be tried again")
    eredrive.add_argument("event_ids", nargs="*", help="the events to redrive (default: none; see --all)")
    eredrive.add_argument("--all", action="store_true", help="every dead-lettered event")
    eredrive.set_defaults(func=cmd_events_redrive)
    for sp in (els, eshow, edlq, eredrive):
        sp.add_argument("--region", type=Path, default=None, help=region_help)
        sp.add_argument("--key", type=Path, default=None, help="a tenant's .key_secret")
    events.set_defaults(func=lambda a: _usage(events))

    conc = fsub.add_parser("concurrency", help="show, set or remove a function's reserved concurrency")
    conc.add_argument("name")
    group = conc.add_mutually_exclusive_group()
    group.add_argument("--reserved", type=int, metavar="N",
                       help="reserve N executions out of the tenant's limit (0 throttles the function)")
    group.add_argument("--delete", action="store_true", help="remove the reservation (back to the shared pool)")
    conc.add_argument("--region", type=Path, default=None, help=region_help)
    conc.add_argument("--key", type=Path, default=None, help="a tenant's .key_secret (default: the region's)")
    conc.set_defaults(func=cmd_function_concurrency)

    tenant = sub.add_parser("tenant", help="operator: tenants, their keys and limits (uses the operator key)")
    tsub = tenant.add_subparsers(metavar="ACTION")
    tcreate = tsub.add_parser("create", help="make a tenant and its key pair; the secret goes to a file for them")
    tcreate.add_argument("tenant")
    tcreate.add_argument("--out", type=Path, help="where to write the secret (default: REGION/tenants/T.key_secret)")
    tcreate.set_defaults(func=cmd_tenant_create)
    tkeys = tsub.add_parser("keys", help="add or revoke a tenant's keys")
    ksub2 = tkeys.add_subparsers(metavar="ACTION")
    kadd2 = ksub2.add_parser("add", help="a further key pair for the tenant (for rotation)")
    kadd2.add_argument("tenant")
    kadd2.add_argument("--out", type=Path, help="where to write the secret")
    kadd2.set_defaults(func=cmd_tenant_key_add)
    krev = ksub2.add_parser("revoke", help="revoke a key: refused on new connections at once, open ones within ~1s")
    krev.add_argument("tenant")
    krev.add_argument("key", help="the public key (40 characters), or a .key / .key_secret file")
    krev.set_defaults(func=cmd_tenant_key_revoke)
    tkeys.set_defaults(func=lambda a: _usage(tkeys))
    tls = tsub.add_parser("list", help="tenants and their active keys")
    tls.set_defaults(func=cmd_tenant_list)
    tlimit = tsub.add_parser("limit", help="show a tenant's concurrency limit and use, or set it (at once)")
    tlimit.add_argument("tenant")
    tlimit.add_argument("limit", type=int, nargs="?", help="the new limit (omit to show the current one)")
    tlimit.set_defaults(func=cmd_tenant_limit)
    for sp in (tcreate, kadd2, krev, tls, tlimit):
        sp.add_argument("--region", type=Path, default=None, help=region_help)
        sp.add_argument("--operator-key", type=Path, default=None,
                        help="an operator .key_secret (default: the region's)")
    tenant.set_defaults(func=lambda a: _usage(tenant))

    counting = sub.add_parser("counting", help="operator: the counting service's ledger and its replicas")
    ksub = counting.add_subparsers(metavar="ACTION")
    kst = ksub.add_parser("status", help="limits, pools, credits held and in use, leases; replica agreement")
    kst.add_argument("--tenant", default=None)
    kst.add_argument("--json", action="store_true")
    kmem = ksub.add_parser("members", help="the counting replicas, which one leads, which are connected")
    kadd = ksub.add_parser("add", help="start a counting replica on NODE and add it to the group")
    kadd.add_argument("node")
    krm = ksub.add_parser("remove", help="remove NODE's counting replica (leadership is handed over first)")
    krm.add_argument("node")
    for sp, func in ((kst, cmd_counting_status), (kmem, cmd_counting_members), (kadd, cmd_counting_add),
                     (krm, cmd_counting_remove)):
        sp.add_argument("--dir", type=Path, default=DEFAULT_REGION_DIR, help=region_help)
        sp.set_defaults(func=func)
    counting.set_defaults(func=lambda a: _usage(counting))

    chaos = sub.add_parser("chaos", help="break a local region on purpose, and watch it heal")
    xsub = chaos.add_subparsers(metavar="ACTION")
    xkill = xsub.add_parser("kill-node", help="SIGKILL one node (its sandboxes die with it)")
    xkill.add_argument("node")
    xaz = xsub.add_parser("kill-az", help="SIGKILL every node of one availability zone")
    xaz.add_argument("az")
    xpause = xsub.add_parser("pause-node", help="SIGSTOP a node for a while, then SIGCONT it")
    xpause.add_argument("node")
    xpause.add_argument("--for", dest="seconds", type=float, default=5.0, help="seconds to keep it frozen (5)")
    xrestart = xsub.add_parser("restart-node", help="start a killed or stopped node again and wait for it")
    xrestart.add_argument("node")
    for sp, func in ((xkill, cmd_chaos_kill), (xaz, cmd_chaos_kill_az), (xpause, cmd_chaos_pause),
                     (xrestart, cmd_chaos_restart)):
        sp.add_argument("--dir", type=Path, default=DEFAULT_REGION_DIR, help=region_help)
        sp.add_argument("--settle-s", type=float, default=2.0,
                        help="how long to wait before showing the region's state (2)")
        sp.set_defaults(func=func)
    chaos.set_defaults(func=lambda a: _usage(chaos))

    place = sub.add_parser("placement", help="operator: worker hosts, their health and leases")
    psub = place.add_subparsers(metavar="ACTION")
    pst = psub.add_parser("status", help="every host: health, suspect, draining, capacity leased, sandboxes")
    pst.add_argument("--json", action="store_true")
    pdr = psub.add_parser("drain", help="take a host out gracefully: no new sandboxes; existing ones finish")
    pdr.add_argument("node")
    pdr.add_argument("--undo", action="store_true", help="put a drained host back into service")
    for sp, func in ((pst, cmd_placement_status), (pdr, cmd_placement_drain)):
        sp.add_argument("--dir", type=Path, default=DEFAULT_REGION_DIR, help=region_help)
        sp.set_defaults(func=func)
    place.set_defaults(func=lambda a: _usage(place))

    inv = sub.add_parser("invoke", help="invoke a function and print its result")
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
    inv.add_argument("--region", type=Path, default=None, help=region_help)
    inv.add_argument("--key", type=Path, default=None, help="a tenant's .key_secret (default: the region's)")
    inv.set_defaults(func=cmd_invoke)

    demo = sub.add_parser("demo", help="start a 3-AZ local region, deploy examples/hello, invoke it, tear down")
    demo.add_argument("--dir", type=Path, default=None, help="region directory (default: a fresh temporary one)")
    demo.add_argument("--base-ip", default="127.77.0.1", help="first node's loopback address")
    demo.add_argument("--keep", action="store_true", help="leave the region running afterwards")
    demo.set_defaults(func=cmd_demo)
    return p


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_USAGE


# --- node ----------------------------------------------------------------------------------------------------------


def cmd_node(args: argparse.Namespace) -> int:
    from nodes.daemon import main as node_main

    return node_main(args.config, log_level=args.log_level)


# --- cluster -------------------------------------------------------------------------------------------------------


def _settings(pairs: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs as node settings, each VALUE read as TOML and checked as node.toml's would be."""
    import tomllib

    from nodes.config import ConfigError, Settings, _sub

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set keep_alive_s=60")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"--set {pair!r}: {value!r} is not a number or true/false") from None
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
    _wait(region, args.timeout_s)
    region.ensure_tenant()
    print_table(region.status())
    print(f"\ntenant 'default' key: {region.root / 'tenants' / 'default.key_secret'}")
    print(f"try: flint function create hello --code examples/hello --handler handler.handle --region {region.root}")
    return 0


def _wait(region: Any, timeout_s: float) -> None:
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


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from nodes.local import Region

    rows = Region(args.dir).status()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0 if all(r["health"] == "healthy" for r in rows) else 1


def cmd_cluster_down(args: argparse.Namespace) -> int:
    from nodes.local import Region

    region = Region(args.dir)
    result = region.down(remove=args.purge)
    for node_id, clean in result.items():
        print(f"{node_id}: {'stopped' if clean else 'killed (did not stop within 15s)'}")
    if args.purge:
        print(f"removed {region.root}")
    return 0


def print_table(rows: list[dict]) -> None:
    cols = ["node", "az", "address", "roles", "process", "health", "raft", "isolation", "sandboxes"]
    table = [[str(r.get(c) if r.get(c) is not None else "-") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


# --- functions -----------------------------------------------------------------------------------------------------


def _client(args: argparse.Namespace, operator: bool = False):
    from flint.client import Client

    if operator:
        return Client.from_region(getattr(args, "region", None), key_file=getattr(args, "operator_key", None),
                                  operator=True)
    return Client.from_region(getattr(args, "region", None), key_file=getattr(args, "key", None))


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
    with _client(args) as client:
        config = client.create_function(
            args.name, code=args.code, handler=args.handler, memory_mb=args.memory_mb, timeout_s=args.timeout_s,
            environment=env, runtime=args.runtime, network=args.network,
        )
    print(json.dumps(config, indent=2))
    return 0


def cmd_function_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(client.get_function(args.name), indent=2))
    return 0


def cmd_function_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        functions = client.list_functions()
    if not functions:
        print("no functions yet: flint function create NAME --code DIR --handler module.function")
    for f in functions:
        print(f"{f['name']:<32} {f['handler']:<28} {f['memory_mb']:>6} MB {f['timeout_s']:>7.1f} s  "
              f"{f['code_sha256'][:12]}")
    return 0


def cmd_function_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_function(args.name)
    print(f"deleted {args.name}")
    return 0


def cmd_function_concurrency(args: argparse.Namespace) -> int:
    with _client(args) as client:
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


# --- operator: limits and the counting group ---------------------------------------------------------------------


def _region(args: argparse.Namespace):
    from nodes.local import Region

    return Region(args.dir)


def _secret_path(args: argparse.Namespace, tenant: str) -> Path:
    from flint.client import DEFAULT_REGION_DIR

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
    with _client(args, operator=True) as client:
        client.create_tenant(args.tenant, key.public)
    print(f"tenant {args.tenant} created; its secret key is in {secret} (mode 0600) - hand it over, keep no copy")
    print(f"the tenant uses it with: flint function list --key {secret}")
    return 0


def cmd_tenant_key_add(args: argparse.Namespace) -> int:
    key, secret = _new_key(args, args.tenant)
    with _client(args, operator=True) as client:
        client.add_tenant_key(args.tenant, key.public)
    print(f"a new key for {args.tenant} is in {secret}; public key {key.public.decode()}")
    return 0


def cmd_tenant_key_revoke(args: argparse.Namespace) -> int:
    from wire.keys import KeyPair

    public = KeyPair.load(args.key).public.decode() if Path(args.key).exists() else args.key
    with _client(args, operator=True) as client:
        client.revoke_tenant_key(args.tenant, public)
    print(f"revoked {public[:8]}... of {args.tenant}: refused on new connections now, on open ones within ~1s")
    return 0


def cmd_tenant_list(args: argparse.Namespace) -> int:
    with _client(args, operator=True) as client:
        tenants = client.list_tenants()
    for name, t in sorted(tenants.items()):
        keys = ", ".join(k[:8] + "..." for k in t["keys"]) or "none"
        print(f"{name:<24} active keys: {keys}  (revoked: {t['revoked']})")
    return 0


def cmd_tenant_limit(args: argparse.Namespace) -> int:
    with _client(args, operator=True) as client:
        view = client.tenant_limit(args.tenant, args.limit)
    pools = view.get("pools", {})
    in_use = sum(p["in_use"] for p in pools.values())
    reserved = view.get("reserved", {})
    print(f"tenant {args.tenant}: limit {view.get('limit')}, {in_use} executing now, "
          f"{sum(reserved.values())} reserved by {len(reserved)} function(s)")
    return 0


def cmd_function_update_code(args: argparse.Namespace) -> int:
    with _client(args) as client:
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
    with _client(args) as client:
        config = client.update_function_configuration(args.name, **changes)
    print(json.dumps(config, indent=2))
    return 0


def cmd_function_publish(args: argparse.Namespace) -> int:
    with _client(args) as client:
        config = client.publish_version(args.name, description=args.description)
    print(f"{args.name}: version {config['version']} (code {config['code_sha256'][:12]}...)")
    return 0


def cmd_function_versions(args: argparse.Namespace) -> int:
    with _client(args) as client:
        versions = client.list_versions(args.name)
    for v in versions:
        print(f"{v['version']:<10} {v['handler']:<28} {v['memory_mb']:>6} MB  code {v['code_sha256'][:12]}  "
              f"{v.get('description', '')}")
    return 0


def cmd_alias_put(args: argparse.Namespace) -> int:
    with _client(args) as client:
        put = client.create_alias if args.create else client.update_alias
        alias = put(args.name, args.alias, args.version, additional_version=args.additional_version,
                    weight=args.weight)
    print(_alias_line(args.name, alias))
    return 0


def cmd_alias_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_alias(args.name, args.alias)
    print(f"deleted {args.name}:{args.alias}")
    return 0


def cmd_alias_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for alias in client.list_aliases(args.name):
            print(_alias_line(args.name, alias))
    return 0


def _alias_line(name: str, alias: dict) -> str:
    line = f"{name}:{alias['name']} -> version {alias['version']}"
    if alias.get("additional_version"):
        line += f" ({alias['weight']:.0%} to version {alias['additional_version']})"
    return line


def cmd_events_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        out = client.list_events(args.state, args.limit)
    counts = out["counts"]
    print("  ".join(f"{k}: {v}" for k, v in counts.items()))
    for e in out["events"]:
        print(_event_line(e))
    return 0


def cmd_events_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(json.dumps(client.get_event(args.event_id), indent=2))
    return 0


def cmd_events_dlq(args: argparse.Namespace) -> int:
    with _client(args) as client:
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
    with _client(args) as client:
        n = client.redrive_events(None if args.all else args.event_ids)
    print(f"{n} event(s) sent back to the queue with fresh retries")
    return 0


def _event_line(e: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e["accepted_at"]))
    return (f"{e['event_id']}  {e['state']:<8} {e['function']:<20} accepted {when}  tries {e['deliveries']}  "
            f"function errors {e['attempts']}")


def cmd_counting_status(args: argparse.Namespace) -> int:
    from wire import messages as m

    region = _region(args)
    status = region.call("counting", m.CountingStatus(tenant=args.tenant))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    for tenant, view in status["tenants"].items():
        print(f"tenant {tenant}: limit {view['limit']} (unreserved min {view['unreserved_min']})")
        for pool, p in view["pools"].items():
            print(f"  pool {pool:<24} capacity {p['capacity']:>6}  held {p['held']:>6}  in use {p['in_use']:>6}  "
                  f"leases {p['leases']}")
    leases = status.get("lease_details", [])
    if leases:
        print(f"\n{'LEASE':<28} {'TENANT':<12} {'POOL':<14} {'CREDITS':>7} {'IN USE':>6} {'TARGET':>6} {'EXPIRES':>8}")
        for lease in leases:
            target = "-" if lease["target"] is None else str(lease["target"])
            print(f"{lease['lease_id']:<28} {lease['tenant']:<12} {lease['pool']:<14} {lease['credits']:>7} "
                  f"{lease['in_use']:>6} {target:>6} {lease['expires_in_s']:>7.1f}s")
    raft = status["raft"]
    print(f"\nraft: replica {raft['self']} is {raft['state']}, leader {raft['leader'] or 'unknown'}, "
          f"commit {raft['commit_idx']}, ledger digest {status['digest']}")
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


def cmd_counting_members(args: argparse.Namespace) -> int:
    _print_members(_region(args).counting_members())
    return 0


def cmd_counting_add(args: argparse.Namespace) -> int:
    print(f"adding a counting replica on {args.node}...", flush=True)
    _print_members(_region(args).counting_add(args.node))
    return 0


def cmd_counting_remove(args: argparse.Namespace) -> int:
    print(f"removing {args.node}'s counting replica...", flush=True)
    _print_members(_region(args).counting_remove(args.node))
    return 0


# --- chaos and placement -----------------------------------------------------------------------------------------


def _after(region, seconds: float) -> None:
    print(f"waiting {seconds:.0f}s, then the region's state:", flush=True)
    time.sleep(seconds)
    print_table(region.status())


def cmd_chaos_kill(args: argparse.Namespace) -> int:
    region = _region(args)
    pid = region.kill_node(args.node)
    print(f"killed {args.node} (pid {pid}) with SIGKILL" if pid else f"{args.node} was not running")
    _after(region, args.settle_s)
    return 0


def cmd_chaos_kill_az(args: argparse.Namespace) -> int:
    region = _region(args)
    for node_id, pid in region.kill_az(args.az).items():
        print(f"killed {node_id} (pid {pid}) with SIGKILL" if pid else f"{node_id} was not running")
    _after(region, args.settle_s)
    return 0


def cmd_chaos_pause(args: argparse.Namespace) -> int:
    region = _region(args)
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
    region = _region(args)
    pid = region.start_node(args.node)
    print(f"started {args.node} (pid {pid}); waiting for it to be healthy", flush=True)
    region.wait_healthy(60, nodes=[args.node])
    _after(region, 0)
    return 0


def cmd_placement_status(args: argparse.Namespace) -> int:
    from wire import messages as m

    region = _region(args)
    nodes = region.call("placement", m.ListNodes())
    leases = region.call("placement", m.ListLeases())["leases"]
    if args.json:
        print(json.dumps({"nodes": nodes["nodes"], "leases": leases}, indent=2))
        return 0
    print(f"{'NODE':<6} {'AZ':<5} {'HEALTH':<10} {'LEASABLE':<8} {'LEASED':>14} {'SANDBOXES':>9}  NOTE")
    for n in nodes["nodes"]:
        if "worker" not in n["roles"]:
            continue
        health = "healthy" if n["healthy"] else ("suspect" if n["suspect"] else "unhealthy")
        note = ", ".join(filter(None, ["draining" if n["draining"] else "",
                                       f"held down {n['held_down_s']}s" if n["held_down_s"] else ""]))
        print(f"{n['node_id']:<6} {n['az']:<5} {health:<10} {'yes' if n['leasable'] else 'no':<8} "
              f"{n['leased_mb']:>6}/{n['capacity_mb']:<7} {n['sandboxes']:>9}  {note}")
    print(f"\n{len(leases)} lease(s); {nodes['free_capacity_mb']} MB free to lease at once")
    short = nodes.get("headroom", {}).get("short_azs")
    if short:
        print(f"short of capacity in {', '.join(short)}: no worker there has {nodes['headroom']['reserve_mb']} MB "
              "free; managers hand back empty leases there within seconds. Add worker hosts to those AZs.")
    return 0


def cmd_placement_drain(args: argparse.Namespace) -> int:
    from wire import messages as m

    region = _region(args)
    out = region.call("placement", m.Drain(node_id=args.node, draining=not args.undo))
    if args.undo:
        print(f"{args.node} is back in service")
    else:
        print(f"{args.node} is draining: no new sandboxes; {len(out['leases'])} lease(s) on it run down as "
              "their sandboxes go idle")
    return 0


# --- invoke --------------------------------------------------------------------------------------------------------


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
    with _client(args) as client:
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


# --- demo ----------------------------------------------------------------------------------------------------------


def example_dir(name: str) -> Path:
    candidates = [Path(__file__).resolve().parent.parent / "examples" / name, Path.cwd() / "examples" / name]
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"examples/{name} not found; run `flint demo` from a checkout of the Flint repository")


def cmd_demo(args: argparse.Namespace) -> int:
    from flint.client import Client
    from nodes.local import Region

    code = example_dir("hello")
    root = args.dir or Path(tempfile.mkdtemp(prefix="flint-demo-"))
    print(f"1. starting a local region: 3 nodes, 3 AZs, one Raft replica per AZ ({root})", flush=True)
    region = Region.create(root, nodes=3, azs=3, base_ip=args.base_ip)
    ok = False
    try:
        region.start()
        _wait(region, 90)
        region.ensure_tenant()
        print_table(region.status())
        client = Client.from_region(root)
        try:
            print(f"\n2. creating function 'hello' from {code}", flush=True)
            config = client.create_function("hello", code=code, handler="handler.handle")
            print(f"   code sha256 {config['code_sha256'][:16]}..., {config['memory_mb']} MB, "
                  f"timeout {config['timeout_s']} s")
            print("\n3. invoking it", flush=True)
            for i, who in enumerate(["Ada", "Grace", "Barbara"]):
                began = time.perf_counter()
                result = client.invoke("hello", {"name": who}, log_tail=(i == 0))
                ms = (time.perf_counter() - began) * 1000
                body = result.json()
                kind = "cold" if result.cold_start else "warm"
                print(f"   {kind} invoke {ms:7.1f} ms -> {json.dumps(body)}")
                if result.function_error:
                    raise RuntimeError(f"the example function failed: {result.payload.decode()}")
        finally:
            client.close()
        ok = True
        print("\n4. the sandbox stayed warm: 'invocations' grew across invokes")
    finally:
        if args.keep:
            print(f"\nregion left running; stop it with: flint cluster down --dir {root}")
        else:
            print("\n5. tearing the region down", flush=True)
            region.down(remove=args.dir is None)
    print("demo finished" if ok else "demo failed", flush=True)
    return 0 if ok else 1


def _hint(err: FlintError) -> str | None:
    name = err.type_name
    if name == "ResourceNotFoundException":
        return "list your functions with `flint function list`"
    if name == "TooManyRequestsException":
        return "the concurrency limit is in use; retry with backoff"
    if err.reason in ("NotSent", "Timeout", "ConnectionLost"):
        return "is the region up? check `flint cluster status`"
    return None


if __name__ == "__main__":
    sys.exit(main())

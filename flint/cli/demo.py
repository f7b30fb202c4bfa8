"""`flint demo`: start a 3-AZ local region, deploy examples/hello, invoke it, tear it down."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from flint.cli.common import Commands, print_table, wait_healthy
from flint.client import Client


def add_parser(commands: Commands) -> None:
    demo = commands.add_parser("demo", help="start a 3-AZ local region, deploy examples/hello, invoke it, tear down")
    demo.add_argument("--dir", type=Path, default=None, help="region directory (default: a fresh temporary one)")
    demo.add_argument("--base-ip", default="127.77.0.1", help="first node's loopback address")
    demo.add_argument("--keep", action="store_true", help="leave the region running afterwards")
    demo.set_defaults(func=cmd_demo)


def example_dir(name: str) -> Path:
    # flint/cli/demo.py: the checkout is three levels up.
    candidates = [Path(__file__).resolve().parents[2] / "examples" / name, Path.cwd() / "examples" / name]
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"examples/{name} not found; run `flint demo` from a checkout of the Flint repository")


def cmd_demo(args: argparse.Namespace) -> int:
    from nodes.local import Region

    code = example_dir("hello")
    root = args.dir or Path(tempfile.mkdtemp(prefix="flint-demo-"))
    print(f"1. starting a local region: 3 nodes, 3 AZs, one Raft replica per AZ ({root})", flush=True)
    region = Region.create(root, nodes=3, azs=3, base_ip=args.base_ip)
    ok = False
    try:
        region.start()
        wait_healthy(region, 90)
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

"""The example function `flint demo` deploys: greets, and counts the invokes its warm sandbox has served."""

import os

invocations = 0  # module state lives as long as the sandbox: it grows while the sandbox is reused warm


def handle(event, context):
    global invocations
    invocations += 1
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    print(f"greeting {name}")
    return {
        "message": f"Hello, {name}!",
        "invocations": invocations,
        "sandbox": os.environ.get("FLINT_SANDBOX_ID", ""),
        "request_id": context.aws_request_id,
        "remaining_ms": context.get_remaining_time_in_millis(),
    }

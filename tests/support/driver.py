"""A driver process on another cluster than pytest's: runs the Python it is sent, answers in JSON.

pytest's own process is joined to the session's cluster, and a process joins
one Ray cluster only, so the several-node tests drive theirs through this:
each line on stdin is a JSON string of code; the code leaves its answer in
`out`; one JSON line comes back, {"out": ...} or {"error": "Type: message"}.

    python -m tests.support.driver ADDRESS
"""
from __future__ import annotations

import json
import sys


def main() -> None:
    import byzer_magic
    from byzer_magic.serving import chat, deploy
    from byzer_magic.serving.cluster import connect
    from byzer_magic.spec.deploy_spec import parse_args

    connect(sys.argv[1], embedded_ok=False)
    space = {"chat": chat, "deploy": deploy, "parse_args": parse_args, "byzer_magic": byzer_magic}
    print(json.dumps({"out": "connected"}), flush=True)
    for line in sys.stdin:
        space["out"] = None
        try:
            exec(json.loads(line), space)
            answer = {"out": space["out"]}
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the test, as text
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer, default=repr), flush=True)


if __name__ == "__main__":
    main()

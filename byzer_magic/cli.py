"""`byzer-magic`: the magics' operations from a shell, with the same spec parser.

A shell command ends with its process, so it never starts an embedded Ray:
it needs a running cluster (`ray start --head`, RAY_ADDRESS or --ray_address).
Exit status: 0 done, 2 bad input, 1 the cluster or the provider failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from .errors import ByzerError, SpecError

COMMANDS = {
    "deploy": "deploy a model: the flags of `byzerllm deploy` (see `byzer-magic deploy --help`)",
    "undeploy": "stop a deployment: byzer-magic undeploy NAME",
    "list": "list the deployments on the cluster",
    "stat": "show one deployment: byzer-magic stat NAME",
    "scale": "change the number of workers: byzer-magic scale NAME N",
    "chat": "ask a deployment: byzer-magic chat NAME PROMPT...",
    "embed": "embed texts, one JSON vector per line: byzer-magic embed NAME TEXT...",
    "serve": "one OpenAI-compatible endpoint for every deployment (see `byzer-magic serve --help`)",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="byzer-magic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=text)
        if name in ("deploy", "serve"):
            continue
        cmd.add_argument("--ray_address", help="Ray cluster address (default: RAY_ADDRESS or the running one)")
        if name != "list":
            cmd.add_argument("name")
        if name == "scale":
            cmd.add_argument("workers", type=int)
        if name == "chat":
            cmd.add_argument("prompt", nargs="+")
            cmd.add_argument("--system")
            cmd.add_argument("--temperature", type=float)
            cmd.add_argument("--max_tokens", type=int)
        if name == "embed":
            cmd.add_argument("texts", nargs="+", metavar="TEXT", help="each argument is one text")
    return parser


def _deploy_help() -> str:
    from .flags import build_parser
    from .spec import settings_help

    return build_parser().format_help() + "\n" + settings_help()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["deploy"], ["serve"]):
        args = argparse.Namespace(command=argv[0], flags=argv[1:])
    else:
        args = _parser().parse_args(argv)
    try:
        return _run(args)
    except SpecError as exc:
        print(f"byzer-magic {args.command}: {exc}", file=sys.stderr)
        return 2
    except ByzerError as exc:
        print(f"byzer-magic {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    from . import chat as chat_api
    from . import deploy as deploy_api
    from .backends.base import GenParams
    from .cluster import connect
    from .spec import parse_args

    if args.command == "deploy":
        if not args.flags or args.flags[0] in ("-h", "--help"):
            print(_deploy_help())
            return 0
        spec = parse_args(args.flags)
        connect(spec.ray_address, embedded_ok=False)
        started = time.monotonic()
        deploy_api.deploy(spec, on_progress=lambda s: print(s.line(), flush=True))
        print(f"{spec.name} ready in {time.monotonic() - started:.1f} s")
        return 0
    if args.command == "serve":
        return _serve(args.flags)
    connect(args.ray_address, embedded_ok=False)
    if args.command == "list":
        print(deploy_api.list_deployments())
    elif args.command == "stat":
        print(repr(deploy_api.require(args.name, with_metrics=True)))
    elif args.command == "scale":
        print(deploy_api.scale(args.name, args.workers))
    elif args.command == "undeploy":
        deploy_api.undeploy(args.name)
        print(f"{args.name} undeployed")
    elif args.command == "chat":
        gen = GenParams(temperature=args.temperature, max_tokens=args.max_tokens)
        messages = chat_api.messages_for(" ".join(args.prompt), args.system)
        for delta in chat_api.stream(args.name, messages, gen):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        print()
    elif args.command == "embed":
        for vector in chat_api.embed(args.name, args.texts):
            print(json.dumps(vector))
    return 0


def _serve(argv: list[str]) -> int:
    import os

    from . import gateway
    from .cluster import connect
    from .flags import build_serve_parser, read_serve_flags

    if argv[:1] in (["-h"], ["--help"]):
        print(build_serve_parser("byzer-magic serve").format_help())
        return 0
    args = read_serve_flags(argv, os.environ, "byzer-magic serve")
    connect(args.ray_address, embedded_ok=False)
    if args.stop:
        print(gateway.stop())
    else:
        print(gateway.start(args.host, args.port, args.api_key))
    return 0


if __name__ == "__main__":
    sys.exit(main())

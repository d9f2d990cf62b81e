"""`byzer-magic`: the magics' operations from a shell, with the same spec parser.

A shell command ends with its process, so it never starts an embedded Ray:
it needs a running cluster (`ray start --head`, RAY_ADDRESS or --ray_address).
Exit status: 0 done, 2 bad input, 1 the cluster or the provider failed.
Bad input includes what a deploy asks of this machine (a model path that is
not there, a backend whose library is not installed) and a worker count scale
cannot take: all are refused before the cluster is asked anything. Each
command connects through the core function it calls, with --ray_address.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

from ..errors import ByzerError, DeployError, SpecError
from .wording import for_shell

COMMANDS = {
    "deploy": "deploy a model: the flags of `byzerllm deploy` (see `byzer-magic deploy --help`)",
    "undeploy": "stop a deployment: byzer-magic undeploy NAME",
    "list": "list the deployments on the cluster",
    "stat": "show one deployment: byzer-magic stat NAME",
    "scale": "change the number of workers: byzer-magic scale NAME N, or the autoscaling range: NAME MIN..MAX",
    "chat": "ask a deployment: byzer-magic chat NAME PROMPT... (see `byzer-magic chat --help`)",
    "embed": "embed texts, one JSON vector per line: byzer-magic embed NAME TEXT...",
    "bench": "load a deployment at rising concurrency: byzer-magic bench NAME (see `byzer-magic bench --help`)",
    "history": "show a chat --session as a transcript (kept in files): byzer-magic history S [--clear]",
    "serve": "one OpenAI-compatible endpoint for every deployment (see `byzer-magic serve --help`)",
    "restore": "deploy again what the cluster lost, from the kept flags: byzer-magic restore [NAME...] "
               "[--infer_params KEY=VALUE...]",
}


def _parser(command: str | None) -> argparse.ArgumentParser:
    """Every command's parser; only the command being run gets its options (chat's need pydantic)."""
    parser = argparse.ArgumentParser(prog="byzer-magic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=text)
        if name in ("deploy", "serve", "restore"):
            continue
        if name == "history":
            cmd.add_argument("session", help="the session's name, as given to chat --session")
            cmd.add_argument("--clear", action="store_true", default=None, help="empty the session")
            continue
        cmd.add_argument("--ray_address", help="Ray cluster address (default: RAY_ADDRESS or the running one)")
        if name != "list":
            cmd.add_argument("name")
        if name == "scale":
            cmd.add_argument("workers", help="a count (3), or MIN..MAX for autoscaling (2..6)")
        if name == "chat":
            cmd.add_argument("prompt", nargs="+")
            if command == "chat":
                from ..spec.option_args import add_arguments
                from ..spec.options import ChatOptions

                add_arguments(cmd, ChatOptions, notebook=False)
        if name == "bench" and command == "bench":
            from ..spec.option_args import add_arguments
            from ..spec.options import BenchOptions

            add_arguments(cmd, BenchOptions, notebook=False)
        if name == "embed":
            cmd.add_argument("texts", nargs="+", metavar="TEXT", help="each argument is one text")
    return parser


def _without_iri_grammar() -> None:
    """Keep jsonschema's optional IRI checker out of this process: it is most of `import ray`.

    Ray imports jsonschema, which imports `rfc3987_syntax` if installed
    (JupyterLab's `jupyter-events` brings it), and that builds a grammar on
    import: 3.8 s of `import ray` against 0.85 s without it, measured on the
    2-core CI machine. jsonschema checks formats only when given a format
    checker, which Ray never passes, so a command loses nothing. Only this
    short-lived process is affected, never a kernel or a Ray worker.
    """
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]


def _hide_secrets(argv: list[str]) -> None:
    """Take literal secrets out of this process's command line before anything records it.

    A shell expands `saas.api_key=${KEY}` before the command starts, so the key
    sits in argv: `ps` shows it, and Ray copies sys.argv into its job table
    (`ray list jobs`, the dashboard) for the life of the cluster when a driver
    connects. The parsed flags keep the values; what `ps` and Ray see is ***.
    """
    from ..errors import redact
    from ..spec.flags import secrets_in

    secrets = secrets_in(argv)
    if not secrets:
        return
    sys.argv[1:] = [redact(token, secrets) for token in argv]
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(" ".join(["byzer-magic", *sys.argv[1:]]))


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
        _hide_secrets(list(argv))
    argv = list(argv)
    _without_iri_grammar()
    if argv[:1] in (["deploy"], ["serve"], ["restore"]):
        args = argparse.Namespace(command=argv[0], flags=argv[1:])
    else:
        args = _parser(argv[0] if argv else None).parse_args(argv)
    try:
        return _run(args)
    except SpecError as exc:
        print(f"byzer-magic {args.command}: {for_shell(str(exc))}", file=sys.stderr)
        return 2
    except ByzerError as exc:
        print(f"byzer-magic {args.command}: {for_shell(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _say(result: Any) -> None:
    print(for_shell(str(result)), flush=True)


def _run(args: argparse.Namespace) -> int:
    if args.command == "deploy":
        return _deploy(args.flags)
    if args.command == "serve":
        return _serve(args.flags)
    if args.command == "restore":
        return _restore(args.flags)
    if args.command == "chat":
        return _chat(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "history":
        return _history(args)
    from ..serving import deploy as deploy_api

    where = args.ray_address
    if args.command == "list":
        _say(deploy_api.list_deployments(ray_address=where))
    elif args.command == "stat":
        _say(repr(deploy_api.require(args.name, ray_address=where, with_metrics=True)))
    elif args.command == "scale":
        from ..serving.scaling import parse_target

        _say(deploy_api.scale(args.name, parse_target(args.workers), ray_address=where))
    elif args.command == "undeploy":
        deploy_api.undeploy(args.name, ray_address=where)
        _say(f"{args.name} undeployed")
    elif args.command == "embed":
        from ..serving.chat import embed
        from ..serving.cluster import connect

        connect(where, embedded_ok=False)
        for vector in embed(args.name, args.texts):
            print(json.dumps(vector))
    return 0


def _deploy(argv: list[str]) -> int:
    from ..spec.deploy_spec import parse_args

    if not argv or argv[0] in ("-h", "--help"):
        print(_deploy_help())
        return 0
    spec = parse_args(argv)
    from ..serving import deploy as deploy_api
    from ..serving.cluster import connect

    try:
        deploy_api.preflight(spec)
    except DeployError as exc:
        raise SpecError(str(exc)) from None
    connect(spec.ray_address, embedded_ok=False)
    started = time.monotonic()
    deploy_api.deploy(spec, on_progress=lambda status: _say(status.line()))
    _say(f"{spec.name} ready in {time.monotonic() - started:.1f} s")
    return 0


def _deploy_help() -> str:
    from ..spec.flags import build_parser
    from ..spec.deploy_spec import settings_help

    return build_parser().format_help() + "\n" + settings_help()


def _chat(args: argparse.Namespace) -> int:
    from ..spec.option_args import fields, validated
    from ..spec.options import ChatOptions

    options = validated(ChatOptions, {name: getattr(args, name) for name in fields(ChatOptions, notebook=False)})
    from ..serving import chat as chat_api
    from ..serving.cluster import connect

    connect(args.ray_address, embedded_ok=False)
    question = " ".join(args.prompt)
    messages = chat_api.messages_for(question, options.system)
    if options.session:
        from ..serving import sessions

        store = sessions.FileStore()
        prepared = sessions.prepare(store, options.session, args.name, question, system=options.system,
                                    max_tokens=options.max_tokens)
        if prepared.note:
            print(prepared.note, file=sys.stderr)
        messages = prepared.messages
    result = chat_api.echo(args.name, messages, options.gen())
    if options.session:
        sessions.record(store, options.session, question, result.text, args.name)
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Progress bars go to stderr, so stdout holds only the results in the --format asked for."""
    from ..spec.option_args import fields, validated
    from ..spec.options import BenchOptions

    options = validated(BenchOptions, {name: getattr(args, name) for name in fields(BenchOptions, notebook=False)})
    from ..serving import bench
    from ..serving.cluster import connect

    connect(args.ray_address, embedded_ok=False)
    result = bench.run(args.name, options, ray_address=args.ray_address)
    if options.format == "json":
        print(result.to_json(orient="records"))
    elif options.format == "csv":
        print(result.to_csv(index=False), end="")
    else:
        print(result.to_string(index=False))
    return 0


def _history(args: argparse.Namespace) -> int:
    from ..serving import sessions
    from ..spec.option_args import validated
    from ..spec.options import HistoryOptions

    options = validated(HistoryOptions, {"session": args.session, "clear": args.clear})
    store = sessions.FileStore()
    if options.clear:
        sessions.clear(store, options.session)
        _say(f"session {options.session!r} cleared")
    else:
        _say(store.get(options.session).transcript())
    return 0


def _restore(argv: list[str]) -> int:
    """Exit status 1 when any kept deployment could not be restored (each says why)."""
    from ..serving.restore import read_args, restore

    if argv[:1] in (["-h"], ["--help"]):
        print(COMMANDS["restore"])
        return 0
    args = read_args(argv, "byzer-magic restore")
    from ..serving.cluster import connect

    connect(args.ray_address, embedded_ok=False)
    report = restore(args.names, infer_params=args.infer_params or (), ray_address=args.ray_address,
                     on_progress=lambda status: _say(status.line()))
    _say(report)
    return 1 if report.failed else 0


def _serve(argv: list[str]) -> int:
    import os

    from ..spec.flags import build_serve_parser, read_serve_flags

    if argv[:1] in (["-h"], ["--help"]):
        print(build_serve_parser("byzer-magic serve").format_help())
        return 0
    args = read_serve_flags(argv, os.environ, "byzer-magic serve")
    from ..openai import gateway
    from ..serving.cluster import connect

    connect(args.ray_address, embedded_ok=False)
    if args.stop:
        _say(gateway.stop())
    else:
        _say(gateway.start(args.host, args.port, args.api_key, allowed_hosts=args.allowed_hosts, force=args.force,
                          max_body_mb=args.max_body_mb, processes=args.processes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

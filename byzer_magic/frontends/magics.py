"""IPython front end: parse the line or cell, call one core function, show the result.

Known failures (bad flags, unknown names, provider errors) become a
UsageError, which IPython prints as one paragraph without a traceback.
"""
from __future__ import annotations

import functools
import os
import shlex
import time
from typing import Any, Callable

import ipywidgets as widgets
from IPython.core.error import UsageError
from IPython.display import display
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Float, Int, TraitError, TraitType, Unicode, observe, validate
from traitlets.config import Configurable

from ..serving import chat as chat_api
from ..serving import deploy as deploy_api
from ..openai import gateway
from ..serving import records, sessions
from ..serving import restore as restore_api
from .chat_line import split_chat_line
from ..serving.cluster import connect, use_configured_address
from ..errors import ByzerError, SpecError
from ..spec.flags import read_serve_flags
from ..spec.option_args import arguments, check, fields, help_lines, kind_of, validated
from ..spec.options import SERVE_DEFAULTS, BenchOptions, ChatOptions, DeployFlags, HistoryOptions, ServeFlags
from ..serving.scaling import parse_target
from ..spec.deploy_spec import DeploySpec, parse_spec, settings_help
from ..serving.status import DeploymentStatus, State
from .widgets import StatusCard


def _friendly(method: Callable) -> Callable:
    """Show ByzerError as a UsageError: the user's mistake or the provider's, not our bug."""

    @functools.wraps(method)
    def wrapper(self: "ByzerMagics", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except ByzerError as exc:
            if not self.short_errors:
                raise
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:
            if not self.short_errors:
                raise
            # One line instead of a traceback; a deploy has already deleted itself and a chat cancelled its request.
            raise UsageError(f"%{method.__name__} interrupted") from None

    return wrapper


def ready_line(spec: DeploySpec, seconds: float) -> str:
    """What a deploy outside a notebook prints: the magic that uses it, `%byzer_embed` for an embedding model."""
    use = f"embed with %byzer_embed {spec.name} TEXT" if spec.task == "embed" else f"chat with %byzer_chat {spec.name} ..."
    return f"{spec.name} ready in {seconds:.1f} s: {use}"


def _deploy_doc() -> str:
    flags = help_lines(DeployFlags)
    return f"""Deploy a model onto Ray; the cell holds `byzerllm deploy` flags.

Examples::

    %%byzer_deploy
    --pretrained_model_type saas/openai
    --infer_params saas.api_key=${{OPENAI_API_KEY}} saas.model=gpt-4o-mini
    --num_workers 2 --model my_chat

    %%byzer_deploy --model local_chat
    --pretrained_model_type custom/auto --infer_backend llama_cpp
    --model_path /models/tiny.gguf --infer_params n_ctx=512   # comments are fine

    %byzer_deploy --model emb --pretrained_model_type custom/bge --model_path /models/bge

Flags may sit on the magic's line or in the cell, over several lines, with
`\\` continuations; ${{VAR}} and $VAR come from the environment. A pasted
one-line `byzerllm deploy` command works as the line magic `%byzer_deploy`.

Flags:
{flags}

{settings_help()}
"""


_CHAT_DEFAULTS = ("max_tokens", "temperature", "system")
"""The `%byzer_chat` options that `%config ByzerMagics` can give a default."""


def _chat_setting(name: str) -> TraitType:
    """A `%config ByzerMagics` default for one `%byzer_chat` option, typed and described by ChatOptions."""
    field = ChatOptions.model_fields[name]
    trait = {int: Int, float: Float, str: Unicode}[kind_of(field)]
    return trait(None, allow_none=True, help=f"default --{name} for %byzer_chat: {field.description}").tag(config=True)


def _chat_arguments(magic: Callable) -> Callable:
    """`%byzer_chat`'s parser and `?` help: ChatOptions' options, then the name and the prompt."""
    magic = argument("prompt", nargs="*", help="the question; in the cell form, the cell body")(magic)
    magic = argument("name", help="deployment name given to --model")(magic)
    for names, keywords in reversed(arguments(ChatOptions)):
        magic = argument(*names, **keywords)(magic)
    return magic_arguments()(magic)


def _history_arguments(magic: Callable) -> Callable:
    """`%byzer_history`'s parser and `?` help: the session's name, then HistoryOptions' other options."""
    magic = argument("session", help=HistoryOptions.model_fields["session"].description)(magic)
    for names, keywords in reversed(arguments(HistoryOptions)):
        if names != ("--session",):
            magic = argument(*names, **keywords)(magic)
    return magic_arguments()(magic)


def _bench_arguments(magic: Callable) -> Callable:
    """`%byzer_bench`'s parser and `?` help: the deployment's name, then BenchOptions' options."""
    magic = argument("name", help="deployment name given to --model")(magic)
    for names, keywords in reversed(arguments(BenchOptions)):
        magic = argument(*names, **keywords)(magic)
    return magic_arguments()(magic)


@magics_class
class ByzerMagics(Magics, Configurable):
    """Deploy and chat with LLMs on Ray. Settings: `%config ByzerMagics`."""

    short_errors = Bool(True, help="show known errors as one line instead of a traceback").tag(config=True)
    stream = Bool(True, help="print %byzer_chat answers token by token as they arrive").tag(config=True)
    max_tokens = _chat_setting("max_tokens")
    temperature = _chat_setting("temperature")
    system = _chat_setting("system")
    ray_address = Unicode(None, allow_none=True, help="Ray cluster for every magic; overrides RAY_ADDRESS").tag(config=True)
    card_interval = Float(2.0, help="seconds between a status card's updates from the cluster").tag(config=True)
    state_dir = Unicode(None, allow_none=True, help="folder where each deployment's flags are kept for "
                        "%byzer_restore; default $BYZER_MAGIC_HOME/deployments or ~/.byzer_magic/deployments"
                        ).tag(config=True)

    @observe("state_dir")
    def _state_dir_set(self, change: Any) -> None:
        records.use_state_dir(change["new"])

    @observe("ray_address")
    def _address_set(self, change: Any) -> None:
        use_configured_address(change["new"])

    @validate(*_CHAT_DEFAULTS)
    def _chat_default(self, proposal: Any) -> Any:
        """A chat default obeys the same ranges as the flag it stands in for."""
        try:
            return check(ChatOptions, proposal["trait"].name, proposal["value"], prefix="ByzerMagics.")
        except SpecError as exc:
            raise TraitError(str(exc)) from None

    def __init__(self, shell: Any = None, **kwargs: Any):
        Configurable.__init__(self, config=shell.config if shell else None)
        Magics.__init__(self, shell=shell, **kwargs)
        self._live_cards: dict[str, StatusCard] = {}

    @line_cell_magic
    @_friendly
    def byzer_deploy(self, line: str, cell: str | None = None) -> DeploymentStatus | None:
        spec = parse_spec(f"{line}\n{cell or ''}")
        if self.ray_address and not spec.ray_address:
            from dataclasses import replace

            spec = replace(spec, ray_address=self.ray_address)
        started = time.monotonic()
        if not self._in_notebook():
            result = deploy_api.deploy(spec, on_progress=self._progress)
            print(ready_line(spec, time.monotonic() - started))
            return result
        card = self._card(DeploymentStatus(spec.name, State.DEPLOYING, 0, spec.num_workers, "", spec.describe(),
                                           min_workers=spec.min_workers, max_workers=spec.max_workers))
        display(card)
        try:
            ready = deploy_api.deploy(spec, on_progress=card.refresh)
            card.address = _ray_address()
            card.refresh(ready)
        except ByzerError as exc:
            card.refresh(DeploymentStatus(spec.name, State.FAILED, 0, spec.num_workers, str(exc), spec.describe(),
                                          min_workers=spec.min_workers, max_workers=spec.max_workers))
            raise
        card.start_updates()
        return None

    byzer_deploy.__doc__ = _deploy_doc()

    @staticmethod
    def _progress(status: DeploymentStatus) -> None:
        print(f"  {status.line()}", flush=True)

    @_chat_arguments
    @line_cell_magic
    @_friendly
    def byzer_chat(self, line: str, cell: str | None = None) -> None:
        """Chat with a deployment; the answer streams into the output.

        Examples::

            %byzer_chat my_chat What is Ray?
            %byzer_chat --temperature 0 --max_tokens 64 my_chat Say hi

            %%byzer_chat my_chat -o answer --system "Answer in one line."
            A long, multi-line question...

            %%byzer_chat my_chat --session s
            The next cell with --session s sends this question and its answer too.

        `--session S` keeps the conversation in the kernel; `%byzer_history S`
        shows it. Another deployment can continue it (`--session S` with
        another name). Where the deployment knows its context and counts
        tokens (llama_cpp, vllm, transformers), the oldest turns are left out
        of what is sent until it fits, with a note; a SaaS deployment gets
        the whole history.
        """
        name, messages, options = self.chat_request(line, cell)
        connect(self.ray_address, embedded_ok=False)
        question = messages[-1]["content"]
        if options.session:
            prepared = sessions.prepare(sessions.KERNEL, options.session, name, question,
                                        system=options.system, max_tokens=options.max_tokens)
            messages = prepared.messages
            if prepared.note:
                print(prepared.note)
        if self.stream and not options.no_stream:
            result = chat_api.echo(name, messages, options.gen())
        else:
            result = chat_api.chat(name, messages, options.gen())
            print(result.text)
        if options.session:
            sessions.record(sessions.KERNEL, options.session, question, result.text, name)
        if options.output:
            self.shell.user_ns[options.output] = result

    def chat_request(self, line: str, cell: str | None) -> tuple[str, list[dict[str, Any]], ChatOptions]:
        """What a `%byzer_chat` line or cell asks: the deployment, the messages and the options, checked."""
        words, prompt = split_chat_line(line)
        args = parse_argstring(self.byzer_chat, " ".join(shlex.quote(w) for w in words))
        text = cell if cell is not None else prompt
        if not text or not text.strip():
            raise UsageError(f"nothing to ask: write the question after the name (%byzer_chat {args.name} Hello)")
        defaults = {name: getattr(self, name) for name in _CHAT_DEFAULTS}
        given = {k: v for k, v in vars(args).items() if k in ChatOptions.model_fields and v is not None}
        options = validated(ChatOptions, {**defaults, **given})
        return args.name, chat_api.messages_for(text.strip(), options.system), options

    @_history_arguments
    @line_magic
    @_friendly
    def byzer_history(self, line: str) -> Any:
        """Show a `--session` conversation as a transcript; `--clear` empties it, `-o` keeps it as OpenAI messages.

        Examples::

            %byzer_history s
            %byzer_history s -o messages     # [{"role": "user", ...}, {"role": "assistant", ...}, ...]
            %byzer_history s --clear
        """
        args = parse_argstring(self.byzer_history, line)
        options = validated(HistoryOptions, vars(args))
        if options.clear:
            sessions.clear(sessions.KERNEL, options.session)
            print(f"session {options.session!r} cleared")
            return None
        session = sessions.KERNEL.get(options.session)
        if options.output:
            self.shell.user_ns[options.output] = session.messages()
        print(session.transcript())
        return None

    @line_cell_magic
    @_friendly
    def byzer_embed(self, line: str, cell: str | None = None) -> Any:
        """Embed text with a deployment of an embedding model type (e.g. custom/bge).

        The line form embeds the rest of the line, verbatim, as one text and
        returns its vector; the cell form embeds each non-empty line of the
        cell and returns one row per line. Both are numpy arrays.

        Examples::

            vec = %byzer_embed my_emb What is Ray?

            %%byzer_embed my_emb
            first document
            second document
        """
        import numpy as np

        name, _, rest = line.strip().partition(" ")
        if not name:
            raise UsageError("usage: %byzer_embed NAME text..., or %%byzer_embed NAME with one text per line")
        texts = [t.strip() for t in cell.splitlines() if t.strip()] if cell is not None else [rest.strip()]
        if not any(texts):
            raise UsageError(f"nothing to embed: write the text after the name (%byzer_embed {name} Hello)")
        connect(self.ray_address, embedded_ok=False)
        vectors = np.asarray(chat_api.embed(name, texts), dtype=np.float32)
        return vectors if cell is not None else vectors[0]

    @_bench_arguments
    @line_magic
    @_friendly
    def byzer_bench(self, line: str) -> Any:
        """Load a deployment at rising concurrency; a DataFrame per level and a figure.

        Each level keeps that many requests in flight until --requests are
        answered, then the next level starts; a bar shows each level's progress.
        Per level: requests/s, output tokens/s (texts/s for an embedder), time
        to first token, inter-token and end-to-end latency (p50 and p99, ms),
        errors and the first error's text. The figure plots throughput against
        concurrency and latency per level; `byzer_magic.frontends.bench_figure.plot(a, b)`
        draws several results in one figure.

        Examples::

            %byzer_bench my_chat
            %byzer_bench my_chat --concurrency 1,4,16 --requests 64 --max_tokens 64 -o result
            %byzer_bench my_chat --via endpoint --prompt "Tell me about Ray"
        """
        from ..serving import bench
        from .bench_figure import plot

        args = parse_argstring(self.byzer_bench, line)
        options = validated(BenchOptions, {name: getattr(args, name) for name in fields(BenchOptions)})
        connect(self.ray_address, embedded_ok=False)
        result = bench.run(args.name, options, ray_address=self.ray_address)
        if self._in_notebook():
            display(plot(result))
        if options.output:
            self.shell.user_ns[options.output] = result
            return None
        return result

    @line_magic
    @_friendly
    def byzer_list(self, line: str = ""):
        """List every deployment on the cluster, from any kernel: `%byzer_list`.

        In a notebook each one is a live card with +, - and Stop.
        """
        table = deploy_api.list_deployments(ray_address=self.ray_address)
        if not self._in_notebook() or not table.rows:
            return table
        cards = [self._card(row) for row in table.rows]
        for card in cards:
            card.start_updates()
        display(widgets.VBox(cards))
        return None

    def _in_notebook(self) -> bool:
        """A Jupyter kernel draws widgets; a terminal IPython gets text."""
        return getattr(self.shell, "kernel", None) is not None

    def _card(self, status: DeploymentStatus) -> StatusCard:
        """A live card; an earlier card of the same deployment in this kernel stops polling (re-run cells)."""
        earlier = self._live_cards.pop(status.name, None)
        if earlier is not None:
            earlier.stop_updates()
        card = self._live_cards[status.name] = self._new_card(status)
        return card

    def _new_card(self, status: DeploymentStatus) -> StatusCard:
        return StatusCard(
            status,
            fetch=lambda name: deploy_api.status(name, with_metrics=True),
            scale=lambda name, n: deploy_api.scale(name, n),
            stop=lambda name: (deploy_api.undeploy(name), chat_api.forget(name)),
            interval=self.card_interval,
            address=_ray_address(),
        )

    @line_magic
    @_friendly
    def byzer_status(self, line: str) -> DeploymentStatus:
        """Show one deployment's state: `%byzer_status my_chat`."""
        return deploy_api.require(_one_name(line, "%byzer_status NAME"), ray_address=self.ray_address, with_metrics=True)

    @line_magic
    @_friendly
    def byzer_scale(self, line: str) -> DeploymentStatus:
        """Change a deployment's workers in place: `%byzer_scale my_chat 3` fixes the count at 3,
        `%byzer_scale my_chat 2..6` lets autoscaling keep it between 2 and 6."""
        parts = line.split()
        if len(parts) != 2:
            raise UsageError("usage: %byzer_scale NAME WORKERS or NAME MIN..MAX, e.g. %byzer_scale my_chat 3")
        target = parse_target(parts[1])
        return deploy_api.scale(parts[0], target, ray_address=self.ray_address, on_progress=self._progress)

    @line_magic
    @_friendly
    def byzer_undeploy(self, line: str) -> None:
        """Stop every worker of a deployment: `%byzer_undeploy my_chat`."""
        name = _one_name(line, "%byzer_undeploy NAME")
        deploy_api.undeploy(name, ray_address=self.ray_address)
        chat_api.forget(name)
        print(f"{name} undeployed")

    @line_magic
    @_friendly
    def byzer_restore(self, line: str = "") -> restore_api.RestoreReport:
        """Deploy again what the cluster lost (a restart, a new head), from the flags kept for each deployment.

        Examples::

            %byzer_restore                       # every kept deployment the cluster does not run
            %byzer_restore my_chat --infer_params saas.api_key=${OPENAI_API_KEY}

        Each deployment's flags are kept in `%config ByzerMagics.state_dir`
        when it is deployed; a secret given as ${VAR} is read again now, one
        given literally was not kept and is asked for by name.
        """
        args = restore_api.read_args(shlex.split(line))
        return restore_api.restore(args.names, infer_params=args.infer_params or (),
                                   ray_address=args.ray_address or self.ray_address, on_progress=self._progress)

    @line_magic
    @_friendly
    def byzer_serve(self, line: str = "") -> gateway.Endpoint:
        args = read_serve_flags(shlex.split(line), os.environ)
        ray_address = args.ray_address or self.ray_address
        if args.stop:
            return gateway.stop(ray_address=ray_address)
        return gateway.start(args.host, args.port, args.api_key, allowed_hosts=args.allowed_hosts, force=args.force,
                             max_body_mb=args.max_body_mb, processes=args.processes, ray_address=ray_address)

    byzer_serve.__doc__ = f"""Serve every deployment at one OpenAI-compatible URL, from the cluster.

Examples::

    %byzer_serve                                  # http://{SERVE_DEFAULTS.host}:{SERVE_DEFAULTS.port}/v1
    %byzer_serve --port 8001 --api_key ${{GATEWAY_KEY}}
    %byzer_serve --stop

Any OpenAI client then works: `OpenAI(base_url="http://{SERVE_DEFAULTS.host}:{SERVE_DEFAULTS.port}/v1",
api_key=...)`, with `model` set to a deployment's name. Routes: /v1/models,
/v1/chat/completions, /v1/completions, /v1/embeddings, /health, /metrics.
The endpoint runs on the cluster, so it outlives this kernel, and it sees
deployments added or removed later at once.

Flags:
{help_lines(ServeFlags)}
"""


def _ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address if ray.is_initialized() else ""


def _one_name(line: str, usage: str) -> str:
    parts = line.split()
    if len(parts) != 1:
        raise UsageError(f"usage: {usage}")
    return parts[0]

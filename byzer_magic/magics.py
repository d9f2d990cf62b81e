"""IPython front end: parse the line or cell, call one core function, show the result.

Known failures (bad flags, unknown names, provider errors) become a
UsageError, which IPython prints as one paragraph without a traceback.
"""
from __future__ import annotations

import functools
import os
import re
import shlex
import sys
import time
from typing import Any, Callable

import ipywidgets as widgets
from IPython.core.error import UsageError
from IPython.display import display
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Float, Int, Unicode
from traitlets.config import Configurable

from . import chat as chat_api
from . import deploy as deploy_api
from . import gateway
from .backends.base import GenParams
from .cluster import connect
from .errors import ByzerError
from .flags import read_serve_flags
from .option_args import help_lines
from .options import SERVE_DEFAULTS, DeployFlags, ServeFlags
from .spec import parse_spec, settings_help
from .status import DeploymentStatus
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

    return wrapper


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

Flags may sit on the magic's line or in the cell, over several lines, with
`\\` continuations; ${{VAR}} and $VAR come from the environment.

Flags:
{flags}

{settings_help()}
"""


@magics_class
class ByzerMagics(Magics, Configurable):
    """Deploy and chat with LLMs on Ray. Settings: `%config ByzerMagics`."""

    short_errors = Bool(True, help="show known errors as one line instead of a traceback").tag(config=True)
    stream = Bool(True, help="print %byzer_chat answers token by token as they arrive").tag(config=True)
    max_tokens = Int(None, allow_none=True, help="default --max_tokens for %byzer_chat").tag(config=True)
    temperature = Float(None, allow_none=True, help="default --temperature for %byzer_chat").tag(config=True)
    system = Unicode(None, allow_none=True, help="default --system prompt for %byzer_chat").tag(config=True)
    ray_address = Unicode(None, allow_none=True, help="Ray cluster for every magic; overrides RAY_ADDRESS").tag(config=True)
    card_interval = Float(2.0, help="seconds between a status card's updates from the cluster").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any):
        Configurable.__init__(self, config=shell.config if shell else None)
        Magics.__init__(self, shell=shell, **kwargs)

    @cell_magic
    @_friendly
    def byzer_deploy(self, line: str, cell: str) -> DeploymentStatus | None:
        spec = parse_spec(f"{line}\n{cell}")
        if self.ray_address and not spec.ray_address:
            from dataclasses import replace

            spec = replace(spec, ray_address=self.ray_address)
        started = time.monotonic()
        if not self._in_notebook():
            result = deploy_api.deploy(spec, on_progress=self._progress)
            print(f"{spec.name} ready in {time.monotonic() - started:.1f} s: chat with %byzer_chat {spec.name} ...")
            return result
        card = self._card(DeploymentStatus(spec.name, "deploying", 0, spec.num_workers, "", spec.describe()))
        display(card)
        try:
            ready = deploy_api.deploy(spec, on_progress=card.refresh)
            card.address = _ray_address()
            card.refresh(ready)
        except ByzerError as exc:
            card.refresh(DeploymentStatus(spec.name, "failed", 0, spec.num_workers, str(exc), spec.describe()))
            raise
        card.start_updates()
        return None

    byzer_deploy.__doc__ = _deploy_doc()

    @staticmethod
    def _progress(status: DeploymentStatus) -> None:
        print(f"  {status.line()}", flush=True)

    @magic_arguments()
    @argument("-o", "--output", metavar="VAR", help="keep the answer (a ChatResult) in this variable")
    @argument("--system", help="system prompt placed before the question")
    @argument("--temperature", type=float, help="sampling temperature; 0 is greedy")
    @argument("--max_tokens", type=int, help="longest answer, in tokens")
    @argument("--no_stream", action="store_true", help="print the answer once it is complete")
    @argument("name", help="deployment name given to --model")
    @argument("prompt", nargs="*", help="the question; in the cell form, the cell body")
    @line_cell_magic
    @_friendly
    def byzer_chat(self, line: str, cell: str | None = None) -> None:
        """Chat with a deployment; the answer streams into the output.

        Examples::

            %byzer_chat my_chat What is Ray?
            %byzer_chat --temperature 0 --max_tokens 64 my_chat Say hi

            %%byzer_chat my_chat -o answer --system "Answer in one line."
            A long, multi-line question...
        """
        options, prompt = _split_chat_line(line)
        args = parse_argstring(self.byzer_chat, " ".join(shlex.quote(o) for o in options))
        text = cell if cell is not None else prompt
        if not text or not text.strip():
            raise UsageError(f"nothing to ask: write the question after the name (%byzer_chat {args.name} Hello)")
        gen = GenParams(
            temperature=args.temperature if args.temperature is not None else self.temperature,
            max_tokens=args.max_tokens if args.max_tokens is not None else self.max_tokens,
        )
        messages = chat_api.messages_for(text.strip(), args.system or self.system)
        connect(self.ray_address, embedded_ok=False)
        if self.stream and not args.no_stream:
            deltas = []
            for delta in chat_api.stream(args.name, messages, gen):
                deltas.append(delta)
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            print()
            result = chat_api.ChatResult.of(deltas)
        else:
            result = chat_api.chat(args.name, messages, gen)
            print(result.text)
        if args.output:
            self.shell.user_ns[args.output] = result

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
        """Change a deployment's number of workers in place: `%byzer_scale my_chat 3`."""
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise UsageError("usage: %byzer_scale NAME WORKERS, e.g. %byzer_scale my_chat 3")
        return deploy_api.scale(parts[0], int(parts[1]), ray_address=self.ray_address, on_progress=self._progress)

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
    def byzer_serve(self, line: str = "") -> gateway.Endpoint:
        args = read_serve_flags(shlex.split(line), os.environ)
        ray_address = args.ray_address or self.ray_address
        if args.stop:
            return gateway.stop(ray_address=ray_address)
        return gateway.start(args.host, args.port, args.api_key, ray_address=ray_address)

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


_CHAT_LINE = re.compile(r"^(\s*(?:[A-Za-z_][\w.]*\s*=\s*)?)%(byzer_chat|byzer_embed)\s+(\S+\s+\S.*?)\s*$")


def keep_question_marks(lines: list[str]) -> list[str]:
    """Input transformer: `%byzer_chat NAME What is Ray?` is a question, not `Ray?` help.

    IPython reads any line ending in `?` as a help request for its last word;
    a chat or embed line with text (`vec = %byzer_embed NAME Why?` too) becomes
    an explicit magic call before that rule runs. `%byzer_chat?` and
    `%byzer_chat NAME?` still ask for help.
    """
    out = []
    for line in lines:
        match = _CHAT_LINE.match(line)
        if match and line.rstrip().endswith("?"):
            line = f"{match.group(1)}get_ipython().run_line_magic({match.group(2)!r}, {match.group(3)!r})\n"
        out.append(line)
    return out


def _ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address if ray.is_initialized() else ""


def _one_name(line: str, usage: str) -> str:
    parts = line.split()
    if len(parts) != 1:
        raise UsageError(f"usage: {usage}")
    return parts[0]


_VALUED = {"-o", "--output", "--system", "--temperature", "--max_tokens"}


def _split_chat_line(line: str) -> tuple[list[str], str]:
    """Options and the name come first; the rest of the line is the prompt, verbatim.

    So apostrophes, dashes and quotes in a question need no escaping.
    """
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    options: list[str] = []
    named = False
    expect_value = False
    while True:
        start = lexer.instream.tell()
        rest = line[start:].lstrip()
        if named and not expect_value and not rest.startswith("-"):
            return options, rest.strip()
        try:
            token = lexer.get_token()
        except ValueError as exc:
            raise UsageError(f"%byzer_chat: {exc} in the options") from None
        if token is None:
            return options, ""
        if expect_value or token.startswith("-"):
            options.append(token)
            expect_value = not expect_value and token.split("=")[0] in _VALUED and "=" not in token
            continue
        options.append(token)
        named = True

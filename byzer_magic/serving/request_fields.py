"""Which OpenAI request fields a deployment honours, and the one-sentence refusal for the rest.

Clients send far more than a prompt (tools, logprobs, n, penalties, store,
...). A field is either honoured by the deployment's backend, as its
`Capabilities` declare, or refused with a 400 that names the field and the
backend: nothing is dropped silently. A field's "no-op" value (n=1,
logprobs=false, store=false, penalties of 0, ...) is accepted everywhere,
since asking for nothing needs no support. The worker runs this before a
request reaches its backend, so a refusal changes nothing on the cluster.
"""
from __future__ import annotations

from typing import Any, Callable

from ..backends.base import Capabilities, GenParams
from ..errors import FieldError

FORWARDED = ("user", "metadata", "store", "service_tier", "prediction", "reasoning_effort", "suffix")
"""Fields a provider takes as given: backends with `capabilities.provider_fields` pass them on."""

Rule = tuple[Callable[[Any], bool], str]


def _empty(value: Any) -> bool:
    return not value


_NOWHERE: dict[str, Rule] = {
    "n": (lambda v: v in (None, 1), "gives one choice per request; leave n out (or 1) and ask again for more"),
    "best_of": (lambda v: v in (None, 1), "gives one choice per request; leave best_of out (or 1)"),
    "logprobs": (_empty, "returns no log probabilities; leave logprobs out"),
    "top_logprobs": (_empty, "returns no log probabilities; leave top_logprobs out"),
    "echo": (_empty, "does not echo the prompt; leave echo out and prepend the prompt yourself"),
    "audio": (lambda v: v is None, "answers in text only; leave audio out"),
    "modalities": (lambda v: v in (None, ["text"]), 'answers in text only; send modalities ["text"] or leave it out'),
    "web_search_options": (lambda v: v is None, "does not search the web; leave web_search_options out"),
    "functions": (lambda v: v is None, "does not take the deprecated functions; send tools where the backend takes them"),
    "function_call": (lambda v: v is None, "does not take the deprecated function_call; send tool_choice"),
}
"""Fields no backend honours (answers carry one text choice and nothing else), with what each means."""

_UNFORWARDED: dict[str, Rule] = {
    "user": (lambda v: True, ""),
    "metadata": (lambda v: not v, "stores nothing to tag; leave metadata out"),
    "store": (_empty, "stores no completions; leave store out (or false)"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "has one service tier; leave service_tier out"),
    "prediction": (lambda v: v is None, "takes no predicted output; leave prediction out"),
    "reasoning_effort": (lambda v: v is None, "has no reasoning effort to set; leave reasoning_effort out"),
    "suffix": (_empty, "does not fill in between a prompt and a suffix; leave suffix out"),
}
"""FORWARDED fields, for backends that do not forward: `user` only names the caller, so it is taken as is."""


def _capability_asks(gen: GenParams) -> list[tuple[str, str]]:
    """(capability, field) for each capability-bound field this request asks for."""
    asked = []
    if gen.tools:
        asked.append(("tools", "tools"))
    if gen.tool_choice not in (None, "none", "auto"):
        asked.append(("tools", "tool_choice"))
    if gen.response_format and gen.response_format.get("type", "text") != "text":
        asked.append(("structured_output", "response_format"))
    if gen.seed is not None:
        asked.append(("seed", "seed"))
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(gen, name):
            asked.append(("penalties", name))
    if gen.logit_bias:
        asked.append(("logit_bias", "logit_bias"))
    if gen.ignore_eos:
        asked.append(("ignore_eos", "ignore_eos"))
    return asked


_NOT_CAPABLE = {
    "tools": "does not take tools",
    "tool_choice": "does not take tools, so there is no tool to choose",
    "response_format": "does not do structured output (response_format json_object or json_schema); "
                       "ask for JSON in the prompt or leave response_format out",
    "seed": "does not take a sampling seed; leave seed out",
    "presence_penalty": "does not take OpenAI's presence_penalty; leave it out (or 0)",
    "frequency_penalty": "does not take OpenAI's frequency_penalty; leave it out (or 0)",
    "logit_bias": "does not take logit_bias; leave it out",
    "ignore_eos": "does not take ignore_eos (vLLM's extension); leave it out",
}


def refusal(gen: GenParams, capabilities: Capabilities, who: str, task: str = "chat") -> FieldError | None:
    """Why this request cannot go to the deployment `who` names ("'d' (backend)"), or None when it can."""
    if task == "embed" and (gen.tools or gen.response_format):
        field = "tools" if gen.tools else "response_format"
        return FieldError(field, f"{field}: {who} is an embedding model; it neither chats nor takes {field}")
    for capability, field in _capability_asks(gen):
        if not getattr(capabilities, capability):
            return FieldError(field, f"{field}: {who} {_NOT_CAPABLE[field]}")
    for field, value in gen.provider_fields.items():
        rule = _NOWHERE.get(field)
        if rule is None and field in _UNFORWARDED and not capabilities.provider_fields:
            rule = _UNFORWARDED[field]
        if rule is not None and not rule[0](value):
            return FieldError(field, f"{field}: {who} {rule[1]}")
    return None


def forwarded(gen: GenParams) -> dict[str, Any]:
    """The provider fields a forwarding backend passes on as they were sent."""
    return {k: v for k, v in gen.provider_fields.items() if k in FORWARDED and v is not None}


def bad_token(gen: GenParams, vocab_size: int | None, who: str) -> FieldError | None:
    """A logit_bias on a token id the model does not have; None when all are in its vocabulary (or it is unknown)."""
    if not gen.logit_bias or not vocab_size:
        return None
    outside = sorted(t for t in gen.logit_bias if not 0 <= t < vocab_size)
    if not outside:
        return None
    return FieldError("logit_bias", f"logit_bias: token {outside[0]} is not in {who}'s vocabulary "
                                    f"(token ids 0 to {vocab_size - 1})")


def _cell(field: str, can: Capabilities) -> str:
    """What one backend does with one field, in a word or two, for the README's table."""
    capability = {"tools": "tools", "tool_choice": "tools", "parallel_tool_calls": "tools",
                  "response_format": "structured_output", "seed": "seed", "presence_penalty": "penalties",
                  "frequency_penalty": "penalties", "logit_bias": "logit_bias", "ignore_eos": "ignore_eos"}.get(field)
    if capability is not None:
        if getattr(can, capability):
            return "yes"
        return '"text" only' if field == "response_format" else "refused"
    if field in _NOWHERE:
        return {"n": "1 only", "best_of": "1 only", "modalities": '["text"] only'}.get(field, "refused")
    if field in FORWARDED:
        if can.provider_fields:
            return "forwarded"
        return {"user": "taken, no effect", "store": "false only", "service_tier": '"auto"/"default" only'}.get(
            field, "refused")
    return "yes"


TABLE_FIELDS = (
    "messages / prompt", "stream", "stream_options", "max_tokens / max_completion_tokens", "temperature", "top_p",
    "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "tools", "tool_choice",
    "parallel_tool_calls", "response_format", "n", "best_of", "logprobs", "top_logprobs", "echo", "suffix", "user",
    "metadata", "store", "service_tier", "prediction", "reasoning_effort", "modalities", "audio",
    "web_search_options", "functions", "function_call", "ignore_eos",
)


def table(backends: list[tuple[str, Capabilities]]) -> str:
    """The README's field-by-backend table, written from the backends' own declarations."""
    lines = ["| field | " + " | ".join(name for name, _ in backends) + " |",
             "|---" * (len(backends) + 1) + "|"]
    for field in TABLE_FIELDS:
        cells = [_cell(field, can) for _, can in backends]
        lines.append(f"| `{field}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Print the README's table for the built-in backends: `python -m byzer_magic.serving.request_fields`."""
    from ..backends import _BUILT_IN, find

    print(table([(name, find(name).capabilities) for name in _BUILT_IN]))


if __name__ == "__main__":
    main()

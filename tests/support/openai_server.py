"""llama.cpp's own OpenAI-compatible server, wrapped to be observed and steered.

This is the real `llama_cpp.server` app serving the tiny GGUF; an ASGI
middleware around it counts requests in flight (so tests can see how many a
deployment sends at once), can add a fixed delay per request (a slow provider
for the throughput benchmark), can pause before each streamed chunk, and can
answer the next N requests with a chosen status (a provider's 429 or 5xx), and can stand in for the model
altogether with a paced stream of words (`paced_words`: one word per token asked for, each after
`chunk_delay`, with usage), whose speed the clock sets. Steer it with POST /_control and read it with GET /_stats.

    python -m tests.support.openai_server --model m.gguf --port 8091 [--api_key K]
"""
from __future__ import annotations

import argparse
import asyncio
import json


class Observed:
    """ASGI middleware: concurrency counter, fixed delay and fault injection."""

    def __init__(self, app, delay: float = 0.0):
        self.app = app
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.fail_next = 0
        self.fail_status = 500
        self.short_circuit = False
        self.chunk_delay = 0.0
        self.paced_words = False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == "/_stats":
            return await self._json(send, 200, self._stats())
        if path == "/_control":
            body = json.loads((await receive())["body"] or b"{}")
            for key in ("delay", "fail_next", "fail_status", "short_circuit", "chunk_delay", "paced_words"):
                if key in body:
                    setattr(self, key, body[key])
            if body.get("reset"):
                self.max_in_flight = self.requests = 0
            return await self._json(send, 200, self._stats())
        if not path.startswith("/v1/chat"):
            return await self.app(scope, receive, send)
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        done = False

        async def counted_send(message):
            # The request stops counting as its last byte is handed over, before the
            # client can see the end and send its next request: an exact count.
            nonlocal done
            if not done and message["type"] == "http.response.body" and not message.get("more_body"):
                done = True
                self.in_flight -= 1
            await send(message)

        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail_next > 0:
                self.fail_next -= 1
                message = {"error": {"message": f"injected failure {self.fail_status}", "type": "test"}}
                return await self._json(counted_send, self.fail_status, message)
            if self.short_circuit:
                return await self._canned_stream(counted_send)
            if self.paced_words:
                return await self._word_stream(counted_send, await _body(receive))
            return await self.app(scope, await _json_schema_as_llama_takes_it(receive), self._paced(counted_send))
        finally:
            if not done:
                self.in_flight -= 1

    @staticmethod
    async def _canned_stream(send) -> None:
        """A fixed streamed answer in the OpenAI format: everything but the model."""
        body = _chunk({"role": "assistant", "content": "ok"}, None) + _chunk({}, "stop") + b"data: [DONE]\n\n"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": body})

    async def _word_stream(self, send, request: dict) -> None:
        """As many words as tokens asked for, one chunk each after `chunk_delay`, then the finish and the usage."""
        words = int(request.get("max_completion_tokens") or request.get("max_tokens") or 16)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for index in range(words):
            await asyncio.sleep(self.chunk_delay)
            delta = {"role": "assistant", "content": " word"} if index == 0 else {"content": " word"}
            await send({"type": "http.response.body", "body": _chunk(delta, None), "more_body": True})
        tail = _chunk({}, "length")
        if (request.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 1, "completion_tokens": words, "total_tokens": words + 1}
            tail += f"data: {json.dumps({**_CHUNK, 'choices': [], 'usage': usage})}\n\n".encode()
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})

    def _paced(self, send):
        """Send with a pause before each body chunk: a slow stream to interrupt mid-way."""

        async def paced_send(message):
            if self.chunk_delay and message["type"] == "http.response.body":
                await asyncio.sleep(self.chunk_delay)
            await send(message)

        return paced_send

    def _stats(self) -> dict:
        return {"in_flight": self.in_flight, "max_in_flight": self.max_in_flight, "requests": self.requests,
                "delay": self.delay}

    @staticmethod
    async def _json(send, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def _json_schema_as_llama_takes_it(receive):
    """OpenAI's response_format json_schema, which llama.cpp's server ignores, in the form it enforces.

    llama-cpp-python constrains output only for {"type": "json_object",
    "schema": ...}; a real provider honours json_schema, so the stand-in does too.
    """
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        request = None
    fmt = request.get("response_format") if isinstance(request, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        request["response_format"] = {"type": "json_object", "schema": (fmt.get("json_schema") or {}).get("schema")}
        body = json.dumps(request).encode()
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


_CHUNK = {"id": "chatcmpl-fixed", "object": "chat.completion.chunk", "created": 0, "model": "tiny"}


def _chunk(delta: dict, finish: str | None) -> bytes:
    payload = {**_CHUNK, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(payload)}\n\n".encode()


async def _body(receive) -> dict:
    """The whole JSON body of a request, read from ASGI messages."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return json.loads(b"".join(chunks) or b"{}")


def main() -> None:
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from byzer_magic.backends.llama_cpp import strict_json_strings

    # The provider's JSON strings hold no raw control characters, as a real provider's never do.
    strict_json_strings()

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api_key")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    app = create_app(
        server_settings=ServerSettings(
            host="127.0.0.1", port=args.port, api_key=args.api_key, interrupt_requests=False
        ),
        model_settings=[
            ModelSettings(model=args.model, model_alias="tiny", n_ctx=512, verbose=False),
            # As a provider's tool-capable model: answers `tools` with tool_calls (a named tool_choice streams too).
            ModelSettings(model=args.model, model_alias="tiny-tools", n_ctx=512, verbose=False,
                          chat_format="chatml-function-calling"),
        ],
    )
    uvicorn.run(Observed(app, args.delay), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

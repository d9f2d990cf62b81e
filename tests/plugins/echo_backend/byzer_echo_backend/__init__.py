"""A backend that answers with the user's last message, word by word, as a third party would write one.

It lives outside byzer_magic and is found only through its entry point in
`byzer_magic.backends`, which is what tests/test_plugin_backend.py proves.
"""
from __future__ import annotations

from typing import AsyncIterator

from pydantic import Field

from byzer_magic.backends import base
from byzer_magic.backends.base import BackendSettings, Delta, GenParams, Messages


class Settings(BackendSettings):
    """`backend.*` keys of the echo backend."""

    prefix: str = Field(default="", description="text put before every answer")
    max_tokens: int | None = Field(default=None, gt=0, description="default answer length limit, in words")


class Backend(base.Backend):
    """Echoes; needs no model path and no library beyond itself."""

    name = "echo"
    Settings = Settings
    library = "byzer_echo_backend"
    model_path_help = None
    no_model_path_why = "the echo backend has no model"

    def chat(self, messages: Messages, gen: GenParams) -> AsyncIterator[Delta]:
        return self.generate(str(messages[-1]["content"]), gen)

    async def generate(self, prompt: str, gen: GenParams) -> AsyncIterator[Delta]:
        gen = gen.over(self.settings)
        words = self.settings.prefix.split() + prompt.split()
        limit = gen.max_tokens or len(words)
        for word in words[:limit]:
            yield Delta(word + " ")
        yield Delta("", "length" if limit < len(words) else "stop")

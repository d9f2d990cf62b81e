"""The outstanding-requests publisher lives while its loop has requests, then lets go of the loop (no Ray)."""
from __future__ import annotations

import asyncio

from byzer_magic.serving import chat


def test_publisher_ends_when_idle_and_a_new_one_starts(monkeypatch):
    published: list[dict[str, int]] = []
    monkeypatch.setattr(chat.metrics, "publish_outstanding", lambda caller, counts: published.append(counts))

    async def one_request() -> None:
        with chat._counted("m"):
            await asyncio.sleep(1.2)
        loop = asyncio.get_running_loop()
        assert loop in chat._publishers
        while loop in chat._publishers:
            await asyncio.sleep(0.1)

    asyncio.run(one_request())
    assert published[0] == {"m": 1} and published[-1] == {"m": 0}
    assert not chat._publishers
    asyncio.run(one_request())
    assert not chat._publishers

"""The router's event stream merges text chunks that are already waiting (a slow consumer gets
fewer, larger messages) without delaying any: a chunk that arrives alone goes out alone, and the
end events keep their order."""

from __future__ import annotations

import asyncio

import pytest

from services.router.orchestrator import Finished, TextChunk
from services.router.server import _DONE, _coalesced

pytestmark = pytest.mark.unit


async def _collect(queue):
    return [event async for event in _coalesced(queue)]


async def test_waiting_chunks_merge_and_the_end_keeps_its_place():
    queue: asyncio.Queue = asyncio.Queue()
    finished = Finished("length", 3, 0, 3, {})
    for item in (TextChunk("a", (1,)), TextChunk("b", (2,)), TextChunk("c", (3,)), finished, _DONE):
        queue.put_nowait(item)
    assert await _collect(queue) == [TextChunk("abc", (1, 2, 3)), finished]


async def test_a_chunk_that_arrives_alone_is_not_held_back():
    queue: asyncio.Queue = asyncio.Queue()
    stream = _coalesced(queue)
    queue.put_nowait(TextChunk("a", (1,)))
    assert await asyncio.wait_for(anext(stream), 1.0) == TextChunk("a", (1,))
    queue.put_nowait(TextChunk("b", (2,)))
    queue.put_nowait(_DONE)
    assert [e async for e in stream] == [TextChunk("b", (2,))]

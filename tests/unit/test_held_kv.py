"""Decode's budget of hand-off KV held ahead of free blocks (services/decode/held_kv.py)."""

from __future__ import annotations

import asyncio

import pytest

from services.decode.held_kv import HeldKV


async def _started(coroutine) -> asyncio.Task:
    task = asyncio.ensure_future(coroutine)
    await asyncio.sleep(0)
    return task


async def test_requests_within_the_limit_are_let_in_at_once_and_the_next_waits_for_a_release():
    held = HeldKV(100)
    await held.acquire(60)
    await held.acquire(40)
    third = await _started(held.acquire(10))
    assert not third.done() and held.waiting == 1 and held.held_bytes == 100
    held.release(60)
    await third
    assert held.held_bytes == 50 and held.waiting == 0


async def test_a_request_larger_than_the_limit_is_let_in_alone():
    held = HeldKV(100)
    await held.acquire(30)
    large = await _started(held.acquire(500))
    assert not large.done()
    held.release(30)
    await large
    assert held.held_bytes == 500
    small = await _started(held.acquire(1))
    assert not small.done()          # nothing more while the large one is held
    held.release(500)
    await small


async def test_requests_are_let_in_in_arrival_order():
    held = HeldKV(100)
    await held.acquire(100)
    order = []

    async def request(name: str, nbytes: int):
        await held.acquire(nbytes)
        order.append(name)

    big = await _started(request("big", 90))
    small = await _started(request("small", 5))  # would fit beside the big one, but came later
    held.release(50)
    await asyncio.sleep(0)
    assert order == [] and not small.done()      # the first waiter does not fit yet: no overtaking
    held.release(50)
    await asyncio.gather(big, small)
    assert order == ["big", "small"] and held.held_bytes == 95


async def test_a_waiter_cancelled_holds_nothing_and_does_not_block_those_behind_it():
    held = HeldKV(100)
    await held.acquire(80)
    first = await _started(held.acquire(50))
    second = await _started(held.acquire(20))
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await second                                   # 80 + 20 fits once the 50 is gone from the queue
    assert held.held_bytes == 100 and held.waiting == 0


async def test_a_waiter_let_in_as_it_is_cancelled_gives_its_bytes_back():
    held = HeldKV(100)
    await held.acquire(100)
    waiter = await _started(held.acquire(40))
    held.release(100)        # grants the waiter (its future is done) ...
    waiter.cancel()          # ... before its task resumes
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert held.held_bytes == 0


def test_the_limit_must_be_positive():
    with pytest.raises(ValueError, match="limit_bytes"):
        HeldKV(0)

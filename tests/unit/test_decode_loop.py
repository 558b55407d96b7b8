"""The decode service's engine loop (asyncio side): events reach each request's queue, a duplicate
request id is refused, an abort reaches the engine, a failing step fails every request in it and
leaves the engine empty."""

from __future__ import annotations

import asyncio

import pytest

from epdserve.errors import AlreadyExistsError, InternalError
from services.decode.loop import EngineLoop
from services.runtime import ModelExecutor


class FakeEngine:
    """Emits one token per step for each running id, finishing after `steps` tokens; with
    `fail_after_abort`, the step after the one that handled an abort raises."""

    def __init__(self, steps: int = 3, fail_after_abort: bool = False) -> None:
        self.running: dict[str, int] = {}
        self.steps, self.fail_after_abort, self.fail_next = steps, fail_after_abort, False

    @property
    def has_work(self) -> bool:
        return bool(self.running)

    def step(self, arrivals, aborts):
        from services.decode.engine import StepResult, TokenEvent

        if self.fail_next:
            raise RuntimeError("boom")
        result = StepResult()
        for job in arrivals:
            self.running[job.request_id] = 0
            result.inputs_done.append(job.request_id)
        for request_id in aborts:
            if self.running.pop(request_id, None) is not None:
                result.aborted.append(request_id)
                self.fail_next = self.fail_after_abort
        for request_id in list(self.running):
            self.running[request_id] += 1
            done = self.running[request_id] == self.steps
            result.tokens.append(TokenEvent(request_id, self.running[request_id], "length" if done else ""))
            if done:
                del self.running[request_id]
        result.batch_size = len(result.tokens)
        return result

    def reset(self):
        dropped, self.running = list(self.running), {}
        return dropped


class Job:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


async def _drain(queue) -> list:
    events = []
    while not events or events[-1].kind in ("inputs_done", "token") and not events[-1].finish:
        events.append(await asyncio.wait_for(queue.get(), 5))
    return events


def test_events_flow_and_duplicates_are_refused():
    async def main():
        loop = EngineLoop(FakeEngine(), ModelExecutor("t"))
        a, b = loop.submit(Job("a")), loop.submit(Job("b"))
        with pytest.raises(AlreadyExistsError, match="'a'"):
            loop.submit(Job("a"))
        events_a, events_b = await asyncio.gather(_drain(a), _drain(b))
        assert [e.kind for e in events_a] == ["inputs_done", "token", "token", "token"]
        assert events_a[-1].finish == "length" and events_b[-1].token == 3
        await loop.close()

    asyncio.run(main())


def test_abort_and_failure_reach_the_requests():
    async def main():
        engine = FakeEngine(steps=10_000, fail_after_abort=True)
        loop = EngineLoop(engine, ModelExecutor("t"))
        a, b = loop.submit(Job("a")), loop.submit(Job("b"))
        await a.get(), await b.get()
        assert loop.abort("a") and not loop.abort("missing")
        while (event := await asyncio.wait_for(a.get(), 5)).kind == "token":
            pass
        assert event.kind == "abort"
        while (event := await asyncio.wait_for(b.get(), 5)).kind == "token":
            pass
        assert event.kind == "error" and isinstance(event.error, InternalError) and not engine.running
        await loop.close()

    asyncio.run(main())

"""RouterService.GenerateBatch: an offline batch planned once (`batch_plan.py`, LPT onto decode
slots) and run with each slot's requests in sequence on its decode replica.

Invariant: every request of the batch yields exactly one BatchResult (a request that fails
validation or generation gets an error result; the others go on), then one BatchSummary; closing
the stream cancels every request still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence

from epdserve.errors import EpdserveError
from epdserve.transport.errors import status_code
from epdserve.v1 import router_pb2
from services.router.batch_plan import CostModel, Plan, Slot, plan_lpt
from services.router.orchestrator import Finished, Orchestrator, TextChunk
from services.router.placement import prefill_rate
from services.router.pools import Replica
from services.router.requests import parse_request

_DONE = object()


class BatchRunner:
    """`events(request, tenant, timeout_s, decode_replica)` is the router's one-request path."""

    def __init__(self, orchestrator: Orchestrator, events: Callable[..., AsyncIterator], salt: bytes) -> None:
        self.orchestrator, self.events, self.salt = orchestrator, events, salt

    async def run(self, requests: Sequence[router_pb2.GenerateRequest], tenant: str,
                  timeout_s: float | None) -> AsyncIterator[router_pb2.BatchEvent]:
        costs, failed_early = self._costs(requests)
        for index, error in failed_early.items():
            yield router_pb2.BatchEvent(result=_result(index, error=error))
        plan = self._plan(costs)
        queue: asyncio.Queue = asyncio.Queue()
        start = time.monotonic()
        workers = [asyncio.create_task(self._slot(plan.slots[s], jobs, costs, requests, tenant, timeout_s, queue))
                   for s, jobs in enumerate(plan.jobs) if jobs]
        remaining, failed = len(workers), len(failed_early)
        try:
            while remaining:
                item = await queue.get()
                if item is _DONE:
                    remaining -= 1
                    continue
                failed += item.HasField("error")
                yield router_pb2.BatchEvent(result=item)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        yield router_pb2.BatchEvent(summary=router_pb2.BatchSummary(
            requests=len(requests), failed=failed, slots=len(plan.slots), predicted_makespan_s=plan.makespan_s,
            lower_bound_s=plan.lower_bound_s, makespan_s=time.monotonic() - start))

    def _costs(self, requests) -> tuple[dict[int, float], dict[int, EpdserveError]]:
        """Predicted seconds per valid request; the others' validation errors."""
        model = self._cost_model()
        costs, errors = {}, {}
        for index, request in enumerate(requests):
            try:
                req = parse_request(request, self.orchestrator.config, self.salt)
                prompt = self.orchestrator.tokenize(req)
            except EpdserveError as exc:
                errors[index] = exc
                continue
            costs[index] = model.seconds(len(prompt.token_ids), req.max_tokens)
        return costs, errors

    def _cost_model(self) -> CostModel:
        orchestrator = self.orchestrator
        rate = prefill_rate(orchestrator.prefill.replicas, orchestrator.defaults)
        steps = [r.load.step_ms / 1000.0 for r in orchestrator.decode.replicas if r.load is not None and r.load.step_ms]
        return CostModel(1.0 / rate, sum(steps) / len(steps) if steps else orchestrator.defaults.decode_step_s)

    def _plan(self, costs: dict[int, float]) -> Plan:
        slots = [Slot(r.index, s) for r in self.orchestrator.decode.healthy() for s in range(_concurrency(r))]
        indices = list(costs)
        plan = plan_lpt([costs[i] for i in indices], slots)
        return Plan(plan.slots, tuple(tuple(indices[j] for j in jobs) for jobs in plan.jobs), plan.loads_s,
                    plan.lower_bound_s)

    async def _slot(self, slot: Slot, jobs, costs, requests, tenant, timeout_s, queue: asyncio.Queue) -> None:
        replica = self.orchestrator.decode.get(slot.replica)
        try:
            for index in jobs:
                queue.put_nowait(await self._one(index, requests[index], replica, tenant, timeout_s))
        finally:
            queue.put_nowait(_DONE)

    async def _one(self, index: int, request, replica: Replica, tenant: str, timeout_s) -> router_pb2.BatchResult:
        text, tokens = [], []
        try:
            async with contextlib.aclosing(self.events(request, tenant, timeout_s, replica)) as events:
                async for event in events:
                    if isinstance(event, TextChunk):
                        text.append(event.text)
                        tokens.extend(event.token_ids)
                    elif isinstance(event, Finished):
                        complete = router_pb2.Complete(
                            request_id=request.request_id, finish_reason=event.finish_reason,
                            usage=router_pb2.Usage(prompt_tokens=event.prompt_tokens, image_tokens=event.image_tokens,
                                                   completion_tokens=event.completion_tokens),
                            timings_ms=event.timings_ms)
                        return _result(index, text="".join(text), token_ids=tokens, complete=complete)
                    else:  # Failed: the error after the first chunk
                        return _result(index, text="".join(text), token_ids=tokens, error=event.error)
        except EpdserveError as exc:
            return _result(index, error=exc)
        return _result(index, error=EpdserveError("the request ended without a result"))


def _concurrency(replica: Replica) -> int:
    return replica.load.max_running if replica.load is not None and replica.load.max_running > 0 else 1


def _result(index: int, *, text: str = "", token_ids=(), complete=None, error: EpdserveError | None = None):
    result = router_pb2.BatchResult(index=index, text=text, token_ids=list(token_ids), complete=complete)
    if error is not None:
        result.error.CopyFrom(router_pb2.Error(code=status_code(error).value[0], message=error.message))
    return result

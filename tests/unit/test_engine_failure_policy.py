"""The model executor's failure policy and a server's failed state: bad input never counts, a
success resets the count, `fatal_after` unexpected failures in a row declare the engine failed
(once), every later call is UNAVAILABLE at once; a failed server reports NOT_SERVING on every
health name, stops, and `run_until_signalled` raises EngineFailedError."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epdserve.config import ServerConfig
from epdserve.errors import EngineFailedError, InvalidArgumentError, ResourceExhaustedError, UnavailableError
from epdserve.transport.server import ServiceServer, run_until_signalled
from services.runtime import ModelExecutor


def _boom():
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _out_of_memory():
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.06 GiB.\nmore details")


def _bad_input():
    raise InvalidArgumentError("prompt too long")


async def test_only_unexpected_failures_in_a_row_are_fatal():
    fatal: list[BaseException] = []
    executor = ModelExecutor("t", fatal_after=3, on_fatal=fatal.append)
    try:
        for _ in range(2):
            with pytest.raises(RuntimeError):
                await executor.run(_boom)
        assert await executor.run(lambda: 7) == 7  # a success resets the count
        for _ in range(2):
            with pytest.raises(RuntimeError):
                await executor.run(_boom)
        for _ in range(5):  # bad input says nothing about the engine
            with pytest.raises(InvalidArgumentError):
                await executor.run(_bad_input)
        assert executor.failed is None and not fatal
        with pytest.raises(RuntimeError):
            await executor.run(_boom)
        assert isinstance(executor.failed, RuntimeError) and fatal == [executor.failed]
        with pytest.raises(UnavailableError, match="retry on another replica"):
            await executor.run(lambda: 7)
        assert len(fatal) == 1
    finally:
        executor.shutdown()


async def test_zero_means_never_and_injection_fails_calls_after_the_nth():
    executor = ModelExecutor("t", fatal_after=0, inject_fault_after=2)
    try:
        assert [await executor.run(lambda: 1), await executor.run(lambda: 2)] == [1, 2]
        for _ in range(10):
            with pytest.raises(RuntimeError, match="injected model fault"):
                await executor.run(lambda: 3)
        assert executor.failed is None
    finally:
        executor.shutdown()


async def test_a_failed_server_reports_not_serving_and_stops_with_engine_failed():
    server = ServiceServer(ServerConfig(drain_timeout_s=1.0), ["epdserve.v1.DecodeService"])
    address = server.bind()
    serving = asyncio.create_task(run_until_signalled(server))
    channel = grpc.aio.insecure_channel(address)
    try:
        check = health_pb2_grpc.HealthStub(channel).Check
        for _ in range(100):
            try:
                if (await check(health_pb2.HealthCheckRequest(service=""), timeout=1)).status == 1:
                    break
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.02)
        server.fail(RuntimeError("GPU fell off the bus"))
        with pytest.raises(EngineFailedError, match="GPU fell off the bus"):
            await asyncio.wait_for(serving, timeout=10)
        assert server.health._server_status == {name: health_pb2.HealthCheckResponse.NOT_SERVING
                                                 for name in ("", "epdserve.v1.DecodeService")}
    finally:
        await channel.close()


async def test_running_out_of_memory_is_resource_exhausted_not_an_engine_failure():
    """A request too big for the memory free now (found serving 16k prompts on a GPU the decode
    stage's KV cache had mostly taken) must not count toward declaring the engine failed where a
    call serves one request (prefill); where a call serves a batch (decode steps) it still counts."""
    fatal: list[BaseException] = []
    executor = ModelExecutor("t", fatal_after=2, on_fatal=fatal.append, calls_serve_one_request=True)
    try:
        for _ in range(4):
            with pytest.raises(ResourceExhaustedError, match="out of accelerator memory .*Tried to allocate 3.06 GiB"
                               ) as caught:
                await executor.run(_out_of_memory)
            assert caught.value.retry_after_s is not None and "more details" not in caught.value.message
        assert executor.failed is None and not fatal
        assert await executor.run(lambda: 7) == 7
    finally:
        executor.shutdown()
    batched = ModelExecutor("t", fatal_after=2, on_fatal=fatal.append)
    try:
        for _ in range(2):
            with pytest.raises(ResourceExhaustedError):
                await batched.run(_out_of_memory)
        assert batched.failed is not None and len(fatal) == 1
    finally:
        batched.shutdown()

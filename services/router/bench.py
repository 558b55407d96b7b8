"""`epdserve bench router`: what the router itself costs per request, with the stages replaced by
zero-work replicas (`--zero-work`: the real protocol, no model).

Two measurements on the same local cluster, same run:
- added latency: p50 / p99 of a request through the router minus the same request's stage calls
  made directly from the bench client (prefill then decode, pre-tokenized), both one at a time;
- throughput: completed requests per second with C concurrent closed-loop clients, and the router
  process's CPU time per request (its capacity per core, independent of the load generator).
The load generator runs on the same machine as the router (say so when quoting the numbers).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import platform
import statistics
import time

from epdserve.launcher import ClusterConfig, LocalCluster
from epdserve.transport.channels import aio_channel
from epdserve.v1 import (
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

PROMPT = "Describe a quiet harbour at dawn in one short sentence."


@dataclasses.dataclass(frozen=True)
class RouterBenchConfig:
    requests: int = 300                      # sequential requests for the latency percentiles
    seconds: float = 5.0                     # duration of each throughput run
    concurrency: tuple[int, ...] = (1, 16, 64)
    max_tokens: int = 8


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {"p50_ms": statistics.median(ordered) * 1000.0,
            "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000.0}


def _generate_request(i: int, max_tokens: int) -> router_pb2.GenerateRequest:
    params = router_pb2.GenerationParams(max_tokens=max_tokens, ignore_eos=True,
                                         sampling=common_pb2.SamplingParams(temperature=0.0))
    return router_pb2.GenerateRequest(request_id=f"bench-{i}", prompt=PROMPT, params=params)


async def _through_router(stub, i: int, max_tokens: int) -> float:
    start = time.perf_counter()
    async for _ in stub.Generate(_generate_request(i, max_tokens)):
        pass
    return time.perf_counter() - start


async def _direct(prefill, decode, token_ids: list[int], max_tokens: int) -> float:
    start = time.perf_counter()
    response = await prefill.Prefill(prefill_pb2.PrefillRequest(request_id="direct", token_ids=token_ids))
    request = decode_pb2.DecodeRequest(request_id="direct", kv=response.kv, first_token_id=response.first_token_id,
                                       max_new_tokens=max_tokens - 1, ignore_eos=True)
    async for _ in decode.Decode(request):
        pass
    return time.perf_counter() - start


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _throughput(stub, concurrency: int, seconds: float, max_tokens: int, router_pid: int) -> dict:
    """Closed loop: requests/s, and the router process's CPU milliseconds per request."""
    done, deadline = 0, time.perf_counter() + seconds
    cpu_before = _cpu_seconds(router_pid)

    async def client(c: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < deadline:
            await _through_router(stub, c * 1_000_000 + i, max_tokens)
            i += 1
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"requests_per_s": done / elapsed, "router_cpu_ms_per_request": (_cpu_seconds(router_pid) - cpu_before)
            / done * 1000.0}


async def _measure(cluster: LocalCluster, token_ids: list[int], config: RouterBenchConfig) -> dict:
    channels = [aio_channel(cluster.router_address), aio_channel(cluster.children["prefill"].address),
                aio_channel(cluster.children["decode"].address)]
    try:
        router = router_pb2_grpc.RouterServiceStub(channels[0])
        prefill = prefill_pb2_grpc.PrefillServiceStub(channels[1])
        decode = decode_pb2_grpc.DecodeServiceStub(channels[2])
        for i in range(20):  # warm-up: channels, tokenizer caches, load reports
            await _through_router(router, -i - 1, config.max_tokens)
            await _direct(prefill, decode, token_ids, config.max_tokens)
        routed, direct = [], []
        for i in range(config.requests):  # interleaved, so drift hits both alike
            routed.append(await _through_router(router, i, config.max_tokens))
            direct.append(await _direct(prefill, decode, token_ids, config.max_tokens))
        added = [r - d for r, d in zip(routed, direct)]
        pid = cluster.children["router"].process.pid
        throughput = {str(c): await _throughput(router, c, config.seconds, config.max_tokens, pid)
                      for c in config.concurrency}
    finally:
        await asyncio.gather(*(c.close() for c in channels))
    return {"through_router": _percentiles(routed), "direct_stage_calls": _percentiles(direct),
            "added_latency": _percentiles(added), "throughput": throughput}


def run_router_bench(model_dir, config: RouterBenchConfig = RouterBenchConfig()) -> dict:
    """Start a zero-work cluster for `model_dir` (its tokenizer and chat template are used), measure,
    stop it. Returns the report (JSON-ready)."""
    from epdserve.models.prompt import PromptBuilder
    from epdserve.models.spec import load_spec

    token_ids = list(PromptBuilder(load_spec(model_dir)).build(PROMPT, 0, False).token_ids)
    zero = ("--zero-work",)
    cluster_config = ClusterConfig(model_dir=model_dir, device="cpu",
                                   stage_args={"encode": zero, "prefill": zero, "decode": zero})
    with LocalCluster(cluster_config) as cluster:
        results = asyncio.run(_measure(cluster, token_ids, config))
    return {"benchmark": "router overhead (zero-work stages)", "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
                       f"{platform.python_version()}", "prompt_tokens": len(token_ids),
            "max_tokens": config.max_tokens, "requests": config.requests, "seconds_per_rate_run": config.seconds,
            **results}


def markdown(report: dict) -> str:
    added, routed, direct = report["added_latency"], report["through_router"], report["direct_stage_calls"]
    lines = ["| measure | p50 ms | p99 ms |", "|---|---:|---:|",
             f"| through the router | {routed['p50_ms']:.2f} | {routed['p99_ms']:.2f} |",
             f"| stage calls made directly | {direct['p50_ms']:.2f} | {direct['p99_ms']:.2f} |",
             f"| **added by the router** | **{added['p50_ms']:.2f}** | **{added['p99_ms']:.2f}** |", "",
             "| concurrent clients | requests/s | router CPU ms / request |", "|---:|---:|---:|"]
    lines += [f"| {c} | {run['requests_per_s']:.0f} | {run['router_cpu_ms_per_request']:.2f} |"
              for c, run in report["throughput"].items()]
    return "\n".join(lines)

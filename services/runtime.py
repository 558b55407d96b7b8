"""What every service process shares: logging, argument parsing, model path resolution,
the model executor thread, the stage's mmcache handle."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import pathlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from epdserve import logs
from epdserve.config import (
    CacheConfig,
    ModelConfig,
    SecurityConfig,
    ServerConfig,
    TraceConfig,
    add_config_args,
    config_from_args,
)
from epdserve.env import read_env
from epdserve.errors import EngineFailedError, EpdserveError, ResourceExhaustedError, UnavailableError
from epdserve.security import NO_CREDENTIALS, Credentials, load_credentials

if TYPE_CHECKING:
    from epdserve.transport.server import ServiceServer
    from mmcache.client import MMCache
    from services.load import LoadTracker
    from services.metrics import StageMetrics

T = TypeVar("T")


def setup_logging(level: str | None = None, log_format: str | None = None) -> None:
    env = read_env()
    logs.setup_logging(level or env.log_level, log_format or env.log_format)


def service_arg_parser(stage: str, stage_config: type | None, *, with_cache: bool = True,
                       also: tuple[type, ...] = ()) -> argparse.ArgumentParser:
    """The flags of `epdserve serve <stage>`; `also`: the configs of stages it can serve alongside
    (prefill's EncodeConfig, for --with-encode)."""
    parser = argparse.ArgumentParser(prog=f"epdserve serve {stage}", description=f"Run the {stage} service.")
    add_config_args(parser, ServerConfig)
    add_config_args(parser, ModelConfig)
    if with_cache:
        add_config_args(parser, CacheConfig)
    if stage_config is not None:
        add_config_args(parser, stage_config)
    for config in also:  # a field the stage has too (decode's and encode's --cuda-graphs) is one flag for both
        taken = {f.name for f in dataclasses.fields(stage_config)} if stage_config is not None else set()
        add_config_args(parser, config, skip=tuple(taken))
    add_config_args(parser, SecurityConfig)
    add_config_args(parser, TraceConfig)
    parser.add_argument("--log-level", default=None, help="DEBUG | INFO | WARNING | ERROR")
    parser.add_argument("--log-format", default=None, choices=logs.LOG_FORMATS,
                        help="text | json: one JSON object per line (default: $EPDSERVE_LOG_FORMAT or text)")
    return parser


def parse_configs(parser: argparse.ArgumentParser, argv: list[str] | None, *classes: type) -> tuple:
    """The configs of `classes`, in order; a SecurityConfig among them comes back as the loaded
    `Credentials` (files read now, the environment as fallback). Exits with a usage error."""
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        configs = tuple(config_from_args(cls, args) for cls in classes)
        return tuple(load_credentials(c, read_env()) if isinstance(c, SecurityConfig) else c for c in configs)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    except EpdserveError as exc:
        parser.error(exc.message)


def stage_main(stage: str, stage_config: type, serve, argv: list[str] | None, *, also: tuple[type, ...] = ()) -> int:
    """`main` of an encode / prefill / decode process: parse flags, run
    `serve(server, model, cache, stage, credentials, *also)` (`also`: the configs of stages the
    process can serve alongside its own)."""
    parser = service_arg_parser(stage, stage_config, also=also)
    *configs, trace = parse_configs(parser, argv, ServerConfig, ModelConfig, CacheConfig, stage_config,
                                    SecurityConfig, *also, TraceConfig)
    if configs[1].threads > 0:
        import torch

        torch.set_num_threads(configs[1].threads)
    if configs[1].zero_work:
        import functools

        from services.zero_work import serve_zero_work

        serve = functools.partial(serve_zero_work, stage)
    return run_service(serve, tuple(configs), stage, trace)


@dataclasses.dataclass(frozen=True)
class StageContext:
    server: "ServiceServer"
    cache: "MMCache"
    executor: ModelExecutor
    load: "LoadTracker"  # the stage's load report (LoadService); set load.extra for stage-specific fields
    metrics: "StageMetrics"  # requests by outcome, waiting / running; stage metrics go in metrics.registry


@dataclasses.dataclass(frozen=True)
class Colocated:
    """Another stage served by the same process (same port, model thread and cache): its service
    name for health, its stage for load reports, and `register(ctx)` adding its servicer."""
    stage: str
    service_name: str
    register: Callable[[StageContext], None]


async def run_stage(stage: str, service_name: str, server_config: ServerConfig, cache_config: CacheConfig,
                    register: Callable[[StageContext], None], credentials: Credentials = NO_CREDENTIALS,
                    colocated: tuple[Colocated, ...] = (), *, page_lock_cache: bool = False) -> None:
    """Wire a stage process: bind its server, open its mmcache (owner = this process start; its pool
    page-locked for direct GPU copies with `page_lock_cache`), let
    `register` add the stage's servicer (and each `colocated` stage's, with its own load tracker
    and metrics labels, sharing everything else), serve the cache's control service, run until
    SIGTERM, clean up. `credentials` secure the server, the data channel and every call to other
    owners."""
    from epdserve.transport.server import ServiceServer, run_until_signalled
    from epdserve.v1 import cache_pb2_grpc, load_pb2_grpc
    from mmcache.client import CacheIdentity, MMCache
    from services.load import LoadServicer, LoadTracker
    from services.metrics import StageMetrics, registry_collector

    stages = (Colocated(stage, service_name, register), *colocated)
    server = ServiceServer(server_config, [s.service_name for s in stages], credentials=credentials)
    identity = CacheIdentity(new_owner_id(stage), server.bind(), server_config.host, server_config.advertise_host)
    cache = await MMCache.open(cache_config, identity, credentials, page_lock_pool=page_lock_cache)
    executor = ModelExecutor(f"{stage}-model", fatal_after=server_config.engine_failures_fatal,
                             on_fatal=server.fail, inject_fault_after=server_config.inject_model_fault_after,
                             calls_serve_one_request=stage in ONE_REQUEST_PER_CALL_STAGES)
    loads = [LoadTracker(s.stage, identity.owner_id) for s in stages]
    metrics = StageMetrics(server.registry, *loads)
    server.registry.register(registry_collector(cache.metrics.registry))
    for s, load in zip(stages, loads):
        s.register(StageContext(server, cache, executor, load, metrics))
    cache_pb2_grpc.add_CacheControlServicer_to_server(cache.servicer(), server.server)
    load_pb2_grpc.add_LoadServiceServicer_to_server(LoadServicer(*loads), server.server)

    async def cleanup() -> None:  # the model thread first: no copy into the cache's memory outlives it
        await asyncio.to_thread(executor.shutdown)
        await cache.close()

    await run_until_signalled(server, cleanup)


def run_service(serve, configs: tuple, stage: str, trace: TraceConfig = TraceConfig()) -> int:
    """Run a service's `serve(*configs)` coroutine with tracing as `trace` says; after it returns
    (drained on SIGTERM) further SIGTERMs are ignored, so the last spans are exported, interpreter
    teardown finishes and the exit code stays 0. SIGUSR1 writes every thread's stack to stderr
    (faulthandler), for a process that hangs."""
    import faulthandler
    import signal

    from epdserve import tracing

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        tracing.setup(trace, stage, read_env())
        asyncio.run(serve(*configs))
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except EngineFailedError as exc:
        logging.getLogger("epdserve").error("%s; exiting 1", exc.message)
        return 1
    except EpdserveError as exc:
        logging.getLogger("epdserve").error("cannot start: %s", exc.message)
        return 1
    finally:
        tracing.shutdown()
    return 0


def resolve_model_dir(config: ModelConfig) -> pathlib.Path:
    """The checkpoint directory to load: --model, or the tiny demo checkpoint (built once, cached)."""
    if config.model:
        return pathlib.Path(config.model)
    from epdserve.models.tiny import cached_tiny_checkpoint

    return cached_tiny_checkpoint(read_env().cache_dir)


def new_owner_id(stage: str) -> str:
    return f"{stage}-{uuid.uuid4().hex[:12]}"


ONE_REQUEST_PER_CALL_STAGES = ("prefill",)   # encode batches images of many requests, decode steps a batch


def _out_of_memory(exc: BaseException | None) -> bool:
    """torch's OutOfMemoryError (CUDA or another accelerator), recognised without importing torch."""
    return type(exc).__name__ == "OutOfMemoryError" and type(exc).__module__.split(".")[0] == "torch"


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


class ModelExecutor:
    """One thread that runs all model work of a process, so the event loop stays responsive and
    model calls from concurrent requests interleave step by step instead of racing.

    Failure policy: a call that raises an `EpdserveError` (bad input) says nothing about the
    engine; any other exception counts, a success resets the count. Running out of accelerator
    memory is RESOURCE_EXHAUSTED; where each call serves one request (`calls_serve_one_request`:
    prefill) it does not count either (that request is too big for what is free now), where a call
    serves a batch (encode, decode) it does, so a replica that can no longer run at all is still
    declared failed. At `fatal_after` unexpected
    failures in a row (a GPU that faults every call) the engine is declared failed: `on_fatal` runs
    once and every later call raises UnavailableError at once, so callers fail fast and the router
    places the work elsewhere."""

    def __init__(self, name: str, *, fatal_after: int = 0, on_fatal: Callable[[BaseException], None] | None = None,
                 inject_fault_after: int = -1, calls_serve_one_request: bool = False) -> None:
        self._oom_is_the_requests = calls_serve_one_request
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._fatal_after, self._on_fatal = fatal_after, on_fatal
        self._inject_after, self._calls = inject_fault_after, 0
        self._failures_in_a_row = 0
        self.failed: BaseException | None = None

    async def run(self, fn: Callable[..., T], *args, one_request: bool | None = None) -> T:
        """fn(*args) on the model thread. `one_request`: whether this call serves a single request
        (its out-of-memory error is that request's, not the engine's); default: the executor's
        setting (a process serving two stages has calls of both kinds)."""
        if self.failed is not None:
            raise UnavailableError("this replica's model engine has failed and it is shutting down; "
                                   "retry on another replica")
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn, *args)
        except EpdserveError as exc:
            requests_own = self._oom_is_the_requests if one_request is None else one_request
            if _out_of_memory(exc.__cause__) and not requests_own:
                self._failed_once(exc)
            raise
        except Exception as exc:
            self._failed_once(exc)
            raise
        self._failures_in_a_row = 0
        return result

    def _call(self, fn: Callable[..., T], *args) -> T:
        self._calls += 1
        if 0 <= self._inject_after < self._calls:
            raise RuntimeError(f"injected model fault (call {self._calls} > --inject-model-fault-after "
                               f"{self._inject_after})")
        try:
            return fn(*args)
        except Exception as exc:
            if _out_of_memory(exc):
                raise ResourceExhaustedError(f"out of accelerator memory ({_first_line(exc)}); retry later, "
                                             "on another replica, or with a shorter prompt",
                                             retry_after_s=1.0) from exc
            raise

    def _failed_once(self, exc: BaseException) -> None:
        self._failures_in_a_row += 1
        if self.failed is None and self._fatal_after and self._failures_in_a_row >= self._fatal_after:
            self.failed = exc
            logging.getLogger("epdserve").critical("model engine failed %d calls in a row; giving up",
                                                   self._failures_in_a_row, exc_info=exc)
            if self._on_fatal is not None:
                self._on_fatal(exc)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class Stopwatch:
    """Accumulates named durations in milliseconds for a response's timings_ms map:
    `with watch.section("prefill_ms"): ...`."""

    def __init__(self) -> None:
        self.timings_ms: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - start) * 1000.0
            self.timings_ms[name] = self.timings_ms.get(name, 0.0) + elapsed

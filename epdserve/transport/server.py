"""Lifecycle of one service process's grpc.aio server.

start: bind (port 0 = free port), register the standard health service ("" = liveness, plus
one name per service = readiness), optional reflection, mark SERVING, write the ready file.
With credentials: the port speaks mutual TLS (client certificates signed by the CA required) and
every method but health needs the bearer token (`transport/auth.py`); with --health-port >= 0 a
second, plaintext server answers grpc.health.v1 alone (the same statuses) for probes that cannot
do TLS. With --metrics-port >= 0, Prometheus `GET /metrics` serves `registry` (one per server, so
in-process servers never share metrics) from prometheus-client's HTTP server thread, bound
before the ready file is written (`metrics_address`).
SIGTERM/SIGINT: readiness NOT_SERVING, stop accepting (new RPCs are UNAVAILABLE), give in-flight RPCs
`drain_timeout_s` (then cancel them), run the service's cleanup, return (exit code 0). A second
SIGTERM/SIGINT during the drain exits at once (code 128 + signal), without cleanup: what a SIGKILL
would leave (shared-memory pool, index entries) is reclaimed as for any dead owner. A shutdown
that outlasts the drain plus `CLEANUP_BUDGET_S` logs its pending tasks' stacks and exits 1.
"""

from __future__ import annotations

import asyncio
import faulthandler
import io
import json
import logging
import os
import pathlib
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from epdserve.config import ServerConfig
from epdserve.errors import EngineFailedError
from epdserve.security import NO_CREDENTIALS, Credentials
from epdserve.transport.auth import TokenAuthInterceptor
from epdserve.transport.decoding import StrictDecodingInterceptor

log = logging.getLogger(__name__)
CLEANUP_BUDGET_S = 2.0   # after the drain, for the service's clean-up (cache close, executor)
WATCHDOG_EXTRA_S = 1.0   # past the shutdown limit, for a blocked event loop


class ServiceServer:
    def __init__(self, config: ServerConfig, service_names: Sequence[str],
                 registry: CollectorRegistry | None = None, credentials: Credentials = NO_CREDENTIALS) -> None:
        self.config = config
        self.credentials = credentials
        self.service_names = tuple(service_names)
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            # auth first: a refused call is never parsed
            interceptors=[*([TokenAuthInterceptor(credentials.token)] if credentials.token else []),
                          StrictDecodingInterceptor()],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self.health_address = ""
        self._health_server: grpc.aio.Server | None = None
        # what GET /metrics serves (a fresh one per server by default); services register their metrics here
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics_address = ""
        self._metrics_http = None
        self.failure: BaseException | None = None  # set by `fail`: the process then exits 1
        self._stop_requested: asyncio.Event | None = None  # set by run_until_signalled
        self._background: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        return f"{self.config.advertise_host or self.config.host}:{self.port}"

    def bind(self) -> str:
        """Bind the listening port (port 0 = a free one) and return the advertised address.
        Services bind before start so they know their own address while wiring up."""
        if self.port == 0:
            address = f"{self.config.host}:{self.config.port}"
            if self.credentials.tls is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, server_credentials(self.credentials))
            if self.port == 0:
                raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        return self.address

    async def start(self) -> str:
        self.bind()
        if self.config.reflection:
            from grpc_reflection.v1alpha import reflection

            names = (*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
            reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), self.server)
        await self.server.start()
        await self._start_health_port()
        self._start_metrics()
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._write_ready_file()
        log.info("serving %s on %s", ", ".join(self.service_names), self.address)
        return self.address

    def ready_info(self) -> dict:
        """What the ready file says (subclasses add their own keys)."""
        info = {"address": self.address, "pid": os.getpid()}
        if self.metrics_address:
            info["metrics_address"] = self.metrics_address
        if self.health_address:
            info["health_address"] = self.health_address
        return info

    async def _start_health_port(self) -> None:
        """The plaintext health-only server (--health-port): it shares `self.health`, so probes
        there see exactly what the main port reports."""
        if self.config.health_port < 0 or self._health_server is not None:
            return
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=16)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = server.add_insecure_port(f"{self.config.host}:{self.config.health_port}")
        if port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.health_port}")
        await server.start()
        self._health_server = server
        host = self.config.advertise_host or self.config.host
        self.health_address = f"{host}:{port}"
        log.info("health only, plaintext, on %s", self.health_address)

    def _start_metrics(self) -> None:
        if self.config.metrics_port < 0 or self._metrics_http is not None:
            return
        httpd, _ = start_http_server(self.config.metrics_port, self.config.metrics_host, self.registry)
        self._metrics_http = httpd
        self.metrics_address = f"{self.config.metrics_host}:{httpd.server_port}"
        log.info("metrics on http://%s/metrics", self.metrics_address)

    def _stop_metrics(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    def _write_ready_file(self) -> None:
        if not self.config.ready_file:
            return
        path = pathlib.Path(self.config.ready_file)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.ready_info()))
        tmp.replace(path)

    def fail(self, exc: BaseException) -> None:
        """The process cannot serve any more (its model engine failed): readiness and liveness go
        NOT_SERVING at once, then the server drains and stops, and the process exits 1 so its
        supervisor (Kubernetes, systemd) restarts it. Call on the event loop."""
        if self.failure is not None:
            return
        self.failure = exc
        task = asyncio.get_running_loop().create_task(self._report_not_serving(("", *self.service_names)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def _report_not_serving(self, names) -> None:
        for name in names:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self) -> None:
        """Drain: readiness NOT_SERVING (liveness "" stays SERVING: the process is alive and finishing
        its work, so a liveness probe must not kill it mid-drain), refuse new RPCs, give in-flight
        ones `drain_timeout_s`, cancel the rest."""
        for name in self.service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(self.config.drain_timeout_s)
        if self._health_server is not None:
            await self._health_server.stop(None)
        await asyncio.to_thread(self._stop_metrics)


def server_credentials(credentials: Credentials) -> grpc.ServerCredentials:
    """TLS with this process's certificate; clients must present one signed by the CA."""
    assert credentials.tls is not None
    cert, key, ca = credentials.tls.pem
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


async def run_until_signalled(server: ServiceServer, cleanup: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `server.fail`), then drain and clean up; a second signal exits
    at once. Raises EngineFailedError after the clean-up when the server failed."""
    stop = server._stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig, stop)
    await server.start()
    if server.failure is None:
        await stop.wait()
    if server.failure is not None:
        log.error("model engine failed: stopping (in-flight requests end UNAVAILABLE), then exiting 1")
    else:
        log.info("signal received: draining (up to %.0f s; a second signal exits at once)",
                 server.config.drain_timeout_s)
    await _stop_within(server.config.drain_timeout_s + CLEANUP_BUDGET_S, server, cleanup)
    log.info("stopped")
    if server.failure is not None:
        raise EngineFailedError(f"model engine failed: {type(server.failure).__name__}: {server.failure}")


async def _stop_within(limit_s: float, server: ServiceServer, cleanup) -> None:
    """Drain and clean up within `limit_s`, or log what is stuck and exit 1 (a supervisor's
    SIGKILL would come later and say less). A blocked event loop cannot time out, so a watchdog
    thread (faulthandler) dumps every thread's stack and exits 1 a moment after the limit."""
    faulthandler.dump_traceback_later(limit_s + WATCHDOG_EXTRA_S, exit=True)

    async def stop_and_clean() -> None:
        await server.stop()
        if cleanup is not None:
            await cleanup()

    try:
        await asyncio.wait_for(stop_and_clean(), limit_s)
        faulthandler.cancel_dump_traceback_later()
    except asyncio.TimeoutError:
        log.error("shutdown took over %.0f s (drain + clean-up); exiting 1. Pending tasks:\n%s",
                  limit_s, _pending_task_stacks())
        logging.shutdown()
        os._exit(1)


def _pending_task_stacks() -> str:
    out = io.StringIO()
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.print_stack(limit=12, file=out)
    return out.getvalue()


def _on_signal(sig: int, stop: asyncio.Event) -> None:
    if not stop.is_set():
        stop.set()
        return
    log.warning("second %s while draining: exiting now", signal.Signals(sig).name)
    logging.shutdown()
    os._exit(128 + sig)

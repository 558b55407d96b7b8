"""A service server with --metrics-port 0 serves its own registry on GET /metrics (on a free port,
named in the ready file as metrics_address) and closes it on stop; without it, nothing listens."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
from prometheus_client import Counter

from epdserve.config import ServerConfig
from epdserve.transport.server import ServiceServer

pytestmark = pytest.mark.integration


def _get(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        return response.read().decode()


async def test_metrics_endpoint_serves_the_servers_registry(tmp_path):
    ready = tmp_path / "svc.ready"
    server = ServiceServer(ServerConfig(metrics_port=0, ready_file=str(ready)), ["test.Service"])
    Counter("epdserve_test_things", "things", registry=server.registry).inc(3)
    await server.start()
    try:
        address = json.loads(ready.read_text())["metrics_address"]
        assert address == server.metrics_address and address.startswith("127.0.0.1:")
        text = await asyncio.to_thread(_get, address)
        assert "epdserve_test_things_total 3.0" in text
    finally:
        await server.stop()
    with pytest.raises(OSError):
        await asyncio.to_thread(_get, address)


async def test_metrics_are_off_by_default(tmp_path):
    ready = tmp_path / "svc.ready"
    server = ServiceServer(ServerConfig(ready_file=str(ready)), ["test.Service"])
    await server.start()
    try:
        assert "metrics_address" not in json.loads(ready.read_text()) and server.metrics_address == ""
    finally:
        await server.stop()

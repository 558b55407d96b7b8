"""A secured deployment end to end: real processes started by LocalCluster with a token and mutual
TLS (certificates made by the test), the stages forced onto the data channel (no shared-memory
reads). It serves requests from a client holding both; a client without the token, without a
certificate or with another CA's certificate is refused with the right status; health answers
without the token (and on the plaintext health-only port); the HTTP front door wants the token
everywhere but /health; `epdserve generate` takes the same flags."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from epdserve.config import SecurityConfig
from epdserve.errors import UnauthenticatedError, UnavailableError
from epdserve.launcher import ClusterConfig, LocalCluster, security_args
from epdserve.sdk import AsyncClient, Client, TLSFiles
from epdserve.security import Credentials
from epdserve.transport.channels import sync_channel
from epdserve.v1 import cache_pb2, cache_pb2_grpc, load_pb2, load_pb2_grpc

pytestmark = pytest.mark.e2e
STAGES = ("encode", "prefill", "decode")


def _png(seed: int) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _tls(pki) -> TLSFiles:
    return TLSFiles(cert=str(pki.cert), key=str(pki.key), ca=str(pki.ca))


@pytest.fixture(scope="module")
def security(pki) -> SecurityConfig:
    return SecurityConfig(auth_token_file=str(pki.token_file), tls_cert=str(pki.cert), tls_key=str(pki.key),
                          tls_ca=str(pki.ca))


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint, security):
    over_the_wire = ("--no-prefer-shared-memory", "--health-port", "0")
    stage_args = {**{stage: over_the_wire for stage in STAGES}, "router": ("--http-port", "0", "--health-port", "0")}
    cluster = LocalCluster(ClusterConfig(model_dir=tiny_checkpoint, device="cpu", security=security,
                                         stage_args=stage_args))
    cluster.start()
    yield cluster
    assert set(cluster.stop().values()) == {0}


@pytest.fixture(scope="module")
def client(cluster, pki):
    with Client(cluster.router_address, timeout_s=60, token=pki.token, tls=_tls(pki)) as client:
        yield client


def _stats(cluster, name: str, pki) -> cache_pb2.StatsResponse:
    with sync_channel(cluster.children[name].address, credentials=Credentials(pki.token, _tls(pki))) as channel:
        return cache_pb2_grpc.CacheControlStub(channel).Stats(cache_pb2.StatsRequest(), timeout=5)


def test_a_secured_cluster_serves_requests_over_the_authenticated_data_channel(cluster, client, pki):
    result = client.generate("What is in this picture?", images=[_png(1)], max_tokens=6, temperature=0.0,
                             ignore_eos=True)
    assert result.usage.completion_tokens == 6 and result.usage.image_tokens > 0

    async def run():
        async with AsyncClient(cluster.router_address, timeout_s=60, token=pki.token, tls=_tls(pki)) as aclient:
            return await aclient.generate("again", max_tokens=3, ignore_eos=True)

    assert asyncio.run(run()).usage.completion_tokens == 3
    # embeddings (encode -> prefill) and KV (prefill -> decode) crossed the TLS + token data channel
    for reader in ("prefill", "decode"):
        assert _stats(cluster, reader, pki).counters["bytes_read_remote"] > 0, reader
    deadline = time.monotonic() + 10  # decode's Release calls to prefill (CacheControl) got through
    while (stats := _stats(cluster, "prefill", pki)).leases or stats.entries_by_kind.get("kv", 0):
        assert time.monotonic() < deadline, f"KV still held: {dict(stats.entries_by_kind)}, {stats.leases} leases"
        time.sleep(0.2)


def test_clients_without_the_token_or_a_trusted_certificate_are_refused(cluster, pki, other_pki):
    refusals = [(UnauthenticatedError, dict(tls=_tls(pki))),
                (UnauthenticatedError, dict(token=other_pki.token, tls=_tls(pki))),
                (UnavailableError, dict(token=pki.token)),  # plaintext to a TLS port
                (UnavailableError, dict(token=pki.token, tls=_tls(other_pki)))]
    for error, kwargs in refusals:
        with Client(cluster.router_address, timeout_s=10, **kwargs) as outsider, pytest.raises(error) as raised:
            outsider.generate("let me in", max_tokens=2)
        assert pki.token not in str(raised.value) and other_pki.token not in str(raised.value)
    with sync_channel(cluster.children["prefill"].address, credentials=Credentials("", _tls(pki))) as channel:
        with pytest.raises(grpc.RpcError) as raised:  # a stage's own RPCs want the token too
            load_pb2_grpc.LoadServiceStub(channel).GetLoad(load_pb2.GetLoadRequest(), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_answers_without_the_token_and_on_the_plaintext_health_port(cluster, pki):
    for name, child in cluster.children.items():
        ready = json.loads(child.ready_file.read_text())
        for address, credentials in ((child.address, Credentials("", _tls(pki))), (ready["health_address"], None)):
            channel = sync_channel(address, credentials=credentials) if credentials else grpc.insecure_channel(address)
            with channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, (name, address)


def _http(cluster, method: str, path: str, token: str | None = None, body: dict | None = None):
    host, port = cluster.router_http_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read() or b"{}")
    conn.close()
    return status, data


def test_http_front_door_wants_the_token_except_on_health(cluster, pki, other_pki):
    assert _http(cluster, "GET", "/health")[0] == 200
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for token in (None, other_pki.token):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            status, body = _http(cluster, method, path, token, chat if method == "POST" else None)
            assert status == 401 and body["error"]["type"] == "authentication_error", (method, path)
    assert _http(cluster, "GET", "/v1/models", pki.token)[0] == 200
    status, body = _http(cluster, "POST", "/v1/chat/completions", pki.token, chat)
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_generate_cli_takes_the_security_flags(cluster, security):
    def generate(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "epdserve.cli", "generate", "--router", cluster.router_address,
                               "--json", "--max-tokens", "2", "--timeout", "30", *flags, "hi"],
                              capture_output=True, text=True, timeout=120, env=dict(os.environ))

    done = generate(*security_args(security))
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["token_ids"]) == 2
    tls_only = [a for a in security_args(security) if a not in ("--auth-token-file", security.auth_token_file)]
    refused = generate(*tls_only)
    assert refused.returncode == 1 and "bearer token" in refused.stderr
